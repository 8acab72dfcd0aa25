"""Token orders for dual-interleaved (DIS) and cross-scale scanning of 2-D feature maps.

This module knows nothing about state-space models: it only turns a (B, C, H, W) feature map
into a (B, C, L) token sequence and back, with pure reshapes/permutes (no index gathers).

Direction names (as in the official MambaCSR option files and code):

* ``wK``: tokens of K x K windows; windows in row-major order, row-major inside each window.
* ``c_wK``: the same column-first (windows column-major, column-major inside each window).
* suffix ``_flip``: the whole sequence reversed.
* ``h`` / ``v`` (and ``_flip``): plain raster scans (one window covering the whole map), row-major
  or column-major; kept for parity with the official ``MultiScan`` (unused by MambaCSR).

A map whose size is not a multiple of K is zero-padded at the bottom/right to the next multiple
for the scan (so the sequence has ``ceil(H/K)*K * ceil(W/K)*K`` tokens); merging drops the padding.
:func:`window_merge` is the exact inverse of :func:`window_scan` for every H, W >= 1.

Cross-scale (position-aligned) scanning interleaves a high-resolution map ``x`` (window K) with its
half-resolution counterpart ``x_down`` (window K/2): every low-resolution token is followed by the
2 x 2 high-resolution tokens it covers, i.e. groups of 5 tokens ``[low, high x 4]``. ``_flip``
reverses the low and high sequences separately (the official behaviour), so each group keeps its
low token first. Only the high-resolution part is recovered by :func:`cross_scale_merge`.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'Direction', 'parse_direction', 'window_scan', 'window_merge', 'cross_scale_scan', 'cross_scale_merge',
    'scan_length', 'cross_scale_length'
]

_WINDOW_RE = re.compile(r'^(c_)?w(\d+)(_flip)?$')
_RASTER_RE = re.compile(r'^([hv])(_flip)?$')


class Direction(NamedTuple):
    """A parsed scan direction.

    ``window``: window side K in tokens (``None`` for a raster scan over the whole map);
    ``column_first``: column-major windows and tokens; ``flip``: reversed sequence;
    ``kind``: ``'window'`` (``wK``/``c_wK``) or ``'raster'`` (``h``/``v``).
    """
    window: Optional[int]
    column_first: bool
    flip: bool
    kind: str


def parse_direction(name: str) -> Direction:
    """Parse ``'w8'``, ``'c_w64_flip'``, ``'h'``, ``'v_flip'``... into a :class:`Direction`."""
    if not isinstance(name, str):
        raise TypeError(f'scan direction must be a string like "w8" or "c_w8_flip", got {name!r}')
    match = _WINDOW_RE.match(name)
    if match is not None:
        window = int(match.group(2))
        if window < 1:
            raise ValueError(f'scan direction {name!r}: window size must be >= 1')
        return Direction(window, match.group(1) is not None, match.group(3) is not None, 'window')
    match = _RASTER_RE.match(name)
    if match is not None:
        return Direction(None, match.group(1) == 'v', match.group(2) is not None, 'raster')
    raise ValueError(f'unknown scan direction {name!r}; expected "wK", "c_wK" (K an integer), "h" or "v", '
                     f'optionally with the suffix "_flip"')


def _window_hw(window: Optional[int], size: Tuple[int, int]) -> Tuple[int, int]:
    """Window (height, width); ``None`` means one window covering the whole map."""
    if window is None:
        return size[0], size[1]
    if window < 1:
        raise ValueError(f'window must be >= 1, got {window}')
    return window, window


def _padded(size: int, window: int) -> int:
    return -(-size // window) * window


def scan_length(size: Sequence[int], window: Optional[int]) -> int:
    """Number of tokens :func:`window_scan` produces for a (H, W) map: padded H * padded W."""
    wh, ww = _window_hw(window, (size[0], size[1]))
    return _padded(size[0], wh) * _padded(size[1], ww)


def _pad_bottom_right(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    pad_h, pad_w = height - x.shape[-2], width - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def _window_view(x: torch.Tensor, window: Optional[int], column_first: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> zero-padded, permuted 6-D view whose row-major flattening of dims 2.. is the
    (unflipped) :func:`window_scan` order. No copy unless padding is needed."""
    b, c, h, w = x.shape
    wh, ww = _window_hw(window, (h, w))
    hp, wp = _padded(h, wh), _padded(w, ww)
    x = _pad_bottom_right(x, hp, wp)
    x = x.reshape(b, c, hp // wh, wh, wp // ww, ww)  # (B, C, Hg, wh, Wg, ww)
    if column_first:
        return x.permute(0, 1, 4, 2, 5, 3)  # (B, C, Wg, Hg, ww, wh)
    return x.permute(0, 1, 2, 4, 3, 5)  # (B, C, Hg, Wg, wh, ww)


def window_scan(x: torch.Tensor, window: Optional[int], column_first: bool = False, flip: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, L) tokens of windows (see the module docstring for the order).

    ``window=None`` scans the whole map as one window (plain raster). L = padded H * padded W.
    """
    if x.dim() != 4:
        raise ValueError(f'window_scan expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}')
    b, c = x.shape[:2]
    x = _window_view(x, window, column_first)
    x = x.reshape(b, c, x.shape[2:].numel())
    return x.flip(-1) if flip else x


def _channels_last(perm: Tuple[int, ...]) -> Tuple[int, ...]:
    """A (B, C, ...) -> (B, C, spatial...) permutation turned into (B, spatial..., C)."""
    return (0, ) + perm[2:] + (1, )


def window_merge(seq: torch.Tensor, window: Optional[int], size: Sequence[int], column_first: bool = False,
                 flip: bool = False, *, channels_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`window_scan`: (B, C, L) -> (B, C, H, W) with ``size = (H, W)``, padding dropped.

    ``channels_last=True`` returns (B, H, W, C) instead, in one copy (what token-wise layers want).
    """
    if seq.dim() != 3:
        raise ValueError(f'window_merge expects a (B, C, L) tensor, got shape {tuple(seq.shape)}')
    h, w = int(size[0]), int(size[1])
    b, c, length = seq.shape
    wh, ww = _window_hw(window, (h, w))
    hp, wp = _padded(h, wh), _padded(w, ww)
    if length != hp * wp:
        raise ValueError(f'window_merge: sequence length {length} does not match size {(h, w)} with window '
                         f'{window} (expected {hp * wp} tokens)')
    if flip:
        seq = seq.flip(-1)
    if column_first:
        x, perm = seq.reshape(b, c, wp // ww, hp // wh, ww, wh), (0, 1, 3, 5, 2, 4)
    else:
        x, perm = seq.reshape(b, c, hp // wh, wp // ww, wh, ww), (0, 1, 2, 4, 3, 5)
    if channels_last:
        x = x.permute(_channels_last(perm)).reshape(b, hp, wp, c)
        return x[:, :h, :w] if hp != h or wp != w else x
    x = x.permute(perm).reshape(b, c, hp, wp)
    return x[:, :, :h, :w] if hp != h or wp != w else x


def _cross_grid(size: Sequence[int], window: int) -> Tuple[int, int, int]:
    """(padded H, padded W, low-res window) for a cross-scale scan of a (H, W) map."""
    if window < 2 or window % 2:
        raise ValueError(f'cross-scale window must be an even integer >= 2, got {window}')
    return _padded(int(size[0]), window), _padded(int(size[1]), window), window // 2


def cross_scale_length(size: Sequence[int], window: int) -> int:
    """Number of tokens :func:`cross_scale_scan` produces for a (H, W) high-resolution map."""
    hp, wp, _ = _cross_grid(size, window)
    return hp * wp // 4 * 5


def _cross_high_view(x: torch.Tensor, window: int, column_first: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> zero-padded, permuted 8-D view (B, C, G1, G2, k1, k2, 2, 2) whose flattening of
    dims 2..5 gives the low-resolution token index and of dims 6..7 the 2 x 2 high-resolution slot
    (unflipped :func:`cross_scale_scan` order)."""
    b, c, h, w = x.shape
    hp, wp, k = _cross_grid((h, w), window)
    hg, wg = hp // window, wp // window
    high = _pad_bottom_right(x, hp, wp).reshape(b, c, hg, k, 2, wg, k, 2)  # (hg, a, dy, wg, c, dx)
    if column_first:
        return high.permute(0, 1, 5, 2, 6, 3, 7, 4)  # windows (wg, hg), blocks (c, a), inside (dx, dy)
    return high.permute(0, 1, 2, 5, 3, 6, 4, 7)  # windows (hg, wg), blocks (a, c), inside (dy, dx)


def _check_cross_inputs(x: torch.Tensor, x_down: torch.Tensor, window: int) -> None:
    if x.dim() != 4 or x_down.dim() != 4:
        raise ValueError(f'cross_scale_scan expects (B, C, H, W) tensors, got {tuple(x.shape)} and '
                         f'{tuple(x_down.shape)}')
    hp, wp, k = _cross_grid(x.shape[2:], window)
    if x_down.shape[:2] != x.shape[:2] or _padded(x_down.shape[2], k) * 2 != hp or \
            _padded(x_down.shape[3], k) * 2 != wp:
        raise ValueError(f'cross_scale_scan: low-resolution map {tuple(x_down.shape)} is not aligned with the '
                         f'high-resolution map {tuple(x.shape)} for window {window}; use x_down of size '
                         f'(ceil(H/2), ceil(W/2))')


def cross_scale_scan(x: torch.Tensor, x_down: torch.Tensor, window: int, column_first: bool = False,
                     flip: bool = False) -> torch.Tensor:
    """Interleave (B, C, H, W) ``x`` (window K) and (B, C, h, w) ``x_down`` (window K/2) -> (B, C, 5 L/4).

    Groups of 5 tokens: one low-resolution token then its 2 x 2 position-aligned high-resolution
    tokens (row-major inside the 2 x 2 block, column-major when ``column_first``). Both maps are
    zero-padded to the same window grid: ``ceil(h / (K/2))`` must equal ``ceil(H / K)`` (true for
    h = ceil(H/2) and for h = H/2 with H even), same for widths.
    """
    _check_cross_inputs(x, x_down, window)
    b, c = x.shape[:2]
    high = _cross_high_view(x, window, column_first)
    high = high.reshape(b, c, high.shape[2:6].numel(), 4)
    low = window_scan(x_down, window // 2, column_first=column_first)
    if flip:
        high = high.flip((-2, -1))
        low = low.flip(-1)
    return torch.cat((low.unsqueeze(-1), high), dim=-1).reshape(b, c, -1)


def _cross_high_merge(high: torch.Tensor, window: int, size: Sequence[int], column_first: bool = False,
                      channels_last: bool = False) -> torch.Tensor:
    """(B, C, G, 4) high-resolution tokens in unflipped cross-scale order -> (B, C, H, W) (or (B, H, W, C))."""
    h, w = int(size[0]), int(size[1])
    b, c = high.shape[:2]
    hp, wp, k = _cross_grid((h, w), window)
    hg, wg = hp // window, wp // window
    if column_first:
        x, perm = high.reshape(b, c, wg, hg, k, k, 2, 2), (0, 1, 3, 5, 7, 2, 4, 6)
    else:
        x, perm = high.reshape(b, c, hg, wg, k, k, 2, 2), (0, 1, 2, 4, 6, 3, 5, 7)
    if channels_last:
        x = x.permute(_channels_last(perm)).reshape(b, hp, wp, c)
        return x[:, :h, :w] if hp != h or wp != w else x
    x = x.permute(perm).reshape(b, c, hp, wp)
    return x[:, :, :h, :w] if hp != h or wp != w else x


def cross_scale_merge(seq: torch.Tensor, window: int, size: Sequence[int], column_first: bool = False,
                      flip: bool = False, *, channels_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`cross_scale_scan` for the high-resolution part: (B, C, L) -> (B, C, H, W).

    ``channels_last=True`` returns (B, H, W, C) instead.
    """
    if seq.dim() != 3:
        raise ValueError(f'cross_scale_merge expects a (B, C, L) tensor, got shape {tuple(seq.shape)}')
    h, w = int(size[0]), int(size[1])
    b, c, length = seq.shape
    hp, wp, _ = _cross_grid((h, w), window)
    if length != hp * wp // 4 * 5:
        raise ValueError(f'cross_scale_merge: sequence length {length} does not match size {(h, w)} with window '
                         f'{window} (expected {hp * wp // 4 * 5} tokens)')
    high = seq.reshape(b, c, length // 5, 5)[..., 1:]
    if flip:
        high = high.flip((-2, -1))
    return _cross_high_merge(high, window, (h, w), column_first, channels_last)


# ----------------------------------------------------------------------------- channels-last token helpers
# Reordering whole channel vectors (B, ..., C) is a row copy; the (B, C, L) <-> (B, L, C) transpose is
# done separately, once. These private helpers serve SS2D's fast paths; the public functions above
# define the orders.


def _cross_high_view_nhwc(x: torch.Tensor, window: int, column_first: bool = False) -> torch.Tensor:
    """(B, H, W, C) -> zero-padded, permuted view (B, G1, G2, k1, k2, 2, 2, C) in unflipped cross-scale order."""
    b, h, w, c = x.shape
    hp, wp, k = _cross_grid((h, w), window)
    if hp != h or wp != w:
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    high = x.reshape(b, hp // window, k, 2, wp // window, k, 2, c)  # (hg, a, dy, wg, cc, dx)
    if column_first:
        return high.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (wg, hg, cc, a, dx, dy)
    return high.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (hg, wg, a, cc, dy, dx)


def _window_view_nhwc(x: torch.Tensor, window: Optional[int], column_first: bool = False) -> torch.Tensor:
    """(B, H, W, C) -> zero-padded, permuted view (B, G1, G2, w1, w2, C) in unflipped window-scan order."""
    b, h, w, c = x.shape
    wh, ww = _window_hw(window, (h, w))
    hp, wp = _padded(h, wh), _padded(w, ww)
    if hp != h or wp != w:
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    x = x.reshape(b, hp // wh, wh, wp // ww, ww, c)
    if column_first:
        return x.permute(0, 3, 1, 4, 2, 5)
    return x.permute(0, 1, 3, 2, 4, 5)


def _window_merge_tokens(tokens: torch.Tensor, window: Optional[int], size: Sequence[int],
                         column_first: bool = False) -> torch.Tensor:
    """(B, L, C) tokens in unflipped window-scan order -> (B, H, W, C), padding dropped."""
    h, w = int(size[0]), int(size[1])
    b, _, c = tokens.shape
    wh, ww = _window_hw(window, (h, w))
    hp, wp = _padded(h, wh), _padded(w, ww)
    if column_first:
        x = tokens.reshape(b, wp // ww, hp // wh, ww, wh, c).permute(0, 2, 4, 1, 3, 5)
    else:
        x = tokens.reshape(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, c)
    return x[:, :h, :w] if hp != h or wp != w else x


def _cross_high_merge_tokens(tokens: torch.Tensor, window: int, size: Sequence[int],
                             column_first: bool = False) -> torch.Tensor:
    """(B, G, 4, C) high-resolution tokens in unflipped cross-scale order -> (B, H, W, C)."""
    h, w = int(size[0]), int(size[1])
    b, c = tokens.shape[0], tokens.shape[-1]
    hp, wp, k = _cross_grid((h, w), window)
    hg, wg = hp // window, wp // window
    if column_first:
        x = tokens.reshape(b, wg, hg, k, k, 2, 2, c).permute(0, 2, 4, 6, 1, 3, 5, 7)
    else:
        x = tokens.reshape(b, hg, wg, k, k, 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b, hp, wp, c)
    return x[:, :h, :w] if hp != h or wp != w else x
