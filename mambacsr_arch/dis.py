"""Token orders for dual-interleaved (DIS) and cross-scale scanning of 2-D feature maps.

This module knows nothing about state-space models: it only turns a (B, C, H, W) feature map
into a (B, C, L) token sequence and back, with strided copies (no index gathers). The token-level
functions :func:`scan_tokens` / :func:`merge_tokens` and :func:`cross_scale_tokens` /
:func:`cross_scale_merge_tokens` work on channels-last maps (B, H, W, *E) and token tensors
(B, L, *E) and can write into a caller's buffer; the (B, C, ...) functions are built on them, and so
are SS2D's fast paths, so a new scan order is added here and nowhere else.

Direction names (as in the official MambaCSR option files and code):

* ``wK``: tokens of K x K windows; windows in row-major order, row-major inside each window.
* ``c_wK``: the same column-first (windows column-major, column-major inside each window).
* suffix ``_flip``: the whole sequence reversed.
* ``h`` / ``v`` (and ``_flip``): plain raster scans (one window covering the whole map), row-major
  or column-major; kept for parity with the official ``MultiScan`` (unused by MambaCSR).

Windows are **clipped at the border**: a map whose size is not a multiple of K has narrower windows in
its last window column and shorter ones in its last window row, and the sequence holds exactly the
H * W tokens of the map (no padding is scanned; a map smaller than one window is one window). For
sizes that are multiples of K this is the official order token for token. (Before 0.2 the map was
zero-padded to a multiple of K and the zeros were scanned: the same result for multiples of K, other
results and up to K*K/(H*W) times the work for the rest.) :func:`window_merge` is the exact inverse
of :func:`window_scan` for every H, W >= 1.

Cross-scale (position-aligned) scanning interleaves a high-resolution map ``x`` (window K) with its
half-resolution counterpart ``x_down`` (window K/2): every low-resolution token is followed by the
2 x 2 high-resolution tokens it covers, i.e. groups of 5 tokens ``[low, high x 4]``. ``_flip``
reverses the low and high sequences separately (the official behaviour), so each group keeps its
low token first. Only the high-resolution part is recovered by :func:`cross_scale_merge`. The
windows are clipped on the low-resolution grid (ceil(H/2) x ceil(W/2)); an odd high-resolution size
is zero-padded by one row/column to complete its 2 x 2 blocks (MambaCSR only feeds even sizes).
"""
from __future__ import annotations

import re
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = [
    'Direction', 'parse_direction', 'window_scan', 'window_merge', 'cross_scale_scan', 'cross_scale_merge',
    'scan_length', 'cross_scale_length', 'scan_tokens', 'merge_tokens', 'cross_scale_tokens',
    'cross_scale_merge_tokens', 'check_cross_inputs'
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


def _window_pieces(grid: torch.Tensor, tokens: torch.Tensor, window: Optional[int], column_first: bool
                   ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of same-shaped views (map part, token part) covering a (B, H, W, *E) ``grid`` and its
    (B, H*W, *E) ``tokens`` in window-scan order with clipped border windows.

    Row-first order: window rows top to bottom; in each, the full K x K windows left to right, then the
    narrower border window; the last (shorter) window row likewise. Column-first is row-first on the
    transposed map. Copying one side of each pair into the other scans (map -> tokens) or merges.
    """
    if column_first:
        grid = grid.transpose(1, 2)
    h, w = grid.shape[1], grid.shape[2]
    wh, ww = _window_hw(window, (h, w))
    qh, rh = divmod(h, wh)
    qw, rw = divmod(w, ww)
    rest = tuple(range(3, grid.dim()))  # trailing element dims, e.g. channels
    if qh:
        band = tokens[:, :qh * wh * w].unflatten(1, (qh, wh * w))  # one entry per full window row
        if qw:
            part = grid[:, :qh * wh, :qw * ww].unflatten(2, (qw, ww)).unflatten(1, (qh, wh))
            yield part.permute((0, 1, 3, 2, 4) + tuple(d + 2 for d in rest)), \
                band[:, :, :qw * wh * ww].unflatten(2, (qw, wh, ww))
        if rw:
            yield grid[:, :qh * wh, qw * ww:].unflatten(1, (qh, wh)), band[:, :, qw * wh * ww:].unflatten(2, (wh, rw))
    if rh:
        band = tokens[:, qh * wh * w:]
        if qw:
            part = grid[:, qh * wh:, :qw * ww].unflatten(2, (qw, ww))  # (B, rh, qw, ww, *E)
            yield part.permute((0, 2, 1, 3) + tuple(d + 1 for d in rest)), \
                band[:, :qw * rh * ww].unflatten(1, (qw, rh, ww))
        if rw:
            yield grid[:, qh * wh:, qw * ww:], band[:, qw * rh * ww:].unflatten(1, (rh, rw))


def is_symbolic(*sizes) -> bool:
    """Whether any of ``sizes`` is a symbolic size (a graph exporter tracing a dynamic height or width):
    the one test of it, for the token orders here and the padding, crops and masks of the networks."""
    return not all(isinstance(size, int) for size in sizes)


def graph_mode(*sizes) -> bool:
    """Whether token orders are built as gathers (no copies into views of a buffer): for a symbolic
    size, and whenever a graph exporter traces (copies into views become ScatterElements in ONNX,
    which took a quarter of a small MambaCSR's onnxruntime time)."""
    return is_symbolic(*sizes) or torch.compiler.is_exporting()


def _window_coords(rows: torch.Tensor, cols: torch.Tensor, h, w, window: Optional[int]) -> torch.Tensor:
    """Sequence position (row-first window order, clipped windows) of map position (rows, cols) of an
    (h, w) map, with tensor ops only: ``h``, ``w`` may be symbolic sizes."""
    if window is None:
        return rows * w + cols
    win_row, win_col = torch.div(rows, window, rounding_mode='floor'), torch.div(cols, window, rounding_mode='floor')
    band = torch.clamp(h - win_row * window, max=window)  # height of this window row (clipped at the border)
    width = torch.clamp(w - win_col * window, max=window)  # width of this window (clipped at the border)
    return (win_row * window * w + win_col * window * band + (rows - win_row * window) * width
            + cols - win_col * window)


def _sequence_sources(h, w, window: Optional[int], device: torch.device) -> torch.Tensor:
    """(h*w,) row-major map index of each token of the row-first window scan of an (h, w) map: the
    inverse of :func:`_window_coords`, computed from the token position with tensor ops."""
    seq = torch.arange(h * w, device=device)
    if window is None:
        return seq
    span = window * w  # tokens of one full window row
    win_row = torch.div(seq, span, rounding_mode='floor')
    rest = seq - win_row * span
    band = torch.clamp(h - win_row * window, max=window)
    win_col = torch.div(rest, band * window, rounding_mode='floor')  # a clipped last window starts there too
    rest = rest - win_col * window * band
    width = torch.clamp(w - win_col * window, max=window)
    row_in = torch.div(rest, width, rounding_mode='floor')
    return (win_row * window + row_in) * w + win_col * window + rest - row_in * width


def scan_tokens(grid: torch.Tensor, window: Optional[int], column_first: bool = False,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Channels-last window scan, unflipped: (B, H, W, *E) -> (B, H*W, *E) (into ``out`` if given).

    In a graph exporter's trace (:func:`graph_mode`: a symbolic H or W, or any torch.export) the order
    is one gather of indices computed with tensor ops from the size (the same tokens; no Python branch
    on the size, no copies into views of ``out``'s buffer).
    """
    b, h, w = grid.shape[:3]
    if graph_mode(h, w):
        if column_first:
            grid, h, w = grid.transpose(1, 2), w, h
        # contiguous first: flattening a strided view makes the exporter guard on the sizes (no copy in ONNX)
        tokens = grid.contiguous().flatten(1, 2).index_select(1, _sequence_sources(h, w, window, grid.device))
        if out is None:
            return tokens
        return out.copy_(tokens)
    if out is None:
        out = grid.new_empty((b, h * w) + tuple(grid.shape[3:]))
    for part, tok in _window_pieces(grid, out, window, column_first):
        tok.copy_(part)
    return out


def merge_tokens(tokens: torch.Tensor, window: Optional[int], size: Sequence[int], column_first: bool = False,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of :func:`scan_tokens`: (B, H*W, *E) -> (B, H, W, *E) (into ``out`` if given)."""
    h, w = size[0], size[1]
    if tokens.shape[1] != h * w:
        raise ValueError(f'merge: sequence length {tokens.shape[1]} does not match size {(h, w)} '
                         f'(expected {h * w} tokens)')
    if graph_mode(h, w):  # a graph exporter's trace: one gather (see scan_tokens)
        th, tw = (w, h) if column_first else (h, w)
        rows = torch.arange(th, device=tokens.device)[:, None]
        cols = torch.arange(tw, device=tokens.device)[None, :]
        grid = tokens.index_select(1, _window_coords(rows, cols, th, tw, window).flatten())
        grid = grid.unflatten(1, (th, tw))
        if column_first:
            grid = grid.transpose(1, 2)
        return grid if out is None else out.copy_(grid)
    if out is None:
        out = tokens.new_empty((tokens.shape[0], h, w) + tuple(tokens.shape[2:]))
    for part, tok in _window_pieces(out, tokens, window, column_first):
        part.copy_(tok)
    return out


def scan_length(size: Sequence[int], window: Optional[int]) -> int:
    """Number of tokens :func:`window_scan` produces for a (H, W) map: H * W (windows are clipped)."""
    _window_hw(window, (size[0], size[1]))
    return size[0] * size[1]


def window_scan(x: torch.Tensor, window: Optional[int], column_first: bool = False, flip: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H*W) tokens of windows (see the module docstring for the order).

    ``window=None`` scans the whole map as one window (plain raster).
    """
    if x.dim() != 4:
        raise ValueError(f'window_scan expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}')
    b, c, h, w = x.shape
    if graph_mode(h, w):  # a graph exporter's trace: the gather's result, no copy into a buffer
        seq = scan_tokens(x.permute(0, 2, 3, 1), window, column_first).transpose(1, 2)
        return seq.flip(-1) if flip else seq
    seq = x.new_empty((b, c, h * w))
    scan_tokens(x.permute(0, 2, 3, 1), window, column_first, out=seq.transpose(1, 2))
    return seq.flip(-1) if flip else seq


def window_merge(seq: torch.Tensor, window: Optional[int], size: Sequence[int], column_first: bool = False,
                 flip: bool = False, *, channels_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`window_scan`: (B, C, H*W) -> (B, C, H, W) with ``size = (H, W)``.

    ``channels_last=True`` returns (B, H, W, C) instead, in one copy (what token-wise layers want).
    """
    if seq.dim() != 3:
        raise ValueError(f'window_merge expects a (B, C, L) tensor, got shape {tuple(seq.shape)}')
    h, w = size[0], size[1]
    b, c, _ = seq.shape
    _window_hw(window, (h, w))
    if flip:
        seq = seq.flip(-1)
    if channels_last:
        return merge_tokens(seq.transpose(1, 2), window, (h, w), column_first)
    if graph_mode(h, w):  # a graph exporter's trace: the gather's result, no copy into a buffer
        return merge_tokens(seq.transpose(1, 2), window, (h, w), column_first).permute(0, 3, 1, 2)
    out = seq.new_empty((b, c, h, w))
    merge_tokens(seq.transpose(1, 2), window, (h, w), column_first, out=out.permute(0, 2, 3, 1))
    return out


def _cross_grid(size: Sequence[int], window: int) -> Tuple[int, int, int]:
    """(low-res H, low-res W, low-res window) for a cross-scale scan of a (H, W) high-resolution map."""
    if window < 2 or window % 2:
        raise ValueError(f'cross-scale window must be an even integer >= 2, got {window}')
    return (size[0] + 1) // 2, (size[1] + 1) // 2, window // 2  # sizes may be symbolic (graph export)


def cross_scale_length(size: Sequence[int], window: int) -> int:
    """Number of tokens :func:`cross_scale_scan` produces for a (H, W) high-resolution map: 5 per 2 x 2 block."""
    h2, w2, _ = _cross_grid(size, window)
    return h2 * w2 * 5


def check_cross_inputs(x: torch.Tensor, x_down: torch.Tensor, window: int) -> None:
    """Raise ValueError unless (B, C, H, W) ``x`` and ``x_down`` are a cross-scale pair for ``window``."""
    if x.dim() != 4 or x_down.dim() != 4:
        raise ValueError(f'cross_scale_scan expects (B, C, H, W) tensors, got {tuple(x.shape)} and '
                         f'{tuple(x_down.shape)}')
    h2, w2, _ = _cross_grid(x.shape[2:], window)
    if x_down.shape[:2] != x.shape[:2] or tuple(x_down.shape[2:]) != (h2, w2):
        raise ValueError(f'cross_scale_scan: low-resolution map {tuple(x_down.shape)} is not aligned with the '
                         f'high-resolution map {tuple(x.shape)}; use x_down of size (ceil(H/2), ceil(W/2)) = '
                         f'{(h2, w2)}')


def _blocks(grid: torch.Tensor, column_first: bool) -> torch.Tensor:
    """(B, H, W, *E) with H, W even -> view (B, H/2, W/2, 2, 2, *E), the 2 x 2 blocks (dy, dx) (column-first:
    (dx, dy), matching the transposed map the column-first window order walks)."""
    b, h, w = grid.shape[:3]
    rest = tuple(range(3, grid.dim()))
    blocks = grid.unflatten(2, (w // 2, 2)).unflatten(1, (h // 2, 2))  # (B, h2, dy, w2, dx, *E)
    order = (0, 1, 3, 4, 2) if column_first else (0, 1, 3, 2, 4)
    return blocks.permute(order + tuple(d + 2 for d in rest))


def _even(grid: torch.Tensor) -> torch.Tensor:
    """(B, H, W, *E) zero-padded at the bottom/right to even H, W (a view when already even)."""
    h, w = grid.shape[1], grid.shape[2]
    if h % 2 == 0 and w % 2 == 0:
        return grid
    out = grid.new_zeros((grid.shape[0], h + h % 2, w + w % 2) + tuple(grid.shape[3:]))
    out[:, :h, :w] = grid
    return out


def cross_scale_tokens(grid: torch.Tensor, grid_down: torch.Tensor, window: int, column_first: bool = False,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Channels-last cross-scale scan, unflipped: (B, H, W, *E), (B, h, w, *E) -> groups (B, h*w, 5, *E).

    Group g holds the g-th low-resolution token (window K/2 order on the low map) then its 2 x 2
    high-resolution tokens; ``h, w = ceil(H/2), ceil(W/2)``.
    """
    b = grid.shape[0]
    h2, w2, k = _cross_grid(grid.shape[1:3], window)
    if tuple(grid_down.shape[1:3]) != (h2, w2):
        raise ValueError(f'cross_scale_tokens: low-resolution map {tuple(grid_down.shape)} is not (B, {h2}, {w2}, '
                         f'...) for the high-resolution map {tuple(grid.shape)}')
    if out is None and graph_mode(h2, w2):  # a graph exporter's trace: gathers and one cat, no copies
        low = scan_tokens(grid_down, k, column_first).unsqueeze(2)  # into views (their scatters bloat the graph)
        return torch.cat((low, scan_tokens(_blocks(_even(grid), column_first), k, column_first).flatten(2, 3)), dim=2)
    if out is None:
        out = grid.new_empty((b, h2 * w2, 5) + tuple(grid.shape[3:]))
    scan_tokens(grid_down, k, column_first, out=out[:, :, 0])
    scan_tokens(_blocks(_even(grid), column_first), k, column_first, out=out[:, :, 1:].unflatten(2, (2, 2)))
    return out


def cross_scale_merge_tokens(high: torch.Tensor, window: int, size: Sequence[int], column_first: bool = False
                             ) -> torch.Tensor:
    """Inverse of :func:`cross_scale_tokens` for the high-resolution part: (B, h*w, 4, *E) -> (B, H, W, *E)."""
    h, w = size[0], size[1]
    h2, w2, k = _cross_grid((h, w), window)
    if graph_mode(h, w) and h % 2 == 0 and w % 2 == 0:  # a graph exporter's trace (sizes even there): one
        # gather by (group, place in the 2 x 2 block) per map position (no scatter, no reshape to guard on)
        rows = torch.arange(2 * h2, device=high.device)[:, None]
        cols = torch.arange(2 * w2, device=high.device)[None, :]
        if column_first:
            group = _window_coords(cols // 2, rows // 2, w2, h2, k)
            place = cols % 2 * 2 + rows % 2
        else:
            group = _window_coords(rows // 2, cols // 2, h2, w2, k)
            place = rows % 2 * 2 + cols % 2
        return high[:, group, place]
    out = high.new_empty((high.shape[0], 2 * h2, 2 * w2) + tuple(high.shape[3:]))
    blocks = _blocks(out, column_first)
    merge_tokens(high.unflatten(2, (2, 2)), k, (h2, w2), column_first, out=blocks)
    return out[:, :h, :w] if (h, w) != (2 * h2, 2 * w2) else out


def cross_scale_scan(x: torch.Tensor, x_down: torch.Tensor, window: int, column_first: bool = False,
                     flip: bool = False) -> torch.Tensor:
    """Interleave (B, C, H, W) ``x`` (window K) and (B, C, h, w) ``x_down`` (window K/2) -> (B, C, 5 h w).

    Groups of 5 tokens: one low-resolution token then its 2 x 2 position-aligned high-resolution
    tokens (row-major inside the 2 x 2 block, column-major when ``column_first``); ``x_down`` must be
    (ceil(H/2), ceil(W/2)).
    """
    check_cross_inputs(x, x_down, window)
    b, c = x.shape[:2]
    groups = cross_scale_tokens(x.permute(0, 2, 3, 1), x_down.permute(0, 2, 3, 1), window, column_first)
    seq = groups.permute(0, 3, 1, 2)  # (B, C, G, 5) view
    if flip:
        seq = torch.cat((seq[..., :1].flip(-2), seq[..., 1:].flip((-2, -1))), dim=-1)
    return seq.reshape(b, c, -1)


def cross_scale_merge(seq: torch.Tensor, window: int, size: Sequence[int], column_first: bool = False,
                      flip: bool = False, *, channels_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`cross_scale_scan` for the high-resolution part: (B, C, L) -> (B, C, H, W).

    ``channels_last=True`` returns (B, H, W, C) instead.
    """
    if seq.dim() != 3:
        raise ValueError(f'cross_scale_merge expects a (B, C, L) tensor, got shape {tuple(seq.shape)}')
    h, w = size[0], size[1]
    b, c, length = seq.shape
    expected = cross_scale_length((h, w), window)
    if length != expected:
        raise ValueError(f'cross_scale_merge: sequence length {length} does not match size {(h, w)} with window '
                         f'{window} (expected {expected} tokens)')
    high = seq.reshape(b, c, length // 5, 5)[..., 1:]
    if flip:
        high = high.flip((-2, -1))
    merged = cross_scale_merge_tokens(high.permute(0, 2, 3, 1), window, (h, w), column_first)
    return merged if channels_last else merged.permute(0, 3, 1, 2).contiguous()
