"""Read HAT hyper-parameters back from a state dict, to explain a strict-loading mismatch.

``infer_hat_options(state_dict)`` returns the ``network_g`` options a checkpoint was built
with (as far as its keys and shapes tell); ``describe_mismatch`` turns missing/unexpected keys
into one error message naming the option(s) that most likely differ.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Tuple

import torch

from ..state_dict_report import DetectionError, assume, foreign_checkpoint, format_mismatch, need

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
    if ups and 'conv_before_upsample.0.weight' in sd:
        first = sd[f'upsample.{ups[0]}.weight']
        factor = int(first.shape[0]) // int(first.shape[1])
        upscale = 3 if factor == 9 else 2**len(ups)
        return {'upsampler': ('pixelshuffle', 'conv_before_upsample.0.weight'), 'upscale': (upscale, 'upsample.*')}
    if ups:
        first = sd[f'upsample.{ups[0]}.weight']
        out_ch = int(sd['conv_first.weight'].shape[1]) if 'conv_first.weight' in sd else 3
        upscale = _isqrt_exact(int(first.shape[0]) // max(out_ch, 1))
        return {'upsampler': ('pixelshuffledirect', 'upsample.0.weight'), 'upscale': (upscale, 'upsample.0.weight')}
    if 'conv_last.weight' in sd:
        return {'upsampler': ('', 'no upsample.* key'), 'upscale': (1, 'no upsample.* key')}
    return {}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-6
        except (TypeError, ValueError):
            return False
    return a == b


def describe_mismatch(model_options: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                      missing: List[str], unexpected: List[str], wrong_shape: List[str]) -> str:
    """One error message: what does not match, and which ``network_g`` options probably differ.

    A checkpoint of another architecture (e.g. MambaCSR) is said to be one, without option hints.
    """
    foreign = foreign_checkpoint('HAT', state_dict)
    if foreign:
        lines = format_mismatch(f'HAT: the state dict does not match this model: {foreign}', missing, unexpected,
                                wrong_shape, [], '(the keys differ because the architectures differ.)')
        return '\n'.join(lines)
    hints = [f'{name}: model has {model_options[name]!r}, checkpoint has {value!r} (from {evidence})'
             for name, (value, evidence) in infer_hat_options(state_dict).items()
             if name in model_options and not _same(model_options[name], value)]
    lines = format_mismatch('HAT: the state dict does not match this model (strict loading).', missing, unexpected,
                            wrong_shape, hints, 'no hyper-parameter difference detected: is this a HAT checkpoint, '
                            "and is path.param_key_g right ('params' or 'params_ema')?")
    return '\n'.join(lines)


def options_from_state(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, Any], List[str]]:
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
