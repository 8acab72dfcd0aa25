"""What a HAT checkpoint shows: the detection condition, the ``network_g`` options its tensors imply
and the options no tensor shows (assumed from the released configuration).

:func:`options_from_shapes` (``infer_hat_options``) returns the options a checkpoint was built with,
as far as its keys and shapes tell; detection (:func:`options_from_state`) and the one strict-load
report (:func:`mambacsr_arch.archs.state_dict_report.describe_mismatch`) both read it.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Tuple

import torch

from ..state_dict_report import assume, need, pixelshuffle_scale

ARCH = 'HAT'
#: Key fragments only HAT's state dicts have (the overlapping cross-attention).
MARKERS = ('.overlap_attn.', )
#: Options shown in the one-line detection summary.
SUMMARY = ('embed_dim', 'depths', 'num_heads', 'window_size', 'compress_ratio', 'squeeze_factor', 'overlap_ratio',
           'mlp_ratio', 'upsampler', 'resi_connection', 'in_chans')

ASSUMED = {
    'img_range': (1., 'input range'),
    'qk_scale': (None, 'attention scale (None: head_dim ** -0.5)'),
    'conv_scale': (0.01, 'weight of the convolution branch'),
}

_BLOCK_KEY = re.compile(r'^layers\.(\d+)\.residual_group\.blocks\.(\d+)\.')
_UPSAMPLE_KEY = re.compile(r'^upsample\.(\d+)\.weight$')
_BEFORE_UPSAMPLE = 'conv_before_upsample.0.weight'


def _isqrt_exact(n: int) -> int:
    root = math.isqrt(n)
    return root if root * root == n else -1


def infer_hat_options(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[Any, str]]:
    """HAT options recoverable from a state dict, each as ``name -> (value, evidence key)``.

    Options whose evidence is absent are left out. Works on any (possibly foreign) mapping.
    """
    sd = state_dict
    found: Dict[str, Tuple[Any, str]] = {}
    if 'conv_first.weight' in sd:
        embed_dim, in_chans = sd['conv_first.weight'].shape[:2]
        found['embed_dim'] = (int(embed_dim), 'conv_first.weight')
        found['in_chans'] = (int(in_chans), 'conv_first.weight')
    blocks: Dict[int, set] = {}
    for key in sd:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if blocks:
        found['depths'] = ([len(blocks.get(i, ())) for i in range(max(blocks) + 1)], 'layers.*.residual_group.blocks.*')
    prefix = 'layers.0.residual_group.blocks.0.'
    table_key = prefix + 'attn.relative_position_bias_table'
    window = -1
    if table_key in sd:
        side = _isqrt_exact(int(sd[table_key].shape[0]))
        if side > 0:
            window = (side + 1) // 2
            found['window_size'] = (window, table_key)
        tables = [f'layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table' for i in sorted(blocks)]
        heads = [int(sd[key].shape[1]) for key in tables if key in sd]
        found['num_heads'] = (heads, 'layers.*.residual_group.blocks.0.attn.relative_position_bias_table')
        found['qkv_bias'] = (prefix + 'attn.qkv.bias' in sd, prefix + 'attn.qkv.bias')
    oca_key = 'layers.0.residual_group.overlap_attn.relative_position_bias_table'
    if oca_key in sd and window > 0:
        side = _isqrt_exact(int(sd[oca_key].shape[0]))
        if side > 0:
            found['overlap_ratio'] = ((side + 1 - 2 * window) / window, oca_key)
    if 'embed_dim' in found:
        dim = found['embed_dim'][0]
        for option, key in (('compress_ratio', prefix + 'conv_block.cab.0.weight'),
                            ('squeeze_factor', prefix + 'conv_block.cab.3.attention.1.weight')):
            if key in sd and sd[key].shape[0] > 0:
                found[option] = (dim // int(sd[key].shape[0]), key)
        if prefix + 'mlp.fc1.weight' in sd:
            found['mlp_ratio'] = (int(sd[prefix + 'mlp.fc1.weight'].shape[0]) / dim, prefix + 'mlp.fc1.weight')
    if 'layers.0.conv.weight' in sd:
        found['resi_connection'] = ('1conv', 'layers.0.conv.weight')
    elif 'layers.0.conv.0.weight' in sd:
        found['resi_connection'] = ('3conv', 'layers.0.conv.0.weight')
    elif blocks:
        found['resi_connection'] = ('identity', 'no layers.0.conv.* key')
    found.update(_infer_upsampler(sd))
    if blocks:
        found['ape'] = ('absolute_pos_embed' in sd, 'absolute_pos_embed')
        found['patch_norm'] = ('patch_embed.norm.weight' in sd, 'patch_embed.norm.weight')
    return found


def _infer_upsampler(sd: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[Any, str]]:
    ups = sorted(int(m.group(1)) for m in map(_UPSAMPLE_KEY.match, sd) if m)
    if 'conv_up1.weight' in sd:
        return {'upsampler': ('nearest+conv', 'conv_up1.weight'), 'upscale': (4, 'conv_up1.weight')}
    if _BEFORE_UPSAMPLE in sd:  # pixelshuffle: conv_before_upsample, then BasicSR's Upsample (no layers at x1)
        scale = pixelshuffle_scale(sd)
        if scale is None and ups:
            return {'upsampler': ('pixelshuffle', _BEFORE_UPSAMPLE)}  # upscale unreadable: detection says so
        return {'upsampler': ('pixelshuffle', _BEFORE_UPSAMPLE),
                'upscale': (scale or 1, 'upsample.*.weight' if scale else f'{_BEFORE_UPSAMPLE} and no upsample.*')}
    if ups:
        first = sd[f'upsample.{ups[0]}.weight']
        out_ch = int(sd['conv_first.weight'].shape[1]) if 'conv_first.weight' in sd else 3
        upscale = _isqrt_exact(int(first.shape[0]) // max(out_ch, 1))
        return {'upsampler': ('pixelshuffledirect', 'upsample.0.weight'), 'upscale': (upscale, 'upsample.0.weight')}
    if 'conv_last.weight' in sd:
        return {'upsampler': ('', 'no upsample.* key'), 'upscale': (1, 'no upsample.* key')}
    return {}


#: The reader the strict-load report and detection use (the name every architecture's checkpoint.py has).
options_from_shapes = infer_hat_options


def options_from_state(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, Any], List[str]]:
    """``(network_g kwargs without type, assumptions)`` for a HAT state dict; :class:`DetectionError` when
    the tensors that show a required option are missing."""
    found = {name: value for name, (value, _) in infer_hat_options(sd).items()}
    need('HAT', found, ('embed_dim', 'in_chans', 'depths', 'num_heads', 'window_size', 'compress_ratio',
                         'squeeze_factor', 'overlap_ratio', 'mlp_ratio', 'upscale', 'upsampler', 'resi_connection'),
          list(sd))
    kwargs = dict(found)
    assumptions = assume(ASSUMED, kwargs)
    if found.get('ape'):  # absolute_pos_embed (1, patches, C) fixes the (square) training size
        side = math.isqrt(int(sd['absolute_pos_embed'].shape[1]))
        kwargs['img_size'] = side
    else:  # nominal only; the constructor needs img_size >= window_size
        kwargs['img_size'] = max(64, int(found['window_size']))
        assumptions.append(f"img_size={kwargs['img_size']} (nominal training size; any input size runs)")
    return kwargs, assumptions
