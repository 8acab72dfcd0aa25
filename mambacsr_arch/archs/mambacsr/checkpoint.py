"""What a MambaCSR checkpoint shows: the detection condition, the ``network_g`` options its tensors
imply (:func:`options_from_shapes`, which also feeds the one strict-load report in
:mod:`mambacsr_arch.archs.state_dict_report`), and the options no tensor shows (assumed from the
released configuration).
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Tuple

import torch

from ..state_dict_report import DetectionError, assume, need, pixelshuffle_scale

ARCH = 'MambaCSR'
#: Key fragments only MambaCSR's state dicts have (the direction gates, the cross-scale fusion groups).
MARKERS = ('.multi_scan.attn.', 'layers3.')
#: Options shown in the one-line detection summary.
SUMMARY = ('embed_dim', 'depths', 'd_state', 'mlp_ratio', 'cross_scale_scan', 'depths2', 'dual_interleaved_scan',
           'resi_connection', 'in_chans')

_BLOCK_RE = re.compile(r'^(layers2?)\.(\d+)\.residual_group\.blocks\.(\d+)\.')
_FIRST_SSM = 'layers.0.residual_group.blocks.0.self_attention.'
_FIRST_MLP = 'layers.0.residual_group.blocks.0.mlp.fc1.weight'


def options_from_shapes(state_dict: Mapping[str, Any]) -> Dict[str, Tuple[Any, str]]:
    """The ``network_g`` options a MambaCSR state dict shows, each as ``name -> (value, evidence key)``.

    Only options visible in key names and shapes; works on any (possibly foreign) mapping. The
    strict-load report (:func:`mambacsr_arch.archs.state_dict_report.describe_mismatch`) reads the
    model and the checkpoint with it.
    """
    sd = state_dict
    cfg: Dict[str, Tuple[Any, str]] = {}
    if 'conv_first.weight' in sd:
        shape = sd['conv_first.weight'].shape
        cfg['embed_dim'], cfg['in_chans'] = (int(shape[0]), 'conv_first.weight'), (int(shape[1]), 'conv_first.weight')
    if _FIRST_SSM + 'A_logs' in sd:
        cfg['d_state'] = (int(sd[_FIRST_SSM + 'A_logs'].shape[1]), _FIRST_SSM + 'A_logs')
    groups: Dict[str, Dict[int, int]] = {'layers': {}, 'layers2': {}}
    for key in sd:
        match = _BLOCK_RE.match(key)
        if match:
            blocks = groups[match.group(1)]
            blocks[int(match.group(2))] = max(blocks.get(int(match.group(2)), 0), int(match.group(3)) + 1)
    if groups['layers']:
        cfg['depths'] = ([groups['layers'][i] for i in sorted(groups['layers'])], 'layers.*.residual_group.blocks.*')
    cross = any(k.startswith(('layers2.', 'layers3.', 'patch_embed2.')) for k in sd)
    cfg['cross_scale_scan'] = (cross, 'layers2.* / layers3.* keys')
    if groups['layers2']:
        cfg['depths2'] = ([groups['layers2'][i] for i in sorted(groups['layers2'])],
                          'layers2.*.residual_group.blocks.*')
    scale = pixelshuffle_scale(sd)
    if scale is not None:
        cfg['upscale'] = (scale, 'upsample.*.weight')
    elif 'conv_before_upsample.0.weight' in sd and not any(k.startswith('upsample.') for k in sd):
        cfg['upscale'] = (1, 'no upsample.* key')  # BasicSR's Upsample(1) has no layers
    if _FIRST_SSM + 'x_proj_weight' in sd and not cross:
        key = _FIRST_SSM + 'x_proj_weight'
        cfg['dual_interleaved_scan'] = (int(sd[key].shape[0]) == 2, key)
    if _FIRST_MLP in sd and 'embed_dim' in cfg:
        cfg['mlp_ratio'] = (int(sd[_FIRST_MLP].shape[0]) / cfg['embed_dim'][0], _FIRST_MLP)
    if 'layers.0.conv.weight' in sd or 'layers.0.conv.0.weight' in sd:
        one = 'layers.0.conv.weight' in sd
        cfg['resi_connection'] = ('1conv', 'layers.0.conv.weight') if one else ('3conv', 'layers.0.conv.0.weight')
    if 'conv_first.weight' in sd:
        cfg['patch_norm'] = ('patch_embed.norm.weight' in sd, 'patch_embed.norm.weight')
    return cfg


def infer_mambacsr_config(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The network_g hyper-parameters a MambaCSR state dict implies (:func:`options_from_shapes`, values only)."""
    return {name: value for name, (value, _) in options_from_shapes(state_dict).items()}


ASSUMED = {
    'scan_size': (8, 'DIS window size'),
    'img_range': (1., 'input range'),
}


def options_from_state(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, Any], List[str]]:
    """``(network_g kwargs without type, assumptions)`` for a MambaCSR state dict; :class:`DetectionError`
    when the tensors that show a required option are missing."""
    cfg = infer_mambacsr_config(sd)
    need('MambaCSR', cfg, ('embed_dim', 'in_chans', 'd_state', 'depths', 'upscale', 'resi_connection'), list(sd))
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
        need('MambaCSR', cfg, ('depths2', ), list(sd))
        kwargs['depths2'] = cfg['depths2']
        kwargs['dual_interleaved_scan'] = True  # a cross-scale model always scans with DIS
    else:
        need('MambaCSR', cfg, ('dual_interleaved_scan', ), list(sd))
        kwargs['dual_interleaved_scan'] = cfg['dual_interleaved_scan']
    return kwargs, assume(ASSUMED, kwargs)
