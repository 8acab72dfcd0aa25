"""HAT: Hybrid Attention Transformer (Chen et al., CVPR 2023), registered as ARCH ``HAT``.

Same constructor options, state-dict keys and shapes as the official ``hat/archs/hat_arch.py``
(XPixelGroup/HAT), so released HAT / HAT-S / HAT-L checkpoints load with ``strict=True``.
Differences in behaviour, none of which changes results on inputs the official code accepts:

* any input size: the input is padded (reflect) to a multiple of ``window_size`` and the
  output cropped back to ``upscale`` x the input size;
* the shifted-window attention mask is cached per (H, W, device, dtype);
* ``use_checkpoint`` really checkpoints every block (the official flag is a no-op);
* extra ``upsampler`` choices with SwinIR's layout: 'pixelshuffledirect', 'nearest+conv'
  (x4) and '' (no upsampling, for artifact reduction), and ``resi_connection='3conv'``;
* a strict-loading mismatch raises one error naming the probably wrong options;
* checkpoints saved before the official code made the relative position indices buffers
  (no ``relative_position_index_*`` keys) load too: the indices are recomputed.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from basicsr.archs.arch_util import Upsample, to_2tuple, trunc_normal_
from basicsr.archs.swinir_arch import UpsampleOneStep, window_partition
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from ...dis import is_symbolic
from ...registry import registers
from .blocks import RHAG
from ..layers import PatchEmbed, PatchUnEmbed, crop_to, init_linear_and_norm, make_resi_conv, pad_to_multiple
from ..state_dict_report import describe_mismatch, positive_int, positive_number

UPSAMPLERS = ('pixelshuffle', 'pixelshuffledirect', 'nearest+conv', '')
RPI_KEYS = ('relative_position_index_SA', 'relative_position_index_OCA')
_MASK_CACHE_SIZE = 8


def relative_position_index_sa(window_size: int) -> torch.Tensor:
    """(ws*ws, ws*ws) long: index into the ((2ws-1)**2)-row bias table for each query/key pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), in [0, 2ws-2]
    return rel[0] * (2 * window_size - 1) + rel[1]


def relative_position_index_oca(window_size: int, overlap_ratio: float) -> torch.Tensor:
    """(ws*ws, ows*ows) long index for OCAB's bias table, ows = ws + int(overlap_ratio*ws).

    Reproduces the official formula exactly, including its negative entries (PyTorch indexing
    wraps them to the end of the table); checkpoints were trained with it.
    """
    ext = window_size + int(overlap_ratio * window_size)
    ori = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij')).flatten(1)
    ext_coords = torch.stack(torch.meshgrid(torch.arange(ext), torch.arange(ext), indexing='ij')).flatten(1)
    rel = ext_coords[:, None, :] - ori[:, :, None] + (window_size - ext + 1)  # (2, ws*ws, ows*ows)
    return rel[0] * (window_size + ext - 1) + rel[1]


def shifted_window_mask(h, w, window_size: int, shift_size: int, device: Optional[torch.device] = None
                        ) -> torch.Tensor:
    """(num_windows, ws*ws, ws*ws) float mask, 0 within a region and -100 across regions, for
    shifted-window attention on an (h, w) map (h, w multiples of window_size).

    The regions (the official HAT's nine slices: rows/columns [0, -ws), [-ws, -shift), [-shift, end))
    are labelled with tensor ops on the size, so ``h``, ``w`` may be symbolic (ONNX export with a
    dynamic size)."""
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    band_r = (rows >= h - window_size).long() + (rows >= h - shift_size).long()
    band_c = (cols >= w - window_size).long() + (cols >= w - shift_size).long()
    img_mask = (band_r[:, None] * 3 + band_c[None, :]).to(torch.float32)[None, :, :, None]  # (1, h, w, 1)
    windows = window_partition(img_mask, window_size).view(-1, window_size * window_size)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def _norm_layer(norm_layer: Union[str, Type[nn.Module]]) -> Type[nn.Module]:
    if isinstance(norm_layer, str):
        cls = getattr(nn, norm_layer, None)
        if cls is None:
            raise ValueError(f"HAT: norm_layer {norm_layer!r} is not a torch.nn class (e.g. 'LayerNorm').")
        return cls
    return norm_layer


@registers(ARCH_REGISTRY)
class HAT(nn.Module):
    """Hybrid Attention Transformer. (B, in_chans, H, W) in [0, 1] (times img_range) ->
    (B, in_chans, upscale*H, upscale*W); any H, W >= 1.

    Args (as the official HAT; defaults identical): img_size, patch_size (nominal; patches are
    1x1), in_chans, embed_dim, depths, num_heads, window_size, compress_ratio, squeeze_factor,
    conv_scale, overlap_ratio, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
    drop_path_rate, norm_layer, ape, patch_norm, use_checkpoint, upscale, img_range,
    upsampler ('pixelshuffle' | 'pixelshuffledirect' | 'nearest+conv' | ''),
    resi_connection ('1conv' | '3conv' | 'identity').
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 64, patch_size: Union[int, Sequence[int]] = 1,
                 in_chans: int = 3, embed_dim: int = 96, depths: Sequence[int] = (6, 6, 6, 6),
                 num_heads: Sequence[int] = (6, 6, 6, 6), window_size: int = 7, compress_ratio: int = 3,
                 squeeze_factor: int = 30, conv_scale: float = 0.01, overlap_ratio: float = 0.5,
                 mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer: Union[str, Type[nn.Module]] = nn.LayerNorm, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, upscale: int = 2, img_range: float = 1., upsampler: str = '',
                 resi_connection: str = '1conv', **kwargs: Any) -> None:
        super().__init__()
        if kwargs:  # the official HAT accepts and ignores unknown options; we do too, but say so
            warnings.warn(f'HAT: ignoring unknown network_g options {sorted(kwargs)} (typo?).', stacklevel=2)
        if upsampler not in UPSAMPLERS:
            raise ValueError(f'HAT: upsampler must be one of {UPSAMPLERS}, got {upsampler!r} '
                             '(network_g.upsampler; released HAT models use pixelshuffle).')
        # values that would build a broken network (a zero-width layer, a division by zero, NaN outputs)
        for name, value in (('in_chans', in_chans), ('embed_dim', embed_dim), ('window_size', window_size),
                            ('compress_ratio', compress_ratio), ('squeeze_factor', squeeze_factor),
                            ('upscale', upscale)):
            positive_int('HAT', name, value)
        for name, value in (('mlp_ratio', mlp_ratio), ('img_range', img_range)):
            positive_number('HAT', name, value)
        if isinstance(overlap_ratio, bool) or not isinstance(overlap_ratio, (int, float)) or overlap_ratio < 0:
            raise ValueError(f'HAT: overlap_ratio must be a number >= 0, got {overlap_ratio!r} '
                             '(network_g.overlap_ratio).')
        if isinstance(depths, int) or isinstance(num_heads, int):
            raise ValueError(f'HAT: depths and num_heads must be lists (one entry per group), got depths={depths!r}, '
                             f'num_heads={num_heads!r}.')
        for name, values in (('depths', depths), ('num_heads', num_heads)):
            if not len(values):
                raise ValueError(f'HAT: {name} must be a non-empty list, got {values!r} (network_g.{name}).')
            for value in values:
                positive_int('HAT', name, value)
        if len(depths) != len(num_heads):
            raise ValueError(f'HAT: depths {list(depths)} and num_heads {list(num_heads)} must have the same length.')
        if any(embed_dim % heads for heads in num_heads):
            raise ValueError(f'HAT: embed_dim {embed_dim} must be divisible by every num_heads {list(num_heads)} '
                             '(each head gets embed_dim / num_heads channels).')
        for name, value in (('compress_ratio', compress_ratio), ('squeeze_factor', squeeze_factor)):
            if embed_dim // value < 1:
                raise ValueError(f'HAT: embed_dim // {name} = {embed_dim} // {value} is 0 channels; network_g.{name} '
                                 f'must be <= embed_dim.')
        patches_resolution = [s // p for s, p in zip(to_2tuple(img_size), to_2tuple(patch_size))]
        if min(patches_resolution) < window_size:
            raise ValueError(f'HAT: img_size // patch_size = {patches_resolution} is smaller than window_size '
                             f'{window_size}; the official HAT cannot run that. Set network_g.img_size >= window_size '
                             '(it only sets the nominal training size; any input size works).')
        if int(window_size * overlap_ratio) % 2:
            raise ValueError(f'HAT: int(window_size * overlap_ratio) = {int(window_size * overlap_ratio)} must be even '
                             '(the overlapping window extends equally on both sides); change network_g.overlap_ratio.')
        norm_layer = _norm_layer(norm_layer)
        self.options: Dict[str, Any] = dict(
            in_chans=in_chans, embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
            window_size=window_size, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor,
            overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, ape=ape, patch_norm=patch_norm,
            upscale=upscale if upsampler else 1, upsampler=upsampler, resi_connection=resi_connection)
        self.window_size = window_size
        self.pad_multiple = window_size  # input multiple inference pads to (reflect), as the official HATModel
        self.shift_size = window_size // 2
        self.overlap_ratio = overlap_ratio
        self.img_range = img_range
        self.upscale = upscale
        self.upsampler = upsampler
        self.embed_dim = self.num_features = embed_dim
        self.num_layers = len(depths)
        self.ape = ape
        self.patch_norm = patch_norm
        self.mlp_ratio = mlp_ratio
        self.patches_resolution = patches_resolution
        num_feat = 64
        mean = (0.4488, 0.4371, 0.4040) if in_chans == 3 else (0.0, )
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('relative_position_index_SA', relative_position_index_sa(window_size))
        self.register_buffer('relative_position_index_OCA', relative_position_index_oca(window_size, overlap_ratio))
        self._mask_cache: 'OrderedDict[Tuple, torch.Tensor]' = OrderedDict()

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # 2. deep features
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=embed_dim,
                                      embed_dim=embed_dim, norm_layer=norm_layer if patch_norm else None)
        self.patch_unembed = PatchUnEmbed(img_size=img_size, patch_size=patch_size, in_chans=embed_dim,
                                          embed_dim=embed_dim)
        if ape:
            num_patches = patches_resolution[0] * patches_resolution[1]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            self.layers.append(
                RHAG(dim=embed_dim, input_resolution=tuple(patches_resolution), depth=depth, num_heads=heads,
                     window_size=window_size, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor,
                     conv_scale=conv_scale, overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                     drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                     use_checkpoint=use_checkpoint, img_size=img_size, patch_size=patch_size,
                     resi_connection=resi_connection))
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = make_resi_conv(embed_dim, resi_connection)
        # 3. reconstruction
        if upsampler == 'pixelshuffle':
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        elif upsampler == 'pixelshuffledirect':
            self.upsample = UpsampleOneStep(upscale, embed_dim, in_chans)
        elif upsampler == 'nearest+conv':
            if upscale != 4:
                raise ValueError(f"HAT: upsampler 'nearest+conv' supports upscale 4 only, got {upscale}.")
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        self.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    def attention_mask(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Shifted-window mask for an (h, w) feature map, cached (LRU, a few sizes)."""
        if is_symbolic(h, w):  # symbolic size (dynamic export): built in the graph
            return shifted_window_mask(h, w, self.window_size, self.shift_size, device).to(dtype=dtype)
        key = (h, w, str(device), dtype)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = shifted_window_mask(h, w, self.window_size, self.shift_size).to(device=device, dtype=dtype)
            self._mask_cache[key] = mask
            while len(self._mask_cache) > _MASK_CACHE_SIZE:
                self._mask_cache.popitem(last=False)
        else:
            self._mask_cache.move_to_end(key)
        return mask

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, H, W) -> (B, embed_dim, H, W); H, W multiples of window_size."""
        x_size = (x.shape[2], x.shape[3])
        attn_mask = self.attention_mask(x_size[0], x_size[1], x.device, x.dtype)
        x = self.patch_embed(x)
        if self.ape:
            x = x + self._pos_embed(x_size)
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size, self.relative_position_index_SA, self.relative_position_index_OCA, attn_mask)
        x = self.norm(x)
        return self.patch_unembed(x, x_size)

    def _pos_embed(self, x_size: Tuple[int, int]) -> torch.Tensor:
        """Absolute position embedding (1, H*W, C), bicubically resized when (H, W) is not img_size."""
        ph, pw = self.patches_resolution
        symbolic = is_symbolic(*x_size)  # dynamic export: no branch on the size
        if not symbolic and tuple(x_size) == (ph, pw):
            return self.absolute_pos_embed
        grid = self.absolute_pos_embed.transpose(1, 2).reshape(1, self.embed_dim, ph, pw)
        grid = F.interpolate(grid, size=x_size, mode='bicubic', align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, upscale*H, upscale*W) (upscale 1 when upsampler is '')."""
        h, w = x.shape[-2:]
        x, _ = pad_to_multiple(x, self.window_size)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        if self.upsampler == '':
            x_first = self.conv_first(x)
            x = x + self.conv_last(self.conv_after_body(self.forward_features(x_first)) + x_first)
            scale = 1
        else:
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            if self.upsampler == 'pixelshuffle':
                x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
            elif self.upsampler == 'pixelshuffledirect':
                x = self.upsample(x)
            else:  # nearest+conv
                x = self.conv_before_upsample(x)
                x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode='nearest')))
                x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode='nearest')))
                x = self.conv_last(self.lrelu(self.conv_hr(x)))
            scale = self.upscale
        x = x / self.img_range + mean
        return crop_to(x, h * scale, w * scale)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; with ``strict=True`` a mismatch raises one RuntimeError
        naming the keys and the network_g options that probably differ. Missing relative position
        index buffers (older official checkpoints) are filled with the recomputed indices."""
        state_dict = OrderedDict(state_dict)
        own = self.state_dict()
        for key in RPI_KEYS:
            if key not in state_dict:
                state_dict[key] = own[key]
        message = describe_mismatch(self, state_dict, source='the state dict', strict=strict)  # the one report
        if message:
            raise RuntimeError(message)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
