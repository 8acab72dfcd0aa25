"""What a MambaCSR checkpoint shows: the detection condition, the ``network_g`` options its tensors
imply, the options no tensor shows (assumed from the released configuration), and the strict-load
diagnosis.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..state_dict_report import DetectionError, assume, foreign_checkpoint, need

ARCH = 'MambaCSR'
#: Key fragments only MambaCSR's state dicts have (the direction gates, the cross-scale fusion groups).
MARKERS = ('.multi_scan.attn.', 'layers3.')
#: Options shown in the one-line detection summary.
SUMMARY = ('embed_dim', 'depths', 'd_state', 'mlp_ratio', 'cross_scale_scan', 'depths2', 'dual_interleaved_scan',
           'resi_connection', 'in_chans')

_BLOCK_RE = re.compile(r'^(layers2?)\.(\d+)\.residual_group\.blocks\.(\d+)\.')
_UPSAMPLE_RE = re.compile(r'^upsample\.(\d+)\.weight$')
_FIRST_SSM = 'layers.0.residual_group.blocks.0.self_attention.'
_FIRST_MLP = 'layers.0.residual_group.blocks.0.mlp.fc1.weight'


def infer_mambacsr_config(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The network_g hyper-parameters a MambaCSR state dict implies (only those visible in shapes/keys)."""
    sd = state_dict
    cfg: Dict[str, Any] = {}
    if 'conv_first.weight' in sd:
        cfg['embed_dim'], cfg['in_chans'] = int(sd['conv_first.weight'].shape[0]), int(sd['conv_first.weight'].shape[1])
    if _FIRST_SSM + 'A_logs' in sd:
        cfg['d_state'] = int(sd[_FIRST_SSM + 'A_logs'].shape[1])
    groups: Dict[str, Dict[int, int]] = {'layers': {}, 'layers2': {}}
    for key in sd:
        match = _BLOCK_RE.match(key)
        if match:
            blocks = groups[match.group(1)]
            blocks[int(match.group(2))] = max(blocks.get(int(match.group(2)), 0), int(match.group(3)) + 1)
    if groups['layers']:
        cfg['depths'] = [groups['layers'][i] for i in sorted(groups['layers'])]
    cfg['cross_scale_scan'] = any(k.startswith(('layers2.', 'layers3.', 'patch_embed2.')) for k in sd)
    if groups['layers2']:
        cfg['depths2'] = [groups['layers2'][i] for i in sorted(groups['layers2'])]
    ups = sorted((int(m.group(1)), sd[k]) for k in sd for m in [_UPSAMPLE_RE.match(k)] if m)
    if ups:
        ratios = {int(w.shape[0]) // int(w.shape[1]) for _, w in ups}
        cfg['upscale'] = 3 if ratios == {9} else 2**len(ups)
    elif 'conv_before_upsample.0.weight' in sd:  # BasicSR's Upsample(1) has no layers
        cfg['upscale'] = 1
    if _FIRST_SSM + 'x_proj_weight' in sd and not cfg['cross_scale_scan']:
        cfg['dual_interleaved_scan'] = int(sd[_FIRST_SSM + 'x_proj_weight'].shape[0]) == 2
    if _FIRST_MLP in sd and 'embed_dim' in cfg:
        cfg['mlp_ratio'] = int(sd[_FIRST_MLP].shape[0]) / cfg['embed_dim']
    if 'layers.0.conv.weight' in sd or 'layers.0.conv.0.weight' in sd:
        cfg['resi_connection'] = '1conv' if 'layers.0.conv.weight' in sd else '3conv'
    if 'conv_first.weight' in sd:
        cfg['patch_norm'] = 'patch_embed.norm.weight' in sd
    return cfg


def describe_state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True,
                                 show: int = 5) -> Optional[str]:
    """None if ``model.load_state_dict(state_dict, strict)`` would succeed, else an actionable message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [
        k for k in own if k in state_dict and hasattr(state_dict[k], 'shape')
        and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if not mis_shaped and (not strict or not (missing or unexpected)):
        return None
    lines = [f'{type(model).__name__}: the checkpoint does not match network_g ({len(missing)} missing, '
             f'{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys).']
    keys = list(state_dict)
    foreign = foreign_checkpoint('MambaCSR', keys)
    if set(keys) & {'params', 'params_ema'}:
        lines.append("  The dict holds 'params'/'params_ema': load the inner dict (BasicSR: path.param_key_g).")
    elif keys and all(k.startswith('module.') for k in keys):
        lines.append("  Every key starts with 'module.': strip that DataParallel/DDP prefix.")
    elif foreign:  # e.g. a HAT checkpoint: its shapes would "imply" nonsense MambaCSR options
        lines.append(f'  {foreign}')
    else:
        wanted, have = infer_mambacsr_config(state_dict), infer_mambacsr_config(own)
        hints = [f'  network_g.{name}: checkpoint implies {wanted[name]!r}, the model has {have.get(name)!r}'
                 for name in wanted if name in have and wanted[name] != have[name]]
        lines.append('Most likely wrong hyper-parameter(s):' if hints else
                     'No hyper-parameter visible in shapes differs; was the checkpoint saved from another arch?')
        lines.extend(hints)
    for title, names in (('missing', missing), ('unexpected', unexpected)):
        if names:
            more = f' ... (+{len(names) - show} more)' if len(names) > show else ''
            lines.append(f'  {title} keys: {names[:show]}{more}')
    for k in mis_shaped[:show]:
        lines.append(f'  size mismatch {k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}')
    return '\n'.join(lines)



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
