"""Inference on images of any size: padding to the arch's multiple, overlapping tiles, official protocol.

Public entry point: :func:`restore_image`, used by the model classes' ``test()`` and by
``basicsr infer``. All sizes are in pixels; ``tile_size``/``tile_overlap`` are in LR (input) pixels.

Tiled mode: tiles of ``tile_size`` LR px overlapping by at least ``tile_overlap`` px (the last tile
in each row/column is aligned to the image border, so it may overlap more). Each tile is padded
to ``pad_multiple`` on its own and restored; the outputs are blended with weights that ramp
linearly (in HR px) over the overlap towards a neighbouring tile and stay 1 at image borders, so
seams are hidden and every output pixel is a convex combination of tile outputs.

Official protocol (``official_protocol=True``) reproduces renyulin-f/MambaCSR's
``MambaCSRModel.test`` so published numbers can be re-checked: the image is cut into
``h // 192 + 1`` by ``w // 192 + 1`` chops (after reflect-padding H and W to a multiple of those
counts), neighbouring chops overlap by a quarter of the chop size, each chop is flip-padded
(mirrored copy appended, edge pixel repeated) to ``(n // 64 + 1) * 64`` (i.e. always at least one
extra pixel, up to a full 64), and each chop's centre part is pasted into the output without
blending. Deviation: where the official code would run out of mirror (chop smaller than its pad),
we keep mirroring periodically instead of producing a wrongly sized chop.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..archs.layers import pad_to_multiple

# Default automatic-tiling budget in LR pixels: the standard benchmarks (DIV2K-val at x4 is at most
# 510x510 LR) still run as whole images; anything larger is tiled.
DEFAULT_MAX_PIXELS = 512 * 512
DEFAULT_AUTO_TILE = 256
OFFICIAL_CHOP = 192  # LR px, official MambaCSR test chop size
OFFICIAL_PAD = 64  # official `padding_size`


def _forward_padded(net: nn.Module, x: torch.Tensor, scale: int, pad_multiple: int) -> torch.Tensor:
    """Pad (B, C, h, w) to ``pad_multiple`` (reflect, replicate for tiny inputs), run, crop to h*scale."""
    h, w = x.shape[-2:]
    if pad_multiple > 1:
        x, _ = pad_to_multiple(x, pad_multiple)
    out = net(x)
    expected = (x.shape[-2] * scale, x.shape[-1] * scale)
    if tuple(out.shape[-2:]) != expected:
        raise ValueError(f'network output {tuple(out.shape[-2:])} for input {tuple(x.shape[-2:])} is not '
                         f'{expected}: check `scale` ({scale}) against the network\'s `upscale`.')
    return out[..., :h * scale, :w * scale].float()


def _tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` overlapping by >= ``overlap``."""
    if length <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(length: int, ramp_len: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D blending weights of ``length``: linear ramps (0, 1] of ``ramp_len`` at the flagged ends, else 1."""
    weight = torch.ones(length)
    ramp_len = min(ramp_len, length)
    if ramp_len > 0:
        ramp = (torch.arange(ramp_len, dtype=torch.float32) + 0.5) / ramp_len
        if ramp_start:
            weight[:ramp_len] = torch.minimum(weight[:ramp_len], ramp)
        if ramp_end:
            weight[length - ramp_len:] = torch.minimum(weight[length - ramp_len:], ramp.flip(0))
    return weight


def _restore_tiled(net: nn.Module, lq: torch.Tensor, scale: int, tile: int, overlap: int,
                   pad_multiple: int) -> torch.Tensor:
    """Overlapping tiles blended with linear ramps; (B, C, h, w) -> (B, C, h*scale, w*scale)."""
    b, _, h, w = lq.shape
    tile_h, tile_w = min(tile, h), min(tile, w)
    overlap = max(0, min(overlap, tile - 1))
    ys, xs = _tile_starts(h, tile_h, overlap), _tile_starts(w, tile_w, overlap)
    out = None
    weight_sum = torch.zeros(1, 1, h * scale, w * scale, device=lq.device)
    for y in ys:
        for x in xs:
            patch = _forward_padded(net, lq[..., y:y + tile_h, x:x + tile_w], scale, pad_multiple)
            if out is None:
                out = torch.zeros(b, patch.shape[1], h * scale, w * scale, device=lq.device)
            wy = _ramp(tile_h * scale, overlap * scale, y > 0, y + tile_h < h)
            wx = _ramp(tile_w * scale, overlap * scale, x > 0, x + tile_w < w)
            weight = (wy[:, None] * wx[None, :]).to(lq.device)[None, None]
            ty, tx = slice(y * scale, (y + tile_h) * scale), slice(x * scale, (x + tile_w) * scale)
            out[..., ty, tx] += patch * weight
            weight_sum[..., ty, tx] += weight
    return out / weight_sum


def _flip_pad(x: torch.Tensor, target: int, dim: int) -> torch.Tensor:
    """Extend ``dim`` to ``target`` by appending mirrored copies (official `cat([x, flip(x)])`)."""
    while x.shape[dim] < target:
        x = torch.cat([x, torch.flip(x, [dim])], dim)
    return x.narrow(dim, 0, target)


def _official_slices(n: int, parts: int, split: int, shave: int) -> List[Tuple[slice, slice]]:
    """Per part: (input slice with overlap, slice of that chop's output kept), both in LR px."""
    result = []
    for i in range(parts):
        lo = i * split - (shave if i > 0 else 0)
        hi = (i + 1) * split + (shave if i < parts - 1 else 0)
        keep_lo = shave if i > 0 else 0
        result.append((slice(lo, hi), slice(keep_lo, keep_lo + split)))
    return result


def _restore_official(net: nn.Module, lq: torch.Tensor, scale: int, chop: int = OFFICIAL_CHOP,
                      padding_size: int = OFFICIAL_PAD) -> torch.Tensor:
    """renyulin-f/MambaCSR's chop-and-paste test; (B, C, h, w) -> (B, C, h*scale, w*scale)."""
    b, _, h, w = lq.shape
    parts_h, parts_w = h // chop + 1, w // chop + 1
    pad_h, pad_w = (-h) % parts_h, (-w) % parts_w
    img = lq
    if pad_h or pad_w:
        img = torch.nn.functional.pad(lq, (0, pad_w, 0, pad_h), mode='reflect')
    big_h, big_w = img.shape[-2:]
    split_h, split_w = big_h // parts_h, big_w // parts_w
    rows = _official_slices(big_h, parts_h, split_h, split_h // 4)
    cols = _official_slices(big_w, parts_w, split_w, split_w // 4)
    out = None
    for i, (rin, rkeep) in enumerate(rows):
        for j, (cin, ckeep) in enumerate(cols):
            piece = img[..., rin, cin]
            ph, pw = piece.shape[-2:]
            piece = _flip_pad(piece, (ph // padding_size + 1) * padding_size, 2)
            piece = _flip_pad(piece, (pw // padding_size + 1) * padding_size, 3)
            res = net(piece)[..., :ph * scale, :pw * scale].float()
            if out is None:
                out = torch.zeros(b, res.shape[1], big_h * scale, big_w * scale, device=lq.device)
            out[..., i * split_h * scale:(i + 1) * split_h * scale, j * split_w * scale:(j + 1) * split_w * scale] = \
                res[..., rkeep.start * scale:rkeep.stop * scale, ckeep.start * scale:ckeep.stop * scale]
    return out[..., :h * scale, :w * scale]


def restore_image(net: nn.Module, lq: torch.Tensor, scale: int, *, tile_size: Optional[int] = None,
                  tile_overlap: int = 32, pad_multiple: int = 1, official_protocol: bool = False,
                  max_pixels: Optional[int] = None, official_chop: int = OFFICIAL_CHOP,
                  official_padding_size: int = OFFICIAL_PAD,
                  amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Super-resolve ``lq`` of any size with ``net``.

    Runs under ``torch.no_grad()`` (inside); does not change ``net.train()``/``eval()`` mode, so
    callers put the net in eval mode themselves.

    Args:
        net: maps (B, C, H, W) -> (B, C', H*scale, W*scale) for H, W multiples of ``pad_multiple``.
        lq: (B, C, h, w) float input, range as the net expects (usually [0, 1]).
        scale: upscaling factor of ``net``.
        tile_size: LR tile size in px; None = whole image unless ``h*w > max_pixels``.
        tile_overlap: minimum overlap between neighbouring tiles, LR px.
        pad_multiple: the arch's required input multiple (window / scan size); inputs are padded
            at the bottom/right (reflect; replicate when the image is smaller than the pad).
        official_protocol: reproduce the official MambaCSR chop test (see module docstring);
            ``tile_size``/``pad_multiple``/``max_pixels`` are then ignored.
        max_pixels: automatic tiling budget (LR px per forward); None = ``DEFAULT_MAX_PIXELS``,
            0 = never tile automatically. Auto tiles are ``DEFAULT_AUTO_TILE`` px, or smaller to fit.
        official_chop, official_padding_size: official protocol constants (192, 64).
        amp_dtype: optional ``torch.autocast`` dtype (bf16/fp16) for the forward passes.

    Returns:
        (B, C', h*scale, w*scale) float32 tensor on ``lq``'s device.
    """
    if lq.dim() != 4:
        raise ValueError(f'restore_image expects lq of shape (B, C, h, w), got {tuple(lq.shape)}')
    if scale < 1 or pad_multiple < 1:
        raise ValueError(f'scale ({scale}) and pad_multiple ({pad_multiple}) must be >= 1')
    h, w = lq.shape[-2:]
    if tile_size is None and not official_protocol:
        budget = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        if budget and h * w > budget:
            tile_size = min(DEFAULT_AUTO_TILE, max(int(math.isqrt(budget)), 2 * tile_overlap + 1))
    if tile_size is not None and tile_size <= tile_overlap:
        raise ValueError(f'tile size ({tile_size}) must exceed tile overlap ({tile_overlap}): set val.tile.size '
                         f'larger or val.tile.overlap smaller in the option file.')
    autocast = (torch.autocast(device_type=lq.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        if official_protocol:
            return _restore_official(net, lq, scale, official_chop, official_padding_size)
        if tile_size is None or (h <= tile_size and w <= tile_size):
            return _forward_padded(net, lq, scale, pad_multiple)
        return _restore_tiled(net, lq, scale, tile_size, tile_overlap, pad_multiple)


def tile_grid(h: int, w: int, tile_size: int, tile_overlap: int) -> Sequence[Tuple[int, int]]:
    """Top-left corners (y, x) of the tiles :func:`restore_image` uses for an h x w LR image."""
    th, tw = min(tile_size, h), min(tile_size, w)
    overlap = max(0, min(tile_overlap, tile_size - 1))
    return [(y, x) for y in _tile_starts(h, th, overlap) for x in _tile_starts(w, tw, overlap)]
