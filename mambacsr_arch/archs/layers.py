"""Small layers shared by MambaCSR and HAT, named as in the official checkpoints.

BasicSR already provides ``Upsample`` (conv + pixel-shuffle stack), ``to_2tuple`` and
``trunc_normal_`` in :mod:`basicsr.archs.arch_util`; import those from there.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from basicsr.archs.arch_util import trunc_normal_
from torch import nn

from ..dis import is_symbolic


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate (RCAN). (B, C, H, W) -> (B, C, H, W).

    Keys: ``attention.1`` and ``attention.3`` are the two 1x1 convolutions.
    """

    def __init__(self, num_feat: int, squeeze_factor: int = 16) -> None:
        super().__init__()
        hidden = num_feat // squeeze_factor
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, hidden, 1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_feat, 1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # attention[0] (AdaptiveAvgPool2d(1)) as a mean in x's own memory layout: for a channels-last x its
        # gradient is then channels-last too, as the product's is; autograd added an NCHW one to it at
        # several times the cost of a same-layout add (2.2 ms vs <0.5 ms at 180 x 64 x 64)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            pooled = x.permute(0, 2, 3, 1).mean((1, 2))[:, :, None, None]
        else:
            pooled = x.mean((2, 3), keepdim=True)
        return x * self.attention[1:](pooled)


class CAB(nn.Module):
    """Channel attention block: conv 3x3 (C -> C/compress), GELU, conv 3x3 back, SE gate.

    (B, C, H, W) -> (B, C, H, W). Keys: ``cab.0``, ``cab.2``, ``cab.3.attention.*``.
    """

    def __init__(self, num_feat: int, compress_ratio: int = 3, squeeze_factor: int = 30) -> None:
        super().__init__()
        hidden = num_feat // compress_ratio
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, hidden, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(hidden, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H*W, C) tokens, with an optional LayerNorm (key ``norm``).

    ``img_size``/``patch_size`` are kept for API compatibility with the official code;
    patches are always 1x1 there and here.
    """

    def __init__(self, img_size=64, patch_size=1, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Optional[type] = None) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x


class PatchUnEmbed(nn.Module):
    """(B, H*W, C) tokens -> (B, C, H, W) feature map. No parameters."""

    def __init__(self, img_size=64, patch_size=1, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Optional[type] = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, x_size[0], x_size[1])


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = 'reflect') -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Pad (B, C, H, W) at the bottom/right so H and W become multiples of ``multiple``.

    ``reflect`` needs pad < size; when the image is too small for that we fall back to
    ``replicate`` instead of failing (only for such tiny inputs).
    Returns the padded tensor and the original (H, W) for cropping the output back.
    """
    h, w = x.shape[-2:]
    # written as (multiple of ``multiple``) - size: a symbolic padded size is then visibly a multiple
    pad_h = (h + multiple - 1) // multiple * multiple - h
    pad_w = (w + multiple - 1) // multiple * multiple - w
    if is_symbolic(h, w):  # symbolic size (dynamic ONNX export): no branch on it
        return _gather_pad(_gather_pad(x, 2, h + pad_h, mode), 3, w + pad_w, mode), (h, w)
    if pad_h == 0 and pad_w == 0:
        return x, (h, w)
    if mode == 'reflect' and (pad_h >= h or pad_w >= w):
        mode = 'replicate'
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (h, w)


def crop_to(x: torch.Tensor, h, w) -> torch.Tensor:
    """The top-left (h, w) of a (..., H, W) tensor (the inverse of :func:`pad_to_multiple` on an output);
    for a symbolic size, gathers (a slice makes a graph exporter guard on the end vs the size)."""
    if not is_symbolic(h, w):
        return x[..., :h, :w]
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _gather_pad(x: torch.Tensor, dim: int, padded, mode: str) -> torch.Tensor:
    """``x`` padded at the end of ``dim`` to ``padded`` entries as one gather: the same values as
    ``F.pad`` for a symbolic size, without the size checks a graph exporter cannot prove (reflect:
    entry i >= size reads 2 (size - 1) - i, valid for pad < size, which the exporter's minimum size
    guarantees)."""
    size = x.shape[dim]
    index = torch.arange(padded, device=x.device)
    if mode == 'reflect':
        index = torch.where(index < size, index, 2 * (size - 1) - index)
    elif mode == 'replicate':
        index = index.clamp(max=size - 1)
    else:
        raise ValueError(f"pad mode must be 'reflect' or 'replicate' for a symbolic size, got {mode!r}")
    return x.index_select(dim, index)


def channels_last_weight_(conv: nn.Conv2d) -> nn.Conv2d:
    """Store ``conv.weight`` in channels-last memory format (in place; values unchanged). Returns ``conv``.

    For a conv that only ever sees channels-last inputs: its weight gradient then comes out
    channels-last, and a parameter stored the same way keeps them alike. Otherwise DDP warns
    "Grad strides do not match bucket view strides" and copies every such gradient into its bucket
    each step; a depth-wise (D, 1, k, k) weight differs only in the stride of its size-1 dim, which
    the check compares all the same. ``load_state_dict`` copies into the parameter, keeping the format.
    """
    weight = conv.weight.data
    _, i, kh, kw = weight.shape
    # explicit strides: .contiguous(memory_format=...) leaves a (D, 1, k, k) weight as it is (it already
    # counts as channels-last, size-1 dims being ignored there) but autograd's gradient has these strides
    stored = torch.empty_strided(weight.shape, (i * kh * kw, 1, kw * i, i), dtype=weight.dtype, device=weight.device)
    conv.weight.data = stored.copy_(weight)
    return conv


def make_resi_conv(dim: int, resi_connection: str) -> nn.Module:
    """Convolution closing a residual group (SwinIR/HAT/MambaIR convention).

    ``'1conv'``: one 3x3 conv; ``'3conv'``: 3x3 (dim -> dim/4), 1x1, 3x3 back, LeakyReLU(0.2)
    between (keys ``0``, ``2``, ``4``); ``'identity'``: no conv. (B, C, H, W) -> same.
    """
    if resi_connection == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == '3conv':
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1))
    if resi_connection == 'identity':
        return nn.Identity()
    raise ValueError(f"resi_connection must be '1conv', '3conv' or 'identity', got {resi_connection!r} "
                     '(network_g.resi_connection in your option file).')


def init_linear_and_norm(m: nn.Module) -> None:
    """Transformer-style init used by SwinIR, HAT and MambaCSR: apply with ``net.apply(...)``.

    Linear weights ~ trunc_normal(std 0.02) with zero bias; LayerNorm weight 1, bias 0.
    """
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)
