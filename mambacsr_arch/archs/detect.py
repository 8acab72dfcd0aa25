"""Which architecture a state dict belongs to, and the ``network_g`` options that rebuild it.

:func:`detect_arch` is the one entry point (``basicsr infer`` without ``--opt``/``--arch``,
``basicsr export``). It names the architecture from key patterns
(:func:`~mambacsr_arch.archs.state_dict_report.checkpoint_arch`: HAT's ``overlap_attn``, MambaCSR's
direction gates ``multi_scan.attn``), reads every hyper-parameter the shapes and key sets show
with the arch's own reader (:func:`~mambacsr_arch.archs.mambacsr_arch.infer_mambacsr_config`,
:func:`~mambacsr_arch.archs.hat_checkpoint.infer_hat_options`), and fills what no tensor shows with
the released configuration, listing each such value as an assumption (override it with
``--arch-opt KEY=VALUE``):

* MambaCSR: ``scan_size`` 8 (the DIS window), ``img_range`` 1; ``dual_interleaved_scan`` is
  visible (2 scan directions per block with DIS, 4 without) except in a cross-scale model, which
  always scans with DIS. ``dt_rank`` and the SSM ratio are visible and checked: MambaCSR builds
  only ceil(embed_dim / 16) and 2.
* HAT: ``img_range`` 1, ``qk_scale`` None (head_dim ** -0.5), ``conv_scale`` 0.01; ``img_size``
  is visible only with ``ape`` (else 64, any input size runs).

A state dict that is neither raises :class:`DetectionError` naming what was recognised.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Tuple

import torch

from .hat_checkpoint import infer_hat_options
from .mambacsr_arch import infer_mambacsr_config
from .state_dict_report import checkpoint_arch, preview

__all__ = ['DetectionError', 'detect_arch', 'detect_network', 'SUPPORTED_ARCHS']

SUPPORTED_ARCHS = ('MambaCSR', 'HAT')
_FIRST_SSM = 'layers.0.residual_group.blocks.0.self_attention.'

#: Options no tensor shows: (value of the released configuration, what it does).
_MAMBACSR_ASSUMED = {
    'scan_size': (8, 'DIS window size'),
    'img_range': (1., 'input range'),
}
_HAT_ASSUMED = {
    'img_range': (1., 'input range'),
    'qk_scale': (None, 'attention scale (None: head_dim ** -0.5)'),
    'conv_scale': (0.01, 'weight of the convolution branch'),
}


class DetectionError(ValueError):
    """The state dict is not one :func:`detect_arch` can rebuild; the message says what it recognised."""


def detect_arch(state_dict: Mapping[str, torch.Tensor]) -> Tuple[str, Dict[str, Any], List[str]]:
    """``(arch name, network_g kwargs, assumptions)`` for a canonical state dict (no wrapper, no prefix).

    ``network_g kwargs`` include ``type`` and are ready for ``basicsr.archs.build_network``;
    ``assumptions`` are one line per option set from the released configuration because no tensor
    shows it. Raises :class:`DetectionError` for another or an unrecognised architecture.
    """
    keys = list(state_dict)
    if not keys or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise DetectionError('cannot detect the architecture: the checkpoint holds no state dict of tensors.')
    found = checkpoint_arch(keys)
    if found is None or found[0] not in SUPPORTED_ARCHS:
        what = (f"a {found[0]} checkpoint (it has '{found[1]}')" if found else
                'not one key pattern of a known architecture')
        raise DetectionError(
            f'cannot detect the architecture: this is {what}. Detected are {" and ".join(SUPPORTED_ARCHS)} '
            "(MambaCSR: '*.self_attention.multi_scan.attn.*' keys; HAT: '*.overlap_attn.*' keys). For another "
            f'arch pass --opt test.yml or --arch NAME with its options. First keys: {preview(keys, 6)}')
    arch = found[0]
    kwargs, assumptions = (_mambacsr(state_dict) if arch == 'MambaCSR' else _hat(state_dict))
    return arch, dict(type=arch, **kwargs), assumptions


def _need(arch: str, found: Mapping[str, Any], names: Tuple[str, ...], keys: List[str]) -> None:
    missing = [name for name in names if name not in found]
    if missing:
        raise DetectionError(f'{arch} checkpoint (by its key names) lacks the tensors that show {missing}: it is '
                             f'truncated or of a modified {arch}. Pass --opt test.yml or --arch {arch} with '
                             f'--arch-opt. First keys: {preview(keys, 6)}')


def _assumed(table: Mapping[str, Tuple[Any, str]], kwargs: Dict[str, Any]) -> List[str]:
    lines = []
    for name, (value, what) in table.items():
        kwargs[name] = value
        lines.append(f'{name}={value!r} ({what}; not visible in the weights)')
    return lines


def _mambacsr(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, Any], List[str]]:
    cfg = infer_mambacsr_config(sd)
    _need('MambaCSR', cfg, ('embed_dim', 'in_chans', 'd_state', 'depths', 'upscale', 'resi_connection'), list(sd))
    embed_dim = cfg['embed_dim']
    dt_weight = sd.get(_FIRST_SSM + 'dt_projs_weight')
    if dt_weight is not None:  # (K, d_inner, dt_rank): MambaCSR builds d_inner = 2 C, dt_rank = ceil(C / 16)
        d_inner, dt_rank = int(dt_weight.shape[1]), int(dt_weight.shape[2])
        if d_inner != 2 * embed_dim or dt_rank != math.ceil(embed_dim / 16):
            raise DetectionError(
                f'MambaCSR checkpoint with ssm_ratio {d_inner / embed_dim:g} and dt_rank {dt_rank} '
                f'({_FIRST_SSM}dt_projs_weight {tuple(dt_weight.shape)}); MambaCSR builds only ssm_ratio 2 and '
                f'dt_rank ceil(embed_dim / 16) = {math.ceil(embed_dim / 16)}: this comes from a modified MambaCSR.')
    kwargs: Dict[str, Any] = {name: cfg[name] for name in
                              ('in_chans', 'upscale', 'embed_dim', 'd_state', 'depths', 'mlp_ratio',
                               'resi_connection', 'cross_scale_scan', 'patch_norm') if name in cfg}
    kwargs['upsampler'] = 'pixelshuffle'
    if cfg['cross_scale_scan']:
        _need('MambaCSR', cfg, ('depths2', ), list(sd))
        kwargs['depths2'] = cfg['depths2']
        kwargs['dual_interleaved_scan'] = True  # a cross-scale model always scans with DIS
    else:
        _need('MambaCSR', cfg, ('dual_interleaved_scan', ), list(sd))
        kwargs['dual_interleaved_scan'] = cfg['dual_interleaved_scan']
    return kwargs, _assumed(_MAMBACSR_ASSUMED, kwargs)


def _hat(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, Any], List[str]]:
    found = {name: value for name, (value, _) in infer_hat_options(sd).items()}
    _need('HAT', found, ('embed_dim', 'in_chans', 'depths', 'num_heads', 'window_size', 'compress_ratio',
                         'squeeze_factor', 'overlap_ratio', 'mlp_ratio', 'upscale', 'upsampler', 'resi_connection'),
          list(sd))
    kwargs = dict(found)
    assumptions = _assumed(_HAT_ASSUMED, kwargs)
    if found.get('ape'):  # absolute_pos_embed (1, patches, C) fixes the (square) training size
        side = math.isqrt(int(sd['absolute_pos_embed'].shape[1]))
        kwargs['img_size'] = side
    else:  # nominal only; the constructor needs img_size >= window_size
        kwargs['img_size'] = max(64, int(found['window_size']))
        assumptions.append(f"img_size={kwargs['img_size']} (nominal training size; any input size runs)")
    return kwargs, assumptions


def detect_network(state_dict: Mapping[str, torch.Tensor], overrides: Mapping[str, Any] = ()) -> Tuple[Dict[str, Any], str]:
    """``(network_g options, one-line summary)``: :func:`detect_arch`, then ``overrides`` (``--arch-opt``) on top.

    The summary names the arch, its key options and scale, and the assumed options not overridden.
    """
    arch, kwargs, assumptions = detect_arch(state_dict)
    overrides = dict(overrides)
    kwargs.update(overrides)
    shown = ', '.join(f'{name}={kwargs[name]!r}' for name in _SUMMARY[arch] if name in kwargs)
    assumed = [line for line in assumptions if line.split('=', 1)[0] not in overrides]
    summary = f"detected {arch} x{kwargs.get('upscale')} from the weights: {shown}"
    if overrides:
        summary += f'; --arch-opt: {overrides}'
    if assumed:
        summary += f"; assumed (override with --arch-opt KEY=VALUE): {'; '.join(assumed)}"
    return kwargs, summary


_SUMMARY = {
    'MambaCSR': ('embed_dim', 'depths', 'd_state', 'mlp_ratio', 'cross_scale_scan', 'depths2',
                 'dual_interleaved_scan', 'resi_connection', 'in_chans'),
    'HAT': ('embed_dim', 'depths', 'num_heads', 'window_size', 'compress_ratio', 'squeeze_factor', 'overlap_ratio',
            'mlp_ratio', 'upsampler', 'resi_connection', 'in_chans'),
}
