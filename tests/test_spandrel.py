"""MambaCSR in spandrel (ComfyUI, chaiNNer, InvokeAI): detection that claims only MambaCSR, honest descriptor
fields, and the same pixels as ``basicsr infer --weights`` for .pth and .safetensors files."""
from __future__ import annotations

import importlib
import warnings

import cv2
import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from basicsr.archs import build_network

spandrel = pytest.importorskip('spandrel')

from mambacsr_arch.integrations import spandrel as integration  # noqa: E402
from mambacsr_arch.integrations.spandrel import MambaCSRArch, install  # noqa: E402

MAMBA = dict(type='MambaCSR', img_size=16, embed_dim=24, depths=[1], depths2=[1], d_state=4, mlp_ratio=1.,
             cross_scale_scan=False)
HAT = dict(type='HAT', img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, compress_ratio=3,
           squeeze_factor=4, mlp_ratio=1., upscale=2, upsampler='pixelshuffle')
#: every MambaCSR checkpoint kind this repository can make: x1..x4, cross-scale on/off, DIS on/off, gray, 3conv
MAMBA_KINDS = {
    'x2': dict(MAMBA, upscale=2),
    'x1-gray-cs': dict(MAMBA, upscale=1, in_chans=1, cross_scale_scan=True),
    'x3-noDIS-3conv': dict(MAMBA, upscale=3, dual_interleaved_scan=False, resi_connection='3conv', depths=[1, 1]),
    'x4-cs': dict(MAMBA, upscale=4, embed_dim=32, cross_scale_scan=True, depths=[1, 1], depths2=[1, 1]),
}
HAT_KINDS = {
    'hat-x2': HAT,
    'hat-x3-direct': dict(HAT, upsampler='pixelshuffledirect', upscale=3, resi_connection='3conv', overlap_ratio=1.),
    'hat-x1': dict(HAT, upsampler='', upscale=1, patch_norm=False),
}
#: small models of spandrel's own architectures, built with spandrel's classes: (arch id, module, class, kwargs)
SPANDREL_MODELS = [
    ('SwinIR', 'SwinIR', 'SwinIR', dict(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4,
                                        upscale=2, upsampler='pixelshuffle', mlp_ratio=1.)),
    ('HAT', 'HAT', 'HAT', dict(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
                               upsampler='pixelshuffle', mlp_ratio=1., compress_ratio=3, squeeze_factor=4)),
    ('ESRGAN', 'RRDB', 'RRDBNet', dict(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)),
    ('Compact', 'SRVGG', 'SRVGGNetCompact', dict(num_feat=8, num_conv=2, upscale=2)),
    ('SPAN', 'span', 'SPAN', dict(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2)),
    ('DAT', 'DAT', 'DAT', dict(img_size=16, embed_dim=12, depth=[1], num_heads=[2], split_size=[2, 4], upscale=2,
                               expansion_factor=1.)),
    ('DRCT', 'drct_arch', 'DRCT', dict(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4,
                                       upscale=2, mlp_ratio=1.)),
]


@pytest.fixture(scope='module', autouse=True)
def installed():
    install(ignore_duplicates=True)


def _net(opt, seed=0):
    torch.manual_seed(seed)
    net = build_network(dict(opt)).eval()
    with torch.no_grad():  # non-trivial weights everywhere (the residual init leaves some paths near zero)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


def _spandrel_model_state(arch_id, module, name, kwargs):
    cls = getattr(importlib.import_module(f'spandrel.architectures.{arch_id}.__arch.{module}'), name)
    torch.manual_seed(0)
    return cls(**kwargs).state_dict()


def test_install_registers_once():
    assert 'MambaCSR' in spandrel.MAIN_REGISTRY
    assert install(ignore_duplicates=True) == []  # already there: kept, nothing added
    with pytest.raises(spandrel.DuplicateArchitectureError):
        install()


@pytest.mark.parametrize('kind', sorted(MAMBA_KINDS))
def test_mambacsr_checkpoints_are_ours_only(kind):
    opt = MAMBA_KINDS[kind]
    sd = _net(opt).state_dict()
    assert MambaCSRArch().detect(sd)
    claimed = [a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures('detection') if a.detect(sd)]
    assert claimed == ['MambaCSR'], claimed  # no spandrel architecture takes a MambaCSR checkpoint
    desc = spandrel.ModelLoader().load_from_state_dict({'params_ema': sd})  # BasicSR's wrapper, unwrapped by spandrel
    assert isinstance(desc, spandrel.ImageModelDescriptor) and desc.architecture.id == 'MambaCSR'
    chans = opt.get('in_chans', 3)
    assert (desc.purpose, desc.scale, desc.input_channels, desc.output_channels) == ('SR', opt['upscale'], chans, chans)
    # no multiple_of: a host must never pad externally (the network pads itself; padding would change the border)
    assert desc.size_requirements.multiple_of == 1 and not desc.size_requirements.square
    assert desc.size_requirements.minimum <= 1
    assert desc.tiling == spandrel.ModelTiling.SUPPORTED
    assert f"{opt['embed_dim']}dim" in desc.tags
    assert any(t.startswith('cross-scale') for t in desc.tags) == opt['cross_scale_scan']
    assert ('no DIS' in desc.tags) == (opt.get('dual_interleaved_scan') is False)
    x = torch.rand(1, chans, 5, 3)  # tiny and odd: runs without a size requirement
    assert desc(x).shape == (1, chans, 5 * opt['upscale'], 3 * opt['upscale'])


@pytest.mark.parametrize('kind', sorted(HAT_KINDS))
def test_hat_checkpoints_are_not_claimed(kind):
    sd = _net(HAT_KINDS[kind]).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # not even a "looks like MambaCSR" warning
        assert not MambaCSRArch().detect(sd)


@pytest.mark.parametrize('spec', SPANDREL_MODELS, ids=[s[0] for s in SPANDREL_MODELS])
def test_spandrel_architectures_are_not_claimed(spec):
    sd = _spandrel_model_state(*spec)
    assert spandrel.MAIN_REGISTRY[spec[0]].detect(sd)  # a genuine checkpoint of that architecture
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not MambaCSRArch().detect(sd)
    assert spandrel.ModelLoader().load_from_state_dict(sd).architecture.id == spec[0]


def test_foreign_key_with_a_marker_is_declined_with_the_reason():
    sd = {'encoder.layers3.0.weight': torch.zeros(2, 2), 'conv_last.weight': torch.zeros(3, 2, 3, 3)}
    with pytest.warns(RuntimeWarning, match='not loading this checkpoint as MambaCSR'):
        assert not MambaCSRArch().detect(sd)
    with pytest.warns(RuntimeWarning), pytest.raises(spandrel.UnsupportedModelError):
        spandrel.ModelLoader().load_from_state_dict(sd)


def _measured_error(net, dtype):
    """Max |output(dtype) - output(float32)| of ``net`` cast to ``dtype``, or None when it does not run."""
    x = torch.rand(1, 3, 37, 29)
    with torch.no_grad():
        ref = net(x)
        try:
            out = net.to(dtype)(x.to(dtype)).float()
        except RuntimeError:
            return None
        finally:
            net.float()
    return (out - ref).abs().max().item()


@pytest.mark.parametrize('dtype,flag', [(torch.bfloat16, 'SUPPORTS_BFLOAT16'), (torch.float16, 'SUPPORTS_HALF')])
def test_precision_flags_match_a_measurement(dtype, flag):
    net = _net(dict(MAMBA, upscale=2, cross_scale_scan=True))
    error = _measured_error(net, dtype)
    declared = getattr(integration, flag)
    assert declared == (error is not None and error <= integration.HALF_TOLERANCE), (flag, error)
    desc = spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    assert (desc.supports_bfloat16 if dtype == torch.bfloat16 else desc.supports_half) == declared
    if not declared:
        with pytest.raises(spandrel.UnsupportedDtypeError):
            desc.to(dtype)


def test_slow_scan_fallback_is_said_once(monkeypatch):
    from mambacsr_arch.ops import dispatch

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setitem(dispatch._AVAILABILITY, 'cpu', 'numba is not installed')  # a host without numba
    monkeypatch.setattr(integration, '_WARNED', set())
    desc = spandrel.ModelLoader().load_from_state_dict(_net(dict(MAMBA, upscale=2)).state_dict())
    with pytest.warns(RuntimeWarning, match='portable PyTorch selective scan.*numba is not installed'):
        desc(torch.rand(1, 3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        desc(torch.rand(1, 3, 6, 6))  # once per device type


def _write_png(path, h=37, w=29, seed=3):
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(base.astype(np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path), img)
    return img


def _infer_float(image_path, weights):
    """``basicsr infer --weights`` up to its float output (its setup, network build and restore)."""
    import argparse

    from basicsr.utils import img2tensor

    from mambacsr_arch.cli import infer
    from mambacsr_arch.data.image_io import read_image_bgr8
    from mambacsr_arch.models.inference import restore_image

    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    setup = infer.resolve_setup(parser.parse_args(['-i', str(image_path), '-o', 'unused', '--weights', str(weights)]))
    net = infer.build_model(setup, torch.device('cpu'))
    img = read_image_bgr8(str(image_path))
    lq = img2tensor(img.astype(np.float32) / 255.0, bgr2rgb=True, float32=True).unsqueeze(0)
    return lq, restore_image(net, lq, setup.scale, **setup.settings.restore_kwargs(net))


@pytest.mark.parametrize('kind', ['x2', 'x4-cs'])
def test_same_pixels_as_basicsr_infer(tmp_path, kind):
    from mambacsr_arch.cli.main import main

    opt = MAMBA_KINDS[kind]
    pth = tmp_path / 'net_g.pth'
    torch.save({'params': _net(opt).state_dict()}, pth)
    sft = tmp_path / 'net_g.safetensors'
    assert main(['export', '--weights', str(pth), '-o', str(sft)]) == 0
    image = tmp_path / 'lr.png'
    _write_png(image)  # 37x29: not a multiple of the scan windows nor (29) of 2
    lq, expected = _infer_float(image, pth)
    assert expected.shape[-2:] == (37 * opt['upscale'], 29 * opt['upscale'])
    for weights in (pth, sft):
        desc = spandrel.ModelLoader().load_from_file(str(weights))
        assert desc.architecture.id == 'MambaCSR'
        got = desc(lq)
        assert (got - expected.clamp(0, 1)).abs().max().item() <= 1e-4, weights.suffix
    # and the 8-bit file infer writes is the descriptor's output, quantised the same way
    assert main(['infer', '-i', str(image), '-o', str(tmp_path / 'out'), '--weights', str(sft), '--device', 'cpu',
                 '--no-progress']) == 0
    written = cv2.imread(str(tmp_path / 'out' / 'lr.png'), cv2.IMREAD_UNCHANGED)
    ours = (got[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1]
    assert np.abs(written.astype(int) - ours.astype(int)).max() <= 1
