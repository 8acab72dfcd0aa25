"""Start-up checks of validation/test datasets, so a bad image fails before training, not at the first validation.

For every dataset that is not the training set (phase ``val`` or ``test``), each GT/LQ pair must
fit the model's ``scale`` the way BasicSR evaluates it: the GT is cropped to ``LQ * scale``, so the
LQ must be exactly the mod-cropped GT divided by ``scale`` (``lq = gt // scale`` per side; a GT of
3x2 at scale 4 has no LQ at all). Pairs that differ would crash the metric after training has run,
or silently compare against a crop of a different image size.

Sizes come from image headers (PIL opens lazily; only files PIL cannot size, or with an EXIF
orientation that OpenCV applies, are decoded), or from ``meta_info.txt`` for LMDBs, so a 100-image
set costs a few milliseconds. Datasets of other types (no ``paths`` of GT/LQ pairs) are not checked.
Installed by :func:`mambacsr_arch.cli.runtime.patch_datasets` around BasicSR's ``build_dataset``.
"""
from __future__ import annotations

import functools
import os.path as osp
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from .image_io import read_image_bgr8

__all__ = ['DatasetCheckError', 'image_size', 'lmdb_sizes', 'pair_size_problem', 'check_dataset',
           'wrap_build_dataset']

_SHOWN = 5
_ORIENTATION = 0x0112
_META_SHAPE = re.compile(r'\((\d+),\s*(\d+)(?:,\s*\d+)?\)')


class DatasetCheckError(ValueError):
    """A validation/test dataset cannot be evaluated at its scale; the message names the files."""


def image_size(path: str) -> Tuple[int, int]:
    """``(height, width)`` of an image file as the datasets decode it, from its header where possible."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            exif = img.info.get('exif')
            orientation = img.getexif().get(_ORIENTATION, 1) if exif else 1
        if orientation in (1, None):
            return height, width
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        pass  # a format or size PIL refuses to handle (or a header it rejects): decode it the datasets' way
    img = read_image_bgr8(path)  # EXIF-rotated or not PIL-readable: the decoder's own answer
    return img.shape[0], img.shape[1]


def lmdb_sizes(lmdb_path: str) -> Dict[str, Tuple[int, int]]:
    """``{key: (height, width)}`` from a BasicSR LMDB's ``meta_info.txt`` (``name.png (h,w,c) level``)."""
    meta = osp.join(lmdb_path, 'meta_info.txt')
    sizes = {}
    with open(meta, 'r', encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            match = _META_SHAPE.search(line)
            if match is None:
                raise DatasetCheckError(f"'{meta}' line {number}: no image shape '(h,w,c)' in {line.strip()!r}; "
                                        'rebuild the LMDB with basicsr prepare-csr or BasicSR\'s lmdb tools.')
            sizes[line.split('.')[0]] = (int(match.group(1)), int(match.group(2)))  # BasicSR's key rule
    return sizes


def pair_size_problem(gt_hw: Tuple[int, int], lq_hw: Optional[Tuple[int, int]], scale: int) -> Optional[str]:
    """Why a GT of ``gt_hw`` and an LQ of ``lq_hw`` (None: LQ made from the GT) do not fit ``scale``, or None."""
    (h, w), s = gt_hw, scale
    if h < s or w < s:
        return f'GT is {h}x{w}, smaller than scale {s} (no LQ pixel to restore)'
    if lq_hw is None:
        return None
    if lq_hw[0] < 1 or lq_hw[1] < 1:
        return f'LQ is {lq_hw[0]}x{lq_hw[1]}'
    if lq_hw != (h // s, w // s):
        return (f'GT is {h}x{w} and LQ is {lq_hw[0]}x{lq_hw[1]}, but at scale {s} the LQ of this GT is '
                f'{h // s}x{w // s} (GT mod-cropped to {h - h % s}x{w - w % s}, divided by {s})')
    return None


def _sizes(paths: List[str], lmdb_path: Optional[str], cache: Dict[str, Dict[str, Tuple[int, int]]]):
    if lmdb_path is None:
        return [image_size(p) for p in paths]
    if lmdb_path not in cache:
        cache[lmdb_path] = lmdb_sizes(lmdb_path)
    known = cache[lmdb_path]
    missing = [p for p in paths if p not in known]
    if missing:
        raise DatasetCheckError(f"LMDB '{lmdb_path}': meta_info.txt has no entry for key(s) "
                                f"{', '.join(repr(k) for k in missing[:_SHOWN])}; rebuild the LMDB.")
    return [known[p] for p in paths]


def check_dataset(dataset: Any, dataset_opt: Dict[str, Any]) -> int:
    """Check every pair of a built paired dataset against ``scale``; return the number of samples checked.

    Raises :class:`DatasetCheckError` naming the dataset, the option to fix and each bad file.
    """
    pairs = getattr(dataset, 'paths', None)
    scale = dataset_opt.get('scale')
    if not isinstance(pairs, list) or not isinstance(scale, int) or not all(
            isinstance(p, dict) and 'gt_path' in p for p in pairs):
        return 0  # not a GT/LQ paired dataset: nothing this check knows how to size
    on_the_fly = getattr(dataset, 'on_the_fly', False) or 'lq_path' not in (pairs[0] if pairs else {})
    lmdb = (dataset_opt.get('io_backend') or {}).get('type') == 'lmdb'
    cache: Dict[str, Dict[str, Tuple[int, int]]] = {}
    gt_paths = [p['gt_path'] for p in pairs]
    gt_sizes = _sizes(gt_paths, dataset_opt.get('dataroot_gt') if lmdb else None, cache)
    if on_the_fly:
        lq_paths: List[Optional[str]] = [None] * len(pairs)
        lq_sizes: List[Optional[Tuple[int, int]]] = [None] * len(pairs)
    else:
        lq_paths = [p['lq_path'] for p in pairs]
        lq_sizes = list(_sizes(lq_paths, dataset_opt.get('dataroot_lq') if lmdb else None, cache))
    bad = []
    for gt_path, gt_hw, lq_path, lq_hw in zip(gt_paths, gt_sizes, lq_paths, lq_sizes):
        problem = pair_size_problem(gt_hw, lq_hw, scale)
        if problem is not None:
            bad.append(f"'{gt_path}'" + (f" with LQ '{lq_path}'" if lq_path is not None else '') + f': {problem}')
    if bad:
        more = f' (and {len(bad) - _SHOWN} more)' if len(bad) > _SHOWN else ''
        name, phase = dataset_opt.get('name', '?'), dataset_opt.get('phase', '?')
        raise DatasetCheckError(f"{phase} dataset '{name}' cannot be evaluated at scale {scale}, checked before "
                                f"training/testing starts: {'; '.join(bad[:_SHOWN])}{more}. Remove or fix these "
                                'images, or set the right scale (top-level option scale).')
    return len(pairs)


def wrap_build_dataset(build_dataset: Callable) -> Callable:
    """BasicSR's ``build_dataset``, then :func:`check_dataset` for every non-training dataset."""
    if getattr(build_dataset, '_mambacsr_checked', False):
        return build_dataset

    @functools.wraps(build_dataset)
    def wrapped(dataset_opt: Dict[str, Any]):
        dataset = build_dataset(dataset_opt)
        if dataset_opt.get('phase') != 'train':
            check_dataset(dataset, dataset_opt)
        return dataset

    wrapped._mambacsr_checked = True
    return wrapped
