"""Inference on images of any size: ONE settings resolver and the tiling engines.

Settings: :func:`resolve_inference_settings` turns an option file (plus ``basicsr infer``'s
flags, as keyword overrides) into one :class:`InferenceSettings`; ``MambaCSRModel``/``HATModel.test``
and ``basicsr infer`` both use it, so ``basicsr test -opt X`` and ``basicsr infer --opt X``
restore images identically. Option keys (flags in brackets)::

    val:
      tile: {size: 192, overlap: 32}   # blended tiles, LR px; size 0: never tile   [--tile, --tile-overlap]
      max_pixels: 262144               # auto-tile (blended) above this many LR px; 0: never   [--max-pixels]
      pad_multiple: 16                 # override the arch's ``pad_multiple``   [--pad-multiple]
      official_protocol: true | false  # default: true iff top-level padding_size is set
                                       # [--official-protocol / --no-official-protocol]
      use_amp: bf16 | fp16 | ~         # autocast dtype of the forward passes   [--bf16 / --fp16 / --fp32]
      self_ensemble: false             # x8 self-ensemble (mean of 8 flips/transposes; 8x the time)   [--self-ensemble]
    tile: {tile_size: 512, tile_pad: 32}   # XPixelGroup/HAT layout: HAT's hard-cropped tiles   [--tile-mode hat]
    padding_size: 64                       # renyulin-f/MambaCSR layout: the official chop test   [--padding-size]

Tile modes (:data:`TILE_MODES`): ``auto`` (whole image up to ``max_pixels`` LR px, blended
tiles above), ``blend``, ``hat`` and ``none`` (always the whole image). Public entry point of
the engines: :func:`restore_image`. All sizes are in pixels; tile sizes and overlaps are LR px.

Out of memory (``torch.cuda.OutOfMemoryError``, or a RuntimeError saying "out of memory"): the
image is restored again with smaller tiles, the output being exactly that of a run started with
the final tile size: a whole image goes to tiles of 512 LR px (half its longer side if smaller),
tiles halve, down to 64 LR px (or the pad multiple; blended tiles stay above their overlap), each
step said once per process as a warning naming the new size; ``hat`` tiles stay ``hat`` tiles.
At the floor, or under the official protocol (fixed chops), the error is raised again with what may
help (a smaller ``--tile``, ``--fp16``/``--bf16``).

Blended tiles (``blend``, and ``auto`` above the budget): tiles of ``tile_size`` LR px
overlapping by at least ``tile_overlap`` px (the last tile in each row/column is aligned to the
image border, so it may overlap more). Each tile is padded to ``pad_multiple`` on its own and
restored; the outputs are blended with weights that ramp linearly (in HR px) over the overlap
towards a neighbouring tile and stay 1 at image borders, so seams are hidden and every output
pixel is a convex combination of tile outputs.

HAT's tiles (``hat``) reproduce XPixelGroup/HAT's ``HATModel.tile_process`` (the official HAT
option files' top-level ``tile``): the whole image is reflect-padded to ``pad_multiple``
(HAT's ``window_size``) first; it is cut into a grid of ``tile_size`` tiles, each run with up to
``tile_pad`` (here ``tile_overlap``) px of context on every side (clipped at the image border),
and each tile's centre is pasted into the output without blending.

Official protocol (``official_protocol=True``) reproduces renyulin-f/MambaCSR's
``MambaCSRModel.test`` so published numbers can be re-checked: the image is cut into
``h // 192 + 1`` by ``w // 192 + 1`` chops (after reflect-padding H and W to a multiple of those
counts), neighbouring chops overlap by a quarter of the chop size, each chop is flip-padded
(mirrored copy appended, edge pixel repeated) to ``(n // padding_size + 1) * padding_size``
(i.e. always at least one extra pixel, up to a full ``padding_size``), and each chop's centre
part is pasted into the output without blending. Deviation: where the official code would run
out of mirror (chop smaller than its pad), we keep mirroring periodically instead of producing
a wrongly sized chop.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..archs.layers import pad_to_multiple

logger = logging.getLogger('basicsr')

# Default automatic-tiling budget in LR pixels: the standard benchmarks (DIV2K-val at x4 is at most
# 510x510 LR) still run as whole images; anything larger is tiled.
DEFAULT_MAX_PIXELS = 512 * 512
DEFAULT_AUTO_TILE = 256
OFFICIAL_CHOP = 192  # LR px, official MambaCSR test chop size
OFFICIAL_PAD = 64  # official `padding_size`
DEFAULT_TILE_OVERLAP = 32
TILE_MODES = ('auto', 'blend', 'hat', 'none')
AMP_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16}
_NO_AMP = (None, False, 'none', 'None', 'false', 'fp32', 'float32')


def parse_amp(value: Any, where: str) -> Optional[torch.dtype]:
    """A ``use_amp`` option (``bf16``, ``fp16``, ``fp32`` or ``~``) -> autocast dtype or None."""
    if value in _NO_AMP:
        return None
    if isinstance(value, str) and value.lower() in AMP_DTYPES:
        return AMP_DTYPES[value.lower()]
    raise ValueError(f"{where}: use_amp must be bf16, fp16 or ~ (got {value!r}).")


def parse_train_amp(value: Any, device_type: str) -> Optional[torch.dtype]:
    """``train.use_amp`` on a ``device_type`` ('cuda', 'cpu') -> autocast dtype or None (see :func:`parse_amp`).

    fp16 training needs CUDA (its GradScaler); bf16 runs anywhere. Raises ValueError naming the key.
    """
    dtype = parse_amp(value, 'train')
    if dtype == torch.float16 and device_type != 'cuda':
        raise ValueError('train.use_amp: fp16 needs CUDA (GradScaler) and this run is on the CPU (num_gpu: 0 or no '
                         'CUDA); use bf16, or ~ for float32.')
    return dtype


def arch_pad_multiple(net: nn.Module) -> int:
    """The input multiple ``net`` needs: its ``pad_multiple`` attribute (our MambaCSR and HAT declare one).

    A network without one that has an integer ``window_size`` (a SwinIR-family arch registered by
    another package, e.g. the official HAT) gets that, as the official ``HATModel`` pads to
    ``network_g.window_size``; anything else 1.
    """
    value = getattr(net, 'pad_multiple', None)
    if value is None:
        value = getattr(net, 'window_size', None)
        value = value if isinstance(value, int) and not isinstance(value, bool) else 1
    return int(value)


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


def _restore_hat_tiles(net: nn.Module, lq: torch.Tensor, scale: int, tile: int, tile_pad: int,
                       pad_multiple: int) -> torch.Tensor:
    """XPixelGroup/HAT's ``tile_process`` (see module doc); (B, C, h, w) -> (B, C, h*scale, w*scale)."""
    b, _, h, w = lq.shape
    img = pad_to_multiple(lq, pad_multiple)[0] if pad_multiple > 1 else lq
    big_h, big_w = img.shape[-2:]
    out = None
    for y0 in range(0, big_h, tile):
        for x0 in range(0, big_w, tile):
            y1, x1 = min(y0 + tile, big_h), min(x0 + tile, big_w)
            in_y0, in_x0 = max(y0 - tile_pad, 0), max(x0 - tile_pad, 0)
            in_y1, in_x1 = min(y1 + tile_pad, big_h), min(x1 + tile_pad, big_w)
            res = _forward_padded(net, img[..., in_y0:in_y1, in_x0:in_x1], scale, pad_multiple)
            if out is None:
                out = torch.zeros(b, res.shape[1], big_h * scale, big_w * scale, device=lq.device)
            cy, cx = (y0 - in_y0) * scale, (x0 - in_x0) * scale
            out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                res[..., cy:cy + (y1 - y0) * scale, cx:cx + (x1 - x0) * scale]
    return out[..., :h * scale, :w * scale]


#: The 8 transforms of the x8 self-ensemble: (flip W, flip H, transpose H/W), applied in that order.
SELF_ENSEMBLE_TRANSFORMS = tuple((bool(k & 1), bool(k & 2), bool(k & 4)) for k in range(8))


def _transform(x: torch.Tensor, flip_w: bool, flip_h: bool, transpose: bool) -> torch.Tensor:
    if flip_w:
        x = x.flip(-1)
    if flip_h:
        x = x.flip(-2)
    return x.transpose(-2, -1) if transpose else x


def _untransform(y: torch.Tensor, flip_w: bool, flip_h: bool, transpose: bool) -> torch.Tensor:
    """The inverse of :func:`_transform` (the same steps, reversed), on the upscaled output."""
    if transpose:
        y = y.transpose(-2, -1)
    if flip_h:
        y = y.flip(-2)
    return y.flip(-1) if flip_w else y


def self_ensemble_mean(restore: Callable[[torch.Tensor], torch.Tensor], lq: torch.Tensor) -> torch.Tensor:
    """x8 self-ensemble: the mean of ``T^-1(restore(T(lq)))`` over the 8 flips/transposes ``T`` of
    the dihedral group (:data:`SELF_ENSEMBLE_TRANSFORMS`); ``restore`` maps (B, C, h, w) -> (B, C', h*s, w*s).

    8 calls of ``restore``; one output-sized accumulator (float32) is kept besides the current result.
    """
    total = None
    for t in SELF_ENSEMBLE_TRANSFORMS:
        out = _untransform(restore(_transform(lq, *t)), *t).float()
        total = out.clone() if total is None else total.add_(out)
    return total.div_(len(SELF_ENSEMBLE_TRANSFORMS))


def restore_image(net: nn.Module, lq: torch.Tensor, scale: int, *, tile_size: Optional[int] = None,
                  tile_overlap: int = DEFAULT_TILE_OVERLAP, pad_multiple: int = 1, official_protocol: bool = False,
                  max_pixels: Optional[int] = None, official_chop: int = OFFICIAL_CHOP,
                  official_padding_size: int = OFFICIAL_PAD, amp_dtype: Optional[torch.dtype] = None,
                  tile_mode: Optional[str] = None, self_ensemble: bool = False) -> torch.Tensor:
    """Super-resolve ``lq`` of any size with ``net``.

    On an out-of-memory error it retries with smaller tiles (module doc), raising only at the floor.
    Runs under ``torch.no_grad()`` (inside); does not change ``net.train()``/``eval()`` mode, so
    callers put the net in eval mode themselves. :meth:`InferenceSettings.restore_kwargs` gives
    the keyword arguments for an option file.

    Args:
        net: maps (B, C, H, W) -> (B, C', H*scale, W*scale) for H, W multiples of ``pad_multiple``.
        lq: (B, C, h, w) float input, range as the net expects (usually [0, 1]).
        scale: upscaling factor of ``net``.
        tile_size: LR tile size in px (``blend``, ``hat``).
        tile_overlap: ``blend``/``auto``: minimum overlap between neighbouring tiles; ``hat``: the
            context (``tile_pad``) added on every side of a tile. LR px.
        pad_multiple: the arch's required input multiple (window / scan size); inputs are padded
            at the bottom/right (reflect; replicate when the image is smaller than the pad).
        official_protocol: reproduce the official MambaCSR chop test (see module docstring);
            the tile options, ``pad_multiple`` and ``max_pixels`` are then ignored.
        max_pixels: ``auto`` tiling budget (LR px per forward); None = ``DEFAULT_MAX_PIXELS``,
            0 = never tile automatically. Auto tiles are ``DEFAULT_AUTO_TILE`` px, or smaller to fit.
        official_chop, official_padding_size: official protocol constants (192, ``padding_size`` 64).
        amp_dtype: optional ``torch.autocast`` dtype (bf16/fp16) for the forward passes.
        tile_mode: one of :data:`TILE_MODES`; None = ``blend`` when ``tile_size`` is given, else ``auto``.
        self_ensemble: x8 self-ensemble (the "+" results of SR papers): the mean of the restores of
            the 8 flips/transposes of ``lq``, each mapped back (:func:`self_ensemble_mean`); every
            one is restored as above (tiles, official protocol), so it costs 8x the time.

    Returns:
        (B, C', h*scale, w*scale) float32 tensor on ``lq``'s device.
    """
    if lq.dim() != 4:
        raise ValueError(f'restore_image expects lq of shape (B, C, h, w), got {tuple(lq.shape)}')
    if scale < 1 or pad_multiple < 1:
        raise ValueError(f'scale ({scale}) and pad_multiple ({pad_multiple}) must be >= 1')
    if tile_mode is None:
        tile_mode = 'blend' if tile_size else 'auto'
    if tile_mode not in TILE_MODES:
        raise ValueError(f'tile mode {tile_mode!r} is not one of {", ".join(TILE_MODES)}')
    if tile_mode in ('blend', 'hat') and not tile_size:
        raise ValueError(f"tile mode '{tile_mode}' needs a tile size >= 1 (got {tile_size!r})")
    if tile_overlap < 0:
        raise ValueError(f'tile overlap must be >= 0 (got {tile_overlap})')
    h, w = lq.shape[-2:]
    if tile_mode == 'auto':
        tile_size = None
        budget = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        if budget and h * w > budget:
            tile_size = min(DEFAULT_AUTO_TILE, max(int(math.isqrt(budget)), 2 * tile_overlap + 1))
    elif tile_mode == 'none':
        tile_size = None
    if tile_mode != 'hat' and tile_size is not None and tile_size <= tile_overlap:
        raise ValueError(f'tile size ({tile_size}) must exceed tile overlap ({tile_overlap}): set val.tile.size '
                         f'larger or val.tile.overlap smaller in the option file (--tile / --tile-overlap).')
    autocast = (torch.autocast(device_type=lq.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    # the tile size in use: lowered on out-of-memory errors, kept for the rest of this call (self-ensemble)
    tiles = {'mode': 'hat' if tile_mode == 'hat' else 'blend', 'size': tile_size}

    def restore_at(x: torch.Tensor) -> torch.Tensor:
        if official_protocol:
            return _restore_official(net, x, scale, official_chop, official_padding_size)
        size = tiles['size']
        if tiles['mode'] == 'hat':
            return _restore_hat_tiles(net, x, scale, size, tile_overlap, pad_multiple)
        if size is None or (x.shape[-2] <= size and x.shape[-1] <= size):
            return _forward_padded(net, x, scale, pad_multiple)
        return _restore_tiled(net, x, scale, size, tile_overlap, pad_multiple)

    def restore_once(x: torch.Tensor) -> torch.Tensor:
        while True:
            try:
                return restore_at(x)
            except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(exc):
                    raise
                smaller = None if official_protocol else _smaller_tile(tiles['size'], x.shape[-2:], tiles['mode'],
                                                                       tile_overlap, pad_multiple)
                if smaller is None:
                    raise _out_of_memory_error(exc, tiles['size'], official_protocol, amp_dtype) from exc
            _note_smaller_tile(tiles['size'], smaller, x.shape[-2:])
            tiles['size'] = smaller
            if x.device.type == 'cuda':
                torch.cuda.empty_cache()

    with torch.no_grad(), autocast:
        return self_ensemble_mean(restore_once, lq) if self_ensemble else restore_once(lq)


# ----------------------------------------------------------------------------- out of memory: smaller tiles
OOM_FIRST_TILE = 512  # LR px: a whole image that does not fit is tried in tiles of this size first
OOM_MIN_TILE = 64  # LR px: the smallest tile the fallback goes down to (or the pad multiple, if larger)
_OOM_NOTED: set = set()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` and for RuntimeErrors saying 'out of memory' (other
    backends, older torch)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or \
        (isinstance(exc, RuntimeError) and 'out of memory' in str(exc).lower())


def _smaller_tile(size: Optional[int], shape: Sequence[int], mode: str, overlap: int,
                  pad_multiple: int) -> Optional[int]:
    """The next tile size after an out-of-memory error at ``size`` (None: the whole image), or None at the
    floor: whole image -> :data:`OOM_FIRST_TILE` (or half the image's longer side if that is smaller),
    then halves, down to :data:`OOM_MIN_TILE` or ``pad_multiple`` (blended tiles: and beyond the overlap)."""
    floor = max(OOM_MIN_TILE, pad_multiple, overlap + 1 if mode == 'blend' else 1)
    longest = max(int(shape[0]), int(shape[1]))
    current = longest if size is None else min(size, longest)  # a tile larger than the image is the image
    if current <= floor:
        return None
    if current == longest:  # the whole image was run
        smaller = OOM_FIRST_TILE if longest > OOM_FIRST_TILE else (longest + 1) // 2
    else:
        smaller = current // 2
    return max(smaller, floor)


def _note_smaller_tile(size: Optional[int], smaller: int, shape: Sequence[int]) -> None:
    """Warn once per process per (tile size, smaller tile size) that tiles got smaller."""
    key = (size, smaller)
    if key in _OOM_NOTED:
        return
    _OOM_NOTED.add(key)
    was = f'{int(shape[0])}x{int(shape[1])} LR px as a whole' if size is None else f'tiles of {size} LR px'
    logger.warning(
        'out of memory restoring %s: retrying with tiles of %d LR px (pass --tile %d, or set val.tile.size, to start '
        'there)', was, smaller, smaller)


def _out_of_memory_error(exc: BaseException, size: Optional[int], official: bool,
                         amp_dtype: Optional[torch.dtype]) -> torch.cuda.OutOfMemoryError:
    """The error raised when smaller tiles cannot help any more, with what may."""
    if official:
        where = ('with the official MambaCSR chops (fixed size); use --no-official-protocol with --tile N '
                 '(or val.tile.size) for tiles that shrink on out-of-memory errors')
    else:
        where = f'even with tiles of {size} LR px (the smallest the fallback tries); try a smaller --tile'
    fix = '' if amp_dtype is not None else ', or --fp16/--bf16 (half the activation memory)'
    return torch.cuda.OutOfMemoryError(f'out of memory {where}{fix}; the device error was: {str(exc)[:300]}')


# ----------------------------------------------------------------------------- settings: ONE resolver
VAL_TILE_KEYS = ('size', 'overlap')
HAT_TILE_KEYS = ('tile_size', 'tile_pad')


@dataclass(frozen=True)
class InferenceSettings:
    """How images are restored: the output of :func:`resolve_inference_settings`.

    Fields (LR px): ``tile_mode`` (one of :data:`TILE_MODES`), ``tile_size`` (``blend``/``hat``;
    None otherwise), ``tile_overlap`` (``blend``/``auto``: minimum overlap; ``hat``: HAT's
    ``tile_pad``), ``max_pixels`` (``auto`` budget; None = :data:`DEFAULT_MAX_PIXELS`),
    ``pad_multiple`` (None = the network's, :func:`arch_pad_multiple`), ``amp_dtype``,
    ``official_protocol`` and ``padding_size`` (the official MambaCSR chop test), ``self_ensemble``
    (x8 self-ensemble around all of these; 8x the time). ``notes``: lines
    worth logging once (e.g. "official MambaCSR test protocol: padding_size 64"); not compared.
    """
    tile_mode: str = 'auto'
    tile_size: Optional[int] = None
    tile_overlap: int = DEFAULT_TILE_OVERLAP
    max_pixels: Optional[int] = None
    pad_multiple: Optional[int] = None
    amp_dtype: Optional[torch.dtype] = None
    official_protocol: bool = False
    padding_size: int = OFFICIAL_PAD
    self_ensemble: bool = False
    notes: Tuple[str, ...] = field(default=(), compare=False)

    def resolved_pad_multiple(self, net: nn.Module) -> int:
        """``pad_multiple`` if set, else what ``net`` declares (:func:`arch_pad_multiple`)."""
        return self.pad_multiple if self.pad_multiple is not None else arch_pad_multiple(net)

    def restore_kwargs(self, net: nn.Module) -> Dict[str, Any]:
        """Keyword arguments of :func:`restore_image` for ``net`` (the bare module)."""
        return dict(tile_mode=self.tile_mode, tile_size=self.tile_size, tile_overlap=self.tile_overlap,
                    pad_multiple=self.resolved_pad_multiple(net), max_pixels=self.max_pixels,
                    official_protocol=self.official_protocol, official_padding_size=self.padding_size,
                    amp_dtype=self.amp_dtype, self_ensemble=self.self_ensemble)


def _int_option(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{where} must be an integer >= {minimum} (got {value!r}).')
    return value


def _tile_section(value: Any, key: str, valid: Sequence[str], required: Sequence[str], example: str,
                  source: str) -> Optional[Mapping[str, Any]]:
    """The mapping under ``key`` (None when absent, ``~`` or false); unknown keys are errors."""
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f'{source}: {key} must be a mapping such as {example}, got {value!r}.')
    unknown = [str(k) for k in value if k not in valid]
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(f'{key}.{k}' for k in unknown)}; the valid keys "
                         f"under {key} are {', '.join(valid)} (e.g. {key}: {example}).")
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"{source}: {key} needs {', '.join(missing)} (e.g. {key}: {example}).")
    return value


def _settings_from_options(opt: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """Field values from an option file (see module doc for the keys)."""
    val = opt.get('val') or {}
    if not isinstance(val, Mapping):
        raise ValueError(f'{source}: val must be a mapping, got {val!r}.')
    fields: Dict[str, Any] = dict(tile_mode='auto', tile_size=None, tile_overlap=DEFAULT_TILE_OVERLAP,
                                  max_pixels=None, pad_multiple=None, amp_dtype=None, official_protocol=False,
                                  padding_size=OFFICIAL_PAD, self_ensemble=False)
    val_tile = _tile_section(val.get('tile'), 'val.tile', VAL_TILE_KEYS, ('size', ), '{size: 192, overlap: 32}',
                             source)
    hat_tile = _tile_section(opt.get('tile'), 'tile', HAT_TILE_KEYS, HAT_TILE_KEYS, '{tile_size: 512, tile_pad: 32}',
                             source)
    if val_tile is not None and hat_tile is not None:
        raise ValueError(f"{source}: both val.tile (our blended tiles) and the top-level tile (HAT's hard-cropped "
                         f'tiles) are set; keep one of them.')
    if val_tile is not None:
        size = _int_option(val_tile['size'], f'{source}: val.tile.size', 0)
        overlap = _int_option(val_tile.get('overlap', DEFAULT_TILE_OVERLAP), f'{source}: val.tile.overlap', 0)
        fields.update(tile_mode='blend' if size else 'none', tile_size=size or None, tile_overlap=overlap)
    if hat_tile is not None:
        fields.update(tile_mode='hat', tile_size=_int_option(hat_tile['tile_size'], f'{source}: tile.tile_size', 1),
                      tile_overlap=_int_option(hat_tile['tile_pad'], f'{source}: tile.tile_pad', 0))
    padding_size = opt.get('padding_size')
    if padding_size is not None:
        fields['padding_size'] = _int_option(padding_size, f'{source}: padding_size', 1)
    official = val.get('official_protocol')
    if official is None:
        official = padding_size is not None  # the official MambaCSR files set padding_size, never our key
    elif not isinstance(official, bool):
        raise ValueError(f'{source}: val.official_protocol must be true or false (got {official!r}).')
    if official and fields['tile_mode'] in ('blend', 'hat'):
        raise ValueError(f'{source}: the official MambaCSR test protocol (top-level padding_size / '
                         f"val.official_protocol) cuts its own chops, and {'val.tile' if val_tile else 'tile'} asks "
                         f'for tiles; set val.official_protocol: false to use the tiles, or remove the tile key.')
    fields['official_protocol'] = official
    if val.get('max_pixels') is not None:
        fields['max_pixels'] = _int_option(val['max_pixels'], f'{source}: val.max_pixels', 0)
    if val.get('pad_multiple') is not None:
        fields['pad_multiple'] = _int_option(val['pad_multiple'], f'{source}: val.pad_multiple', 1)
    fields['amp_dtype'] = parse_amp(val.get('use_amp'), f'{source}: val')
    ensemble = val.get('self_ensemble')
    if ensemble is not None and not isinstance(ensemble, bool):
        raise ValueError(f'{source}: val.self_ensemble must be true or false (got {ensemble!r}).')
    fields['self_ensemble'] = bool(ensemble)
    return fields


def _apply_flags(fields: Dict[str, Any], flags: Mapping[str, Any]) -> None:
    """Command-line overrides (None = not given) on top of the option file's ``fields``."""
    tile_choice = flags['tile_size'] is not None or flags['tile_mode'] is not None
    if flags['tile_size'] is not None:
        size = _int_option(flags['tile_size'], '--tile', 0)
        mode = fields['tile_mode'] if fields['tile_mode'] in ('blend', 'hat') else 'blend'
        fields.update(tile_mode=mode if size else 'none', tile_size=size or None)
    if flags['tile_overlap'] is not None:
        fields['tile_overlap'] = _int_option(flags['tile_overlap'], '--tile-overlap', 0)
    if flags['tile_mode'] is not None:
        mode = flags['tile_mode']
        if mode not in TILE_MODES:
            raise ValueError(f"--tile-mode must be one of {', '.join(TILE_MODES)} (got {mode!r}).")
        if mode in ('blend', 'hat') and fields['tile_size'] is None:
            raise ValueError(f'--tile-mode {mode} needs a tile size: add --tile N (LR px).')
        fields.update(tile_mode=mode, tile_size=fields['tile_size'] if mode in ('blend', 'hat') else None)
    if flags['padding_size'] is not None:
        fields['padding_size'] = _int_option(flags['padding_size'], '--padding-size', 1)
    if flags['official_protocol'] is not None or flags['padding_size'] is not None:
        # like the top-level key, --padding-size alone turns the protocol on; the flags beat the file's tiles
        official = flags['official_protocol'] is not False
        if official and not tile_choice and fields['tile_mode'] in ('blend', 'hat'):
            fields.update(tile_mode='auto', tile_size=None)
        fields['official_protocol'] = official
    elif tile_choice:
        fields['official_protocol'] = False  # a tile flag beats the option file's official protocol
    if fields['official_protocol'] and fields['tile_mode'] in ('blend', 'hat'):
        raise ValueError('--official-protocol/--padding-size and --tile/--tile-mode exclude each other: the '
                         'official protocol cuts its own chops. Pass one of them.')
    if flags['max_pixels'] is not None:
        fields['max_pixels'] = _int_option(flags['max_pixels'], '--max-pixels', 0)
    if flags['pad_multiple'] is not None:
        fields['pad_multiple'] = _int_option(flags['pad_multiple'], '--pad-multiple', 1)
    if flags['amp'] is not None:
        fields['amp_dtype'] = parse_amp(flags['amp'], '--fp16/--bf16/--fp32')
    if flags['self_ensemble'] is not None:
        fields['self_ensemble'] = bool(flags['self_ensemble'])


def _notes(fields: Mapping[str, Any]) -> Tuple[str, ...]:
    notes = _layout_notes(fields)
    if fields['self_ensemble']:
        notes += ('x8 self-ensemble: each image restored 8 times (flips and transposes, averaged): 8x the time',)
    return notes


def _layout_notes(fields: Mapping[str, Any]) -> Tuple[str, ...]:
    if fields['official_protocol']:
        return (f"official MambaCSR test protocol: padding_size {fields['padding_size']} (chops of about "
                f'{OFFICIAL_CHOP} LR px pasted without blending; val.official_protocol: false for whole images '
                f'or val.tile)',)
    if fields['tile_mode'] == 'hat':
        return (f"HAT tiles: tile_size {fields['tile_size']}, tile_pad {fields['tile_overlap']} (hard-cropped as "
                f"XPixelGroup/HAT's tile_process; val.tile: {{size, overlap}} for blended tiles)",)
    return ()


def resolve_inference_settings(opt: Optional[Mapping[str, Any]] = None, *, source: str = 'option file',
                               tile_size: Optional[int] = None, tile_overlap: Optional[int] = None,
                               tile_mode: Optional[str] = None, max_pixels: Optional[int] = None,
                               pad_multiple: Optional[int] = None, amp: Optional[str] = None,
                               official_protocol: Optional[bool] = None,
                               padding_size: Optional[int] = None,
                               self_ensemble: Optional[bool] = None) -> InferenceSettings:
    """ONE place that turns an option file and ``basicsr infer``'s flags into :class:`InferenceSettings`.

    ``opt``: the parsed option file (its ``val`` section, top-level ``tile`` and ``padding_size``;
    see the module doc). Keyword arguments are the command-line overrides (None = flag not given):
    ``tile_size`` (``--tile``; 0 = never tile), ``tile_overlap``, ``tile_mode``, ``max_pixels``,
    ``pad_multiple``, ``amp`` (``'bf16'``/``'fp16'``/``'fp32'``), ``official_protocol`` (True/False)
    and ``padding_size`` (turns the official protocol on, as the top-level key does), ``self_ensemble``
    (``--self-ensemble``: True/False over ``val.self_ensemble``). A tile flag
    overrides the file's official protocol and an official-protocol flag the file's tiles.

    Raises ValueError naming the option key or flag on any invalid, misspelt or conflicting value.
    """
    fields = _settings_from_options(opt or {}, source)
    _apply_flags(fields, dict(tile_size=tile_size, tile_overlap=tile_overlap, tile_mode=tile_mode,
                              max_pixels=max_pixels, pad_multiple=pad_multiple, amp=amp,
                              official_protocol=official_protocol, padding_size=padding_size,
                              self_ensemble=self_ensemble))
    if fields['tile_mode'] == 'blend' and fields['tile_size'] <= fields['tile_overlap']:
        raise ValueError(f"{source}: tile size ({fields['tile_size']}) must exceed the tile overlap "
                         f"({fields['tile_overlap']}): raise val.tile.size (--tile) or lower val.tile.overlap "
                         f'(--tile-overlap).')
    return InferenceSettings(notes=_notes(fields), **fields)
