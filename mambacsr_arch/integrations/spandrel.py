"""MambaCSR in spandrel: the model loader of ComfyUI, chaiNNer and InvokeAI.

spandrel 0.4.2 knows HAT but no Mamba-family network, so a MambaCSR checkpoint gives
``UnsupportedModelError``. :func:`install` adds :class:`MambaCSRArch` to ``spandrel.MAIN_REGISTRY``
(spandrel's route for third-party architectures, the one ``spandrel_extra_arches.install()`` takes)::

    import spandrel
    from mambacsr_arch.integrations.spandrel import install

    install()
    model = spandrel.ModelLoader().load_from_file('Cross-scale-QF10-x4.pth')   # an ImageModelDescriptor
    sr = model(lr)                   # (1, 3, H, W) in [0, 1] -> (1, 3, 4H, 4W), any H, W

Detection and options are MambaCSR's own (:func:`mambacsr_arch.archs.detect.detect_arch`, which
asks ``mambacsr_arch/archs/mambacsr/checkpoint.py``): a state dict is claimed only when its key
names carry MambaCSR's markers AND the whole option set can be read from it, so the checkpoints of
HAT, SwinIR, MambaIR and every other spandrel architecture are left alone. Options no tensor shows
(``scan_size``, ``img_range``) are the released configuration's.

``.safetensors`` files: spandrel hands an architecture only the state dict (``load_file`` drops
the header), so the ``network_g`` that ``basicsr export`` / ``save_safetensors`` store in the
metadata cannot be honoured here; detection from the tensors is what a spandrel host has. A
checkpoint trained with a non-released ``scan_size`` or ``img_range`` therefore loads with the
released values in spandrel hosts; ``basicsr infer --weights`` honours the metadata.

Outputs are the network's own: the descriptor calls the network on the whole input (it pads
itself: any size >= 1 px runs, with no external padding that could change the border), so its
output equals ``basicsr infer --weights`` (auto mode, images within its tiling budget) on the
same image before spandrel's clamp to [0, 1].
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Dict, List, Mapping, Set

import torch

try:
    import spandrel
    from spandrel import (Architecture, ArchSupport, ImageModelDescriptor, ModelTiling, SizeRequirements,
                          StateDict)
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError("mambacsr_arch.integrations.spandrel needs spandrel: pip install 'mambacsr-arch[spandrel]' "
                      '(or pip install spandrel)') from _err

import mambacsr_arch  # noqa: F401  (shims, then BasicSR registrations)
from basicsr.utils.registry import ARCH_REGISTRY

from ..archs.detect import DetectionError, detect_arch
from ..archs.mambacsr import checkpoint as mambacsr_checkpoint

__all__ = ['MambaCSRArch', 'install', 'SUPPORTS_HALF', 'SUPPORTS_BFLOAT16']

# Precision flags (spandrel's ``.to(torch.half / torch.bfloat16)`` casts the weights, then the host
# feeds inputs of that dtype). Measured on CPU, torch 2.14, tiny MambaCSR (embed_dim 24) with and
# without cross-scale scanning, 37x29 input: casting the network to bfloat16 or float16 does not run
# (the SS2D direction gates mix the float32 pooled statistics with the cast weights: "mat1 and mat2
# must have the same dtype"), so both are False; tests/test_spandrel.py re-measures it and fails if the
# network starts running in either dtype with a max error <= 2e-2 vs float32 (then set the flag).
# For reference, fp32 weights under bf16 autocast (``basicsr infer --bf16``) differ by 2.1e-3 (max).
SUPPORTS_HALF = False
SUPPORTS_BFLOAT16 = False
#: Largest max-abs difference from float32 output a reduced precision may have to be declared supported.
HALF_TOLERANCE = 2e-2


def _variant_tags(kwargs: Mapping[str, Any]) -> List[str]:
    """Tags in spandrel's style naming the variant, e.g. ``['180dim', 'depths 6-6-6-6-6-6', 'd_state 16',
    'cross-scale 6', 'DIS']`` (released cross-scale model)."""
    tags = [f"{kwargs['embed_dim']}dim", f"depths {'-'.join(map(str, kwargs['depths']))}",
            f"d_state {kwargs['d_state']}"]
    if kwargs.get('cross_scale_scan'):
        tags.append(f"cross-scale {'-'.join(map(str, kwargs['depths2']))}")
    tags.append('DIS' if kwargs.get('dual_interleaved_scan') else 'no DIS')
    return tags


def _is_mambacsr(state_dict: StateDict) -> bool:
    """spandrel's detect: True only for a state dict ``detect_arch`` reads completely as MambaCSR."""
    if not any(marker in key for key in state_dict for marker in mambacsr_checkpoint.MARKERS):
        return False
    try:
        arch, _, _ = detect_arch(state_dict)
    except DetectionError as err:
        # spandrel tries us after its own architectures: nothing else claimed this file, so say why we did not
        warnings.warn(f'mambacsr_arch: not loading this checkpoint as {mambacsr_checkpoint.ARCH}: {err}',
                      RuntimeWarning, stacklevel=2)
        return False
    return arch == mambacsr_checkpoint.ARCH


_WARNED: Set[str] = set()
_WARN_LOCK = threading.Lock()


def _warn_slow_scan(device_type: str) -> None:
    """Once per device type: say so when the automatic scan backend fell back to the portable torch scan.

    The dispatcher logs its choice on the ``basicsr`` logger, which spandrel hosts do not configure
    (its INFO lines never show); this warning reaches their console (Python shows warnings by default).
    """
    with _WARN_LOCK:
        if device_type in _WARNED:
            return
        _WARNED.add(device_type)
    from ..ops.dispatch import resolve_backend

    try:
        name, reason = resolve_backend(device_type)
    except (ValueError, RuntimeError):  # an explicit, unusable MAMBACSR_SCAN_BACKEND: the forward raises itself
        return
    if name == 'torch' and not reason.startswith('requested'):
        hint = ('pip install numba' if device_type == 'cpu' else
                'pip install --no-build-isolation mamba-ssm, or a CUDA build of torch (triton)'
                if device_type == 'cuda' else '')
        warnings.warn(f'mambacsr_arch: MambaCSR on {device_type} uses the portable PyTorch selective scan, which is '
                      f'several times slower ({reason}){"; for speed: " + hint if hint else ""}.',
                      RuntimeWarning, stacklevel=3)


def _call(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    _warn_slow_scan(image.device.type)
    return model(image)


class MambaCSRArch(Architecture[torch.nn.Module]):
    """spandrel ``Architecture`` for MambaCSR (Ren et al., compressed image SR with dual-interleaved scans)."""

    def __init__(self) -> None:
        super().__init__(id=mambacsr_checkpoint.ARCH, name=mambacsr_checkpoint.ARCH, detect=_is_mambacsr)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[torch.nn.Module]:
        """Build the network ``detect_arch`` reads from ``state_dict`` and wrap it in an ``ImageModelDescriptor``."""
        arch, kwargs, _assumptions = detect_arch(state_dict)
        if arch != mambacsr_checkpoint.ARCH:
            raise DetectionError(f'this is a {arch} checkpoint, not a {mambacsr_checkpoint.ARCH} one.')
        options: Dict[str, Any] = {k: v for k, v in kwargs.items() if k != 'type'}
        model = ARCH_REGISTRY.get(arch)(**options)
        channels = int(options['in_chans'])
        return ImageModelDescriptor(
            model, state_dict, architecture=self, purpose='SR', tags=_variant_tags(options),
            supports_half=SUPPORTS_HALF, supports_bfloat16=SUPPORTS_BFLOAT16, scale=int(options['upscale']),
            input_channels=channels, output_channels=channels,
            # the network pads itself (scan windows clipped at the border; cross-scale: odd sizes reflect-padded
            # to even inside forward and cropped back): no multiple_of, so a host never pads and changes the border
            size_requirements=SizeRequirements(minimum=1),
            # scans run within windows of up to 64 px (plus a per-direction gate pooled over the map), so tiles
            # differ from the whole image by an error that shrinks as tiles grow (tests/test_comfyui_node.py:
            # random tiny net, 40/16 px tiles: mean 1.5e-3; 24/8: 7.3e-3); hosts' 512 px tiles span 8 windows
            tiling=ModelTiling.SUPPORTED,
            call_fn=_call)


def install(ignore_duplicates: bool = False) -> List[ArchSupport]:
    """Add :class:`MambaCSRArch` to ``spandrel.MAIN_REGISTRY``; returns the entries added (empty if already there).

    Raises ``spandrel.DuplicateArchitectureError`` when an architecture with the id ``MambaCSR`` is
    registered already, unless ``ignore_duplicates`` (then the registered one is kept, as spandrel does).
    It is detected after spandrel's own architectures (none of them claims a MambaCSR state dict).
    """
    return spandrel.MAIN_REGISTRY.add(ArchSupport.from_architecture(MambaCSRArch()),
                                      ignore_duplicates=ignore_duplicates)
