"""Building blocks of HAT (Chen et al., "Activating More Pixels in Image Super-Resolution
Transformer", CVPR 2023): window attention, the hybrid attention block (HAB), the overlapping
cross-attention block (OCAB) and the residual hybrid attention group (RHAG).

Module and parameter names follow the official checkpoints (XPixelGroup/HAT) so released
weights load with ``strict=True``. Tokens are (B, H*W, C) with H, W multiples of the window
size; :class:`mambacsr_arch.archs.hat.arch.HAT` pads to that before calling these blocks.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from basicsr.archs.arch_util import trunc_normal_
from basicsr.archs.swinir_arch import DropPath, Mlp, window_partition
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from ..layers import CAB, PatchEmbed, PatchUnEmbed, make_resi_conv


def window_reverse(windows: torch.Tensor, window_size: int, h, w) -> torch.Tensor:
    """(B*nw, ws, ws, C) windows -> (B, H, W, C): the inverse of ``window_partition``.

    BasicSR's ``window_reverse`` computes B as ``int(windows / (H*W/ws/ws))``: a graph exporter then
    fixes B at its traced value, and with ``-1`` as the channel count a dynamic-batch ONNX model
    reshuffled channels at any other batch (silently: 1e-4 to 1e-2 off). Here B is the ``-1``.
    """
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
            dropout_p: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v through PyTorch's fused attention.

    q: (..., Nq, d), k/v: (..., Nk, d), bias broadcastable to (..., Nq, Nk). Returns (..., Nq, d).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=scale)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows with a relative position bias.

    Input (num_windows*B, N, C) with N = window_size**2; output the same shape.
    Keys: ``relative_position_bias_table`` ((2*ws-1)**2, heads), ``qkv``, ``proj``.
    """

    def __init__(self, dim: int, window_size: Tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads)**-0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def forward(self, x: torch.Tensor, rpi: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (nw*B, N, C); rpi: (N, N) long; mask: (nw, N, N) additive (0 / -100) or None."""
        b_, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[rpi.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
        if mask is not None:  # windows of one image share the mask: the bias repeats per image of the batch
            nw = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # (nw, heads, N, N)
            # 4-D q/k/v and bias (b_ = B * nw, window-major per image): the ONNX exporter takes no 5-D attention
            bias = bias.unsqueeze(0).expand(b_ // nw, nw, heads, n, n).reshape(b_, heads, n, n)
        out = _attend(q, k, v, bias, self.scale, self.attn_drop if self.training else 0.)
        out = out.reshape(b_, heads, n, c // heads).transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(out))


class HAB(nn.Module):
    """Hybrid attention block: (shifted) window attention + conv_scale * CAB, then an MLP.

    (B, H*W, C) -> (B, H*W, C). Keys: ``norm1``, ``attn``, ``conv_block``, ``norm2``, ``mlp``.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, compress_ratio: int = 3, squeeze_factor: int = 30, conv_scale: float = 0.01,
                 mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., act_layer: Type[nn.Module] = nn.GELU,
                 norm_layer: Type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size = window_size
        # As in the official code: no shifted windows when the nominal resolution fits one window.
        self.shift_size = 0 if min(input_resolution) <= window_size else shift_size
        if not 0 <= self.shift_size < window_size:
            raise ValueError(f'HAB: shift_size {shift_size} must lie in [0, window_size={window_size}).')
        self.conv_scale = conv_scale
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, (window_size, window_size), num_heads, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.conv_block = CAB(num_feat=dim, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int], rpi_sa: torch.Tensor,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, H*W, C); attn_mask: (nw, N, N) for the shifted windows at this (H, W)."""
        h, w = x_size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)

        conv_x = self.conv_block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, h * w, c)

        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, rpi=rpi_sa, mask=attn_mask if shift > 0 else None)
        attn_x = window_reverse(windows.view(-1, ws, ws, c), ws, h, w)
        if shift > 0:
            attn_x = torch.roll(attn_x, shifts=(shift, shift), dims=(1, 2))
        attn_x = attn_x.reshape(b, h * w, c)

        x = shortcut + self.drop_path(attn_x) + conv_x * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OCAB(nn.Module):
    """Overlapping cross-attention: queries from ws x ws windows, keys/values from the
    overlapping (ws + int(overlap_ratio*ws))**2 neighbourhoods (zero-padded at the borders).

    (B, H*W, C) -> (B, H*W, C). Keys: ``norm1``, ``qkv``, ``relative_position_bias_table``,
    ``proj``, ``norm2``, ``mlp``.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], window_size: int, overlap_ratio: float,
                 num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None, mlp_ratio: float = 2,
                 norm_layer: Type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads)**-0.5
        self.overlap_win_size = int(window_size * overlap_ratio) + window_size
        self.norm1 = norm_layer(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.unfold = nn.Unfold(kernel_size=(self.overlap_win_size, self.overlap_win_size), stride=window_size,
                                padding=(self.overlap_win_size - window_size) // 2)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((window_size + self.overlap_win_size - 1)**2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=.02)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int], rpi: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W, C); rpi: (ws*ws, ows*ows) long."""
        h, w = x_size
        b, _, c = x.shape
        ws, ows, heads = self.window_size, self.overlap_win_size, self.num_heads
        d = c // heads
        shortcut = x
        qkv = self.qkv(self.norm1(x)).view(b, h, w, 3, c)
        q = qkv[..., 0, :].contiguous()  # (B, H, W, C)
        kv = qkv[..., 1:, :].permute(0, 3, 4, 1, 2).reshape(b, 2 * c, h, w)  # channels: k then v

        q = window_partition(q, ws).reshape(-1, ws * ws, heads, d).transpose(1, 2)  # (B*nw, heads, ws*ws, d)
        kv = self.unfold(kv)  # (B, 2*C*ows*ows, nw), channel index = (k|v, c, row, col)
        nw = kv.shape[-1]
        kv = kv.view(b, 2, heads, d, ows * ows, nw).permute(1, 0, 5, 2, 4, 3).reshape(2, b * nw, heads, ows * ows, d)
        bias = self.relative_position_bias_table[rpi.reshape(-1)].reshape(ws * ws, ows * ows, heads).permute(2, 0, 1)
        out = _attend(q, kv[0], kv[1], bias, self.scale, 0.)  # (B*nw, heads, ws*ws, d)
        out = out.transpose(1, 2).reshape(-1, ws, ws, c)
        x = window_reverse(out, ws, h, w).reshape(b, h * w, c)

        x = self.proj(x) + shortcut
        return x + self.mlp(self.norm2(x))


class AttenBlocks(nn.Module):
    """``depth`` HABs (every second one shifted by ws // 2) then one OCAB. Keys: ``blocks``, ``overlap_attn``."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, num_heads: int, window_size: int,
                 compress_ratio: int, squeeze_factor: int, conv_scale: float, overlap_ratio: float,
                 mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.,
                 attn_drop: float = 0., drop_path: Union[float, Sequence[float]] = 0.,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        drop_paths: List[float] = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            HAB(dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2, compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor, conv_scale=conv_scale, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, drop_path=drop_paths[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.overlap_attn = OCAB(dim=dim, input_resolution=input_resolution, window_size=window_size,
                                 overlap_ratio=overlap_ratio, num_heads=num_heads, qkv_bias=qkv_bias,
                                 qk_scale=qk_scale, mlp_ratio=mlp_ratio, norm_layer=norm_layer)

    def _run(self, module: nn.Module, *args) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch_checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int], rpi_sa: torch.Tensor, rpi_oca: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = self._run(blk, x, x_size, rpi_sa, attn_mask)
        return self._run(self.overlap_attn, x, x_size, rpi_oca)





class RHAG(nn.Module):
    """Residual hybrid attention group: AttenBlocks, a conv on the feature map, plus the input.

    (B, H*W, C) -> (B, H*W, C). Keys: ``residual_group``, ``conv``.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, num_heads: int, window_size: int,
                 compress_ratio: int, squeeze_factor: int, conv_scale: float, overlap_ratio: float,
                 mlp_ratio: float = 4., qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.,
                 attn_drop: float = 0., drop_path: Union[float, Sequence[float]] = 0.,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, use_checkpoint: bool = False, img_size=224,
                 patch_size=4, resi_connection: str = '1conv') -> None:
        super().__init__()
        self.dim = dim
        self.residual_group = AttenBlocks(
            dim=dim, input_resolution=input_resolution, depth=depth, num_heads=num_heads, window_size=window_size,
            compress_ratio=compress_ratio, squeeze_factor=squeeze_factor, conv_scale=conv_scale,
            overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
            attn_drop=attn_drop, drop_path=drop_path, norm_layer=norm_layer, use_checkpoint=use_checkpoint)
        self.conv = make_resi_conv(dim, resi_connection)
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=0, embed_dim=dim)
        self.patch_unembed = PatchUnEmbed(img_size=img_size, patch_size=patch_size, in_chans=0, embed_dim=dim)

    def forward(self, x: torch.Tensor, x_size: Tuple[int, int], rpi_sa: torch.Tensor, rpi_oca: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        y = self.residual_group(x, x_size, rpi_sa, rpi_oca, attn_mask)
        return self.patch_embed(self.conv(self.patch_unembed(y, x_size))) + x
