"""The ComfyUI custom-node folder: imported as ComfyUI imports custom nodes, then the path of its stock
"Load Upscale Model" -> "Upscale Image (using Model)" nodes (spandrel loader, overlapping tiles)."""
from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from basicsr.archs import build_network

spandrel = pytest.importorskip('spandrel')

import mambacsr_arch.integrations.comfyui as comfyui_folder  # noqa: E402

FOLDER = os.path.dirname(comfyui_folder.__file__)
NET = dict(type='MambaCSR', img_size=16, embed_dim=24, depths=[1, 1], depths2=[1], d_state=4, mlp_ratio=1.,
           upscale=2, cross_scale_scan=True)


def import_custom_node(folder: str, name: str):
    """What ComfyUI's custom-node loader does with a folder: its ``__init__.py`` as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, '__init__.py'),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_folder_import_registers_mambacsr_in_a_fresh_host(tmp_path):
    """A fresh process (as ComfyUI at start-up): spandrel alone refuses the file; after the folder import it loads."""
    torch.manual_seed(0)
    weights = tmp_path / 'MambaCSR_x2.pth'
    torch.save({'params_ema': build_network(dict(NET)).state_dict()}, weights)
    script = textwrap.dedent(f'''
        import importlib.util, os, sys
        import spandrel
        try:
            spandrel.ModelLoader().load_from_file({str(weights)!r})
        except spandrel.UnsupportedModelError:
            print('refused before')
        module = import_custom_node({FOLDER!r}, 'mambacsr')
        assert module.NODE_CLASS_MAPPINGS == {{}} and module.NODE_DISPLAY_NAME_MAPPINGS == {{}}
        import_custom_node({FOLDER!r}, 'mambacsr_again')  # a second link / a reload: no DuplicateArchitectureError
        desc = spandrel.ModelLoader().load_from_file({str(weights)!r}).eval()
        assert isinstance(desc, spandrel.ImageModelDescriptor), type(desc)
        print('loaded', desc.architecture.id, desc.scale)
    ''')
    # this module imports the folder itself (installing MambaCSR): the child gets only the loader function
    script = inspect.getsource(import_custom_node) + script
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split('\n')[:2] == ['refused before', 'loaded MambaCSR 2'], proc.stdout


def overlapping_tiles(model, image: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """Overlapping tiles blended with feathered weights, as an upscale node does (our own, small version).

    Tiles of ``tile`` px step by ``tile - overlap`` (the last one flush with the border); each output is
    weighted by a ramp rising over the ``overlap * scale`` px at every side that meets another tile, and
    the weighted sum is divided by the summed weights.
    """
    _, _, h, w = image.shape

    def starts(n):
        if n <= tile:
            return [0]
        pos = list(range(0, n - tile, tile - overlap))
        return pos + [n - tile]

    out = torch.zeros(image.shape[0], image.shape[1], h * scale, w * scale)
    weight = torch.zeros(1, 1, h * scale, w * scale)
    ramp = torch.linspace(0, 1, overlap * scale + 2)[1:-1]
    for y in starts(h):
        for x in starts(w):
            th, tw = min(tile, h), min(tile, w)
            piece = model(image[..., y:y + th, x:x + tw])
            wy, wx = torch.ones(th * scale), torch.ones(tw * scale)
            if y > 0:
                wy[:ramp.numel()] = ramp
            if y + th < h:
                wy[-ramp.numel():] = torch.minimum(wy[-ramp.numel():], ramp.flip(0))
            if x > 0:
                wx[:ramp.numel()] = ramp
            if x + tw < w:
                wx[-ramp.numel():] = torch.minimum(wx[-ramp.numel():], ramp.flip(0))
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[..., y * scale:(y + th) * scale, x * scale:(x + tw) * scale] += piece * mask
            weight[..., y * scale:(y + th) * scale, x * scale:(x + tw) * scale] += mask
    return out / weight


def test_upscale_node_path_tiles_match_the_whole_image():
    import_custom_node(FOLDER, 'mambacsr')
    torch.manual_seed(1)
    net = build_network(dict(NET))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # ComfyUI's loader: the state dict of the file -> spandrel -> must be an ImageModelDescriptor
    desc = spandrel.ModelLoader().load_from_state_dict({'params': net.state_dict()}).eval()
    assert isinstance(desc, spandrel.ImageModelDescriptor) and desc.scale == 2
    # ComfyUI hands the node (B, H, W, C) images and moves channels first; a 64x64 smooth image + texture
    g = torch.Generator().manual_seed(2)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(64, 64), mode='bicubic')
    image = (base + 0.05 * torch.rand(1, 3, 64, 64, generator=g)).clamp(0, 1)
    whole = desc(image)
    # ComfyUI tiles 512 px with 32 px overlap; scaled down with the image: 40 px tiles, 16 px overlap (4 tiles)
    tiled = overlapping_tiles(desc, image, desc.scale, tile=40, overlap=16)
    assert tiled.shape == whole.shape == (1, 3, 128, 128)
    diff = (tiled - whole).abs()
    # The selective scans carry state along each (up to 64 px) window and the direction gates pool over the
    # whole map, so a tile is not the whole image. Measured on this random net (CPU, torch 2.14): max 3.5e-2,
    # mean 1.5e-3 on [0, 1] (0.4 of an 8-bit level); bounds with 2x margin. Smaller tiles are worse (24/8:
    # mean 7.3e-3): the error shrinks as tiles grow, and ComfyUI's 512 px tiles are 8 windows wide.
    assert diff.mean().item() < 3e-3 and diff.max().item() < 7e-2, (diff.mean().item(), diff.max().item())
    smaller = (overlapping_tiles(desc, image, desc.scale, tile=24, overlap=8) - whole).abs()
    assert smaller.mean().item() > diff.mean().item()
