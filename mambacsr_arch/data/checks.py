"""Start-up checks of validation/test datasets, so a bad image fails before training, not at the first validation.

For every dataset that is not the training set (phase ``val`` or ``test``), each GT/LQ pair must
fit the model's ``scale`` the way BasicSR evaluates it: the GT is cropped to ``LQ * scale``, so the
LQ must be exactly the mod-cropped GT divided by ``scale`` (``lq = gt // scale`` per side; a GT of
3x2 at scale 4 has no LQ at all). Pairs that differ would crash the metric after training has run,
or silently compare against a crop of a different image size.

When the validation metrics include SSIM (``calculate_ssim``: an 11x11 Gaussian window, no padding),
every evaluated image must be at least 11 px a side after ``crop_border`` (smaller ones give a cv2
error or ``nan``). The training set is checked against ``gt_size`` (every GT must hold a patch of it;
the random crop fails on the first smaller one, mid-training). The metrics come from the validated
options (:func:`expect_metrics`, called by the CLI once the option file is checked).

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
           'check_training_set', 'expect_metrics', 'metric_crop_border', 'ssim_crop_border', 'wrap_build_dataset']

_SHOWN = 5
_ORIENTATION = 0x0112
_META_SHAPE = re.compile(r'\((\d+),\s*(\d+)(?:,\s*\d+)?\)')
SSIM_WINDOW = 11  # basicsr.metrics.psnr_ssim: 11x11 Gaussian, 'valid' filtering
SSIM_METRICS = ('calculate_ssim', 'calculate_ssim_pt')
_EXPECTED: Dict[str, Any] = {'metrics': None}


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


def expect_metrics(metrics: Optional[Dict[str, Any]]) -> None:
    """The ``val.metrics`` the datasets built next are evaluated with (the CLI calls it after its checks)."""
    _EXPECTED['metrics'] = metrics


def metric_crop_border(metrics: Optional[Dict[str, Any]], types: Optional[Tuple[str, ...]] = None) -> Optional[int]:
    """The largest ``crop_border`` of the metrics in ``metrics`` (a ``val.metrics`` mapping), of the ``types``
    given (default: all); None without such a metric."""
    borders = [int(m.get('crop_border') or 0) for m in (metrics or {}).values()
               if isinstance(m, dict) and (types is None or m.get('type') in types)]
    return max(borders) if borders else None


def ssim_crop_border(metrics: Optional[Dict[str, Any]]) -> Optional[int]:
    """The largest ``crop_border`` of the SSIM metrics in ``metrics``, None without SSIM."""
    return metric_crop_border(metrics, tuple(SSIM_METRICS))


def _ssim_problem(gt_hw: Tuple[int, int], scale: int, crop_border: int, window: int = SSIM_WINDOW) -> Optional[str]:
    h, w = gt_hw[0] - gt_hw[0] % scale, gt_hw[1] - gt_hw[1] % scale  # the SR output's size
    left_h, left_w = h - 2 * crop_border, w - 2 * crop_border
    if min(left_h, left_w) >= window:
        return None
    needs = f'SSIM needs at least {window}x{window}' if window > 1 else 'no pixel is left to score'
    return f'evaluated at {h}x{w}, {max(left_h, 0)}x{max(left_w, 0)} after crop_border {crop_border}: {needs}'


def check_dataset(dataset: Any, dataset_opt: Dict[str, Any], ssim_border: Optional[int] = None,
                  crop_border: Optional[int] = None) -> int:
    """Check every pair of a built paired dataset against ``scale``; return the number of samples checked.

    With ``ssim_border`` (an SSIM metric's ``crop_border``), each evaluated image must also keep an
    11x11 SSIM window after the crop; with ``crop_border`` (any metric's), at least one pixel (else PSNR is
    nan). Raises :class:`DatasetCheckError` naming the dataset, the option
    to fix and each bad file.
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
    name, phase = dataset_opt.get('name', '?'), dataset_opt.get('phase', '?')
    if not bad and ssim_border is not None:
        small = [(path, _ssim_problem(hw, scale, ssim_border)) for path, hw in zip(gt_paths, gt_sizes)]
        small = [f"'{path}' ({problem})" for path, problem in small if problem]
        if small:
            more = f' (and {len(small) - _SHOWN} more)' if len(small) > _SHOWN else ''
            raise DatasetCheckError(f"{phase} dataset '{name}': {len(small)} image(s) too small for the SSIM metric "
                                    f"(val.metrics), checked before training/testing starts: "
                                    f"{'; '.join(small[:_SHOWN])}{more}. Drop the ssim metric, lower its "
                                    f'crop_border, or evaluate on larger images.')
    if not bad and crop_border:
        small = [(path, _ssim_problem(hw, scale, crop_border, 1)) for path, hw in zip(gt_paths, gt_sizes)]
        small = [f"'{path}' ({problem})" for path, problem in small if problem]
        if small:
            more = f' (and {len(small) - _SHOWN} more)' if len(small) > _SHOWN else ''
            raise DatasetCheckError(f"{phase} dataset '{name}': {len(small)} image(s) smaller than twice the metrics' "
                                    f"crop_border (val.metrics): {'; '.join(small[:_SHOWN])}{more}. Lower "
                                    'crop_border (the scale, e.g. 4, as in the papers) or evaluate on larger images.')
    if bad:
        more = f' (and {len(bad) - _SHOWN} more)' if len(bad) > _SHOWN else ''
        raise DatasetCheckError(f"{phase} dataset '{name}' cannot be evaluated at scale {scale}, checked before "
                                f"training/testing starts: {'; '.join(bad[:_SHOWN])}{more}. Remove or fix these "
                                'images, or set the right scale (top-level option scale).')
    return len(pairs)


def check_training_set(dataset: Any, dataset_opt: Dict[str, Any]) -> int:
    """Every GT of a built training set must hold a ``gt_size`` patch; returns the number of images checked.

    Raises :class:`DatasetCheckError` saying how many are smaller, the largest size found and the fix.
    """
    pairs = getattr(dataset, 'paths', None)
    gt_size = dataset_opt.get('gt_size')
    if not isinstance(gt_size, int) or not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, dict) and 'gt_path' in p for p in pairs):
        return 0
    lmdb = (dataset_opt.get('io_backend') or {}).get('type') == 'lmdb'
    gt_paths = [p['gt_path'] for p in pairs]
    sizes = _sizes(gt_paths, dataset_opt.get('dataroot_gt') if lmdb else None, {})
    small = [(path, hw) for path, hw in zip(gt_paths, sizes) if min(hw) < gt_size]
    if not small:
        return len(pairs)
    scale = dataset_opt.get('scale') if isinstance(dataset_opt.get('scale'), int) else 1
    fits_all = min(min(hw) for hw in sizes)
    fits_all -= fits_all % scale
    largest = max(sizes, key=lambda hw: min(hw))
    examples = ', '.join(f"'{osp.basename(p)}' {h}x{w}" for p, (h, w) in small[:3])
    if len(small) == len(sizes):
        best = min(largest) - min(largest) % scale
        fix = (f'lower datasets.train.gt_size to {best} or less (a multiple of scale {scale})' if best >= scale
               else 'the images are smaller than scale') + ', or train on larger images'
    else:
        fix = ('lower datasets.train.gt_size' + (f' to {fits_all} or less' if fits_all >= scale else '')
               + ', or remove the smaller images')
    raise DatasetCheckError(
        f"train dataset '{dataset_opt.get('name', '?')}': {len(small)} of {len(sizes)} GT images are smaller than "
        f'gt_size {gt_size} (the random {gt_size}x{gt_size} crop fails on them mid-training; the largest image '
        f'is {largest[0]}x{largest[1]}; e.g. {examples}): {fix}.')


def wrap_build_dataset(build_dataset: Callable) -> Callable:
    """BasicSR's ``build_dataset``, then :func:`check_dataset` for every non-training dataset (with the SSIM
    size rule when :func:`expect_metrics` got an SSIM metric) and :func:`check_training_set` for the training set."""
    if getattr(build_dataset, '_mambacsr_checked', False):
        return build_dataset

    @functools.wraps(build_dataset)
    def wrapped(dataset_opt: Dict[str, Any]):
        dataset = build_dataset(dataset_opt)
        if dataset_opt.get('phase') != 'train':
            check_dataset(dataset, dataset_opt, ssim_crop_border(_EXPECTED['metrics']),
                          metric_crop_border(_EXPECTED['metrics']))
        else:
            check_training_set(dataset, dataset_opt)
        return dataset

    wrapped._mambacsr_checked = True
    return wrapped
