"""MambaCSR (Ren et al., "MambaCSR: Dual-Interleaved Scanning for Compressed Image Super-Resolution
With SSMs"), registered in BasicSR's ARCH_REGISTRY as ``MambaCSR``.

Module tree (state-dict names are those of the official checkpoints; ``[cs]`` = only with
``cross_scale_scan``)::

    MambaCSR
      conv_first               Conv2d 3x3, in_chans -> embed_dim
      patch_embed.norm         LayerNorm (if patch_norm)             (B, C, H, W) -> (B, HW, C)
      patch_embed2.norm   [cs] LayerNorm of the half-resolution branch
      layers.i                 ResidualDISGroup, one per ``depths`` entry
        residual_group.blocks.j  DISBlock: ln_1, self_attention (SS2D), skip_scale, conv_block (CAB),
                                 ln_2, skip_scale2, mlp (fc1, fc2)
        conv                   '1conv' | '3conv'
      layers2.i           [cs] ResidualDISGroup on the 0.5x bilinear-downsampled features (``depths2``)
      layers3.i           [cs] CrossScaleBlock fusing layers.i and layers2.i outputs (w16 scans)
      norm                     LayerNorm
      conv_after_body          '1conv' | '3conv'
      conv_before_upsample.0   Conv2d embed_dim -> 64, LeakyReLU
      upsample                 BasicSR Upsample (conv + PixelShuffle per x2, or x3)
      conv_last                Conv2d 64 -> in_chans

Data flow: (x - mean) * img_range -> conv_first -> [tokens -> groups (with cross-scale fusion after
group i < len(depths2)) -> norm -> map] -> conv_after_body + skip -> upsampler -> / img_range + mean.

Parameter counts (released configuration: embed_dim 180, depths [6] * 6, depths2 [6], d_state 16,
mlp_ratio 2, upscale 4, scan_size 8, DIS on): 22.05M with cross-scale scanning, 18.37M without.

Deviations from the official code (none changes outputs where the official code runs):

* any input size: scan windows are clipped at the border (a window overhanging the map scans only
  the tokens inside it, see :mod:`mambacsr_arch.dis`; identical to the official order for sizes
  that are multiples of the 64-px windows, and no work is spent on padding for the rest; the
  official code pads to whole windows instead); with cross-scale scanning an odd-sized
  input is reflect-padded by one pixel to even size (for the exact 0.5 downsample) and the
  output cropped back to ``upscale * (H, W)``; sizes need not be multiples of 16;
* the cross-scale reverse is exact for non-square inputs (the official one scrambles tokens);
* ``mlp_ratio`` may be a float, ``depths``/``depths2`` may be an int, gradient checkpointing works;
* ``upsampler`` defaults to and must be ``'pixelshuffle'`` (the official default ``''`` returns the input);
* a strict ``load_state_dict`` mismatch raises one error naming the likely wrong hyper-parameter.
"""
from __future__ import annotations

import warnings
from typing import Any, List, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from basicsr.archs.arch_util import Upsample
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from ...dis import is_symbolic
from ...registry import registers
from .blocks import CrossScaleBlock, ResidualDISGroup
from ..layers import PatchEmbed, PatchUnEmbed, crop_to, init_linear_and_norm, make_resi_conv, pad_to_multiple
from ..state_dict_report import describe_mismatch, positive_int, positive_number

__all__ = ['MambaCSR']

#: Options the official constructor accepts but does not use (they appear in option files).
_IGNORED_OPTIONS = frozenset({'type'})


def _as_depths(value: Union[int, Sequence[int]], name: str) -> List[int]:
    if isinstance(value, int):
        return [value]
    try:
        depths = [int(v) for v in value]
    except TypeError as exc:
        raise TypeError(f'MambaCSR: {name} must be an int or a list of ints, got {value!r}') from exc
    if not depths or min(depths) < 1:
        raise ValueError(f'MambaCSR: {name} must be a non-empty list of positive ints, got {value!r}')
    return depths


@registers(ARCH_REGISTRY)
class MambaCSR(nn.Module):
    """MambaCSR super-resolution network. (B, in_chans, H, W) -> (B, in_chans, upscale*H, upscale*W).

    Args (the official option-file keys):
        img_size, patch_size: kept for option-file compatibility (tokens are always single pixels).
        in_chans: image channels. upscale: 2^n or 3. embed_dim: feature channels C.
        d_state: SSM state size. depths: blocks per residual group. depths2: blocks of the
        half-resolution groups (cross-scale only). mlp_ratio: MLP hidden / C.
        img_range: 1. or 255. upsampler: 'pixelshuffle'. resi_connection: '1conv' | '3conv'.
        dual_interleaved_scan: DIS schedule (see :func:`~mambacsr_arch.archs.mambacsr.blocks.dis_directions`).
        cross_scale_scan: add the half-resolution branch and the cross-scale fusion.
        scan_size: DIS window S. drop_rate, drop_path_rate: dropout / stochastic depth.
        patch_norm: LayerNorm after the patch embedding. use_checkpoint: gradient checkpointing
        (every DIS block and fusion block is recomputed in backward).

    The selective-scan backend is not a network option: :mod:`mambacsr_arch.ops` chooses it (inside a
    ``mambacsr_arch.ops.use_backend(name)`` block, else ``MAMBACSR_SCAN_BACKEND``, else automatically).
    """

    def __init__(self, img_size=64, patch_size=1, in_chans: int = 3, upscale: int = 4, embed_dim: int = 180,
                 d_state: int = 16, depths: Union[int, Sequence[int]] = (6, 6, 6, 6, 6, 6),
                 depths2: Union[int, Sequence[int]] = (6, ), mlp_ratio: float = 2., img_range: float = 1.,
                 upsampler: str = 'pixelshuffle', resi_connection: str = '1conv', dual_interleaved_scan: bool = True,
                 cross_scale_scan: bool = False, scan_size: int = 8, drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer=nn.LayerNorm, patch_norm: bool = True, use_checkpoint: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        if 'scan_backend' in kwargs:  # an option of earlier versions of this package (never of the official code)
            raise ValueError("MambaCSR: network_g.scan_backend was removed (the scan backend is not a network "
                             "option); set the environment variable MAMBACSR_SCAN_BACKEND=<name> or run inside "
                             "mambacsr_arch.ops.use_backend('<name>')")
        unknown = sorted(set(kwargs) - _IGNORED_OPTIONS)
        if unknown:
            warnings.warn(f'MambaCSR: ignoring unknown network_g option(s) {unknown}', stacklevel=2)
        if upsampler != 'pixelshuffle':
            raise ValueError(f"MambaCSR: upsampler must be 'pixelshuffle' (network_g.upsampler), got {upsampler!r}")
        depths = _as_depths(depths, 'depths')
        depths2 = _as_depths(depths2, 'depths2')
        # values that would build a broken network (zero-width layers, empty scan windows, NaN outputs)
        for name, value in (('in_chans', in_chans), ('upscale', upscale), ('embed_dim', embed_dim),
                            ('d_state', d_state), ('scan_size', scan_size)):
            positive_int('MambaCSR', name, value)
        for name, value in (('mlp_ratio', mlp_ratio), ('img_range', img_range)):
            positive_number('MambaCSR', name, value)
        if cross_scale_scan and len(depths2) > len(depths):
            raise ValueError(f'MambaCSR: depths2 {depths2} has more groups than depths {depths}; each half-resolution '
                             f'group is fused after the main group of the same index')
        num_feat = 64
        self.img_range = img_range
        self.upscale = upscale
        self.upsampler = upsampler
        self.cross_scale_scan = cross_scale_scan
        # input multiple inference pads to (models.inference): any size runs (scan windows are clipped at
        # the border); the 0.5x cross-scale branch needs even sizes, which forward() would otherwise pad itself
        self.pad_multiple = 2 if cross_scale_scan else 1
        self.use_checkpoint = use_checkpoint
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.mlp_ratio = mlp_ratio
        self.num_layers = len(depths)
        mean = (0.4488, 0.4371, 0.4040) if in_chans == 3 else (0., ) * in_chans
        self.register_buffer('mean', torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # 2. deep features
        embed_norm = norm_layer if patch_norm else None
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim, embed_dim, norm_layer=embed_norm)
        self.patch_unembed = PatchUnEmbed(img_size, patch_size, embed_dim, embed_dim, norm_layer=embed_norm)
        self.pos_drop = nn.Dropout(p=drop_rate)
        total = sum(depths)  # stochastic depth rising linearly 0 -> drop_path_rate (python floats: meta-safe)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        group_kwargs = dict(d_state=d_state, mlp_ratio=mlp_ratio, use_checkpoint=use_checkpoint,
                            resi_connection=resi_connection, dual_interleaved_scan=dual_interleaved_scan,
                            cross_scale_scan=cross_scale_scan)
        self.layers = nn.ModuleList([
            ResidualDISGroup(embed_dim, depth, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], scan_size=scan_size,
                             **group_kwargs) for i, depth in enumerate(depths)
        ])
        if cross_scale_scan:
            self.pos_drop2 = nn.Dropout(p=drop_rate)
            self.patch_embed2 = PatchEmbed(img_size, patch_size, embed_dim, embed_dim, norm_layer=embed_norm)
            # official quirk: the half-resolution groups never receive scan_size (always 8) and reuse the
            # stochastic-depth rates of the main group with the same index
            self.layers2 = nn.ModuleList()
            for i, depth in enumerate(depths2):
                rates = dpr[sum(depths[:i]):sum(depths[:i + 1])]
                rates = (rates + [drop_path_rate] * depth)[:depth]
                self.layers2.append(ResidualDISGroup(embed_dim, depth, drop_path=rates, scan_size=8, **group_kwargs))
            # official: the fusion keeps d_state 16 and a 4 x embed_dim MLP whatever d_state / mlp_ratio
            self.layers3 = nn.ModuleList([
                CrossScaleBlock(embed_dim, ('w16', 'w16_flip', 'c_w16', 'c_w16_flip'), d_state=16, mlp_ratio=4.)
                for _ in depths2
            ])
        self.norm = norm_layer(self.num_features)
        self.conv_after_body = make_resi_conv(embed_dim, resi_connection)
        # 3. reconstruction
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.upsample = Upsample(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        self.apply(init_linear_and_norm)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) shallow features -> (B, C, H, W) deep features. H, W even with cross-scale."""
        x_size = (x.shape[2], x.shape[3])
        if self.cross_scale_scan:
            x_down = F.avg_pool2d(x, 2)
            down_size = (x_down.shape[2], x_down.shape[3])
            x_down = self.pos_drop2(self.patch_embed2(x_down))
        x = self.pos_drop(self.patch_embed(x))
        for i, layer in enumerate(self.layers):
            x = layer(x, x_size)
            if self.cross_scale_scan and i < len(self.layers2):
                b, _, c = x.shape
                x_down = self.layers2[i](x_down, down_size)
                args = (x.reshape(b, x_size[0], x_size[1], c), x_down.reshape(b, down_size[0], down_size[1], c))
                if self.use_checkpoint and torch.is_grad_enabled():
                    x = torch_checkpoint.checkpoint(self.layers3[i].forward_nhwc, *args, use_reentrant=False)
                else:
                    x = self.layers3[i].forward_nhwc(*args)
                x = x.reshape(b, -1, c)
        x = self.norm(x)
        return self.patch_unembed(x, x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) in [0, 1] (or [0, img_range]) -> (B, in_chans, upscale*H, upscale*W)."""
        h, w = x.shape[-2:]
        if self.cross_scale_scan:  # the 0.5x branch needs even sizes: pad, crop the output back
            x, _ = pad_to_multiple(x, 2)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = self.conv_first(x)
        deep = self.conv_after_body(self.forward_features(x))
        if is_symbolic(h):  # a graph exporter's symbolic size: one memory format for the sum (the
            deep = deep.contiguous()  # stride checks of a channels-last + contiguous sum are not provable)
        x = deep + x
        x = self.conv_before_upsample(x)
        x = self.conv_last(self.upsample(x))
        x = x / self.img_range + mean
        return crop_to(x, h * self.upscale, w * self.upscale)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; a mismatch that would fail raises one clear RuntimeError instead.

        The error is the project's one strict-load report
        (:func:`mambacsr_arch.archs.state_dict_report.describe_mismatch`): the first missing/unexpected/
        mis-shaped keys and the network_g options the checkpoint implies (embed_dim, d_state, depths,
        cross_scale_scan, upscale...).
        """
        message = describe_mismatch(self, state_dict, source='the state dict', strict=strict)
        if message:
            raise RuntimeError(message)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
