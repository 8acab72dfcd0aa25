"""The CSR degradation as pure functions: mod-crop, bicubic downscale, JPEG round trip.

This module is the single source of the degradation: :class:`JPEGDegradedPairedDataset` and
``basicsr prepare-csr`` both call :func:`degrade_csr`, which is why their LQ images are
bit-identical. The pipeline, exactly::

    GT uint8 BGR (H, W, 3), H and W multiples of scale (see mod_crop)
      -> float32 / 255 in [0, 1]
      -> bicubic 1/scale: basicsr.utils.matlab_functions.imresize (``matlab_bicubic``, MATLAB's
         antialiased imresize) or cv2.resize INTER_CUBIC (``cv2_bicubic``)
      -> clip to [0, 1] -> round(x * 255) -> uint8                              (the LR image)
      -> cv2.imencode('.jpg', quality q) -> cv2.imdecode                       (the LQ image)

Everything is deterministic given its arguments; no random state is touched.
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np
from basicsr.data.transforms import mod_crop as _basicsr_mod_crop
from basicsr.utils.matlab_functions import imresize as _matlab_imresize

__all__ = ['DOWNSAMPLE_METHODS', 'check_quality', 'mod_crop', 'bicubic_downsample', 'jpeg_round_trip',
           'degrade_csr', 'uint8_to_float']

DOWNSAMPLE_METHODS: Tuple[str, ...] = ('matlab_bicubic', 'cv2_bicubic')


def check_quality(quality: int) -> int:
    """Return ``quality`` as an int after checking it is a JPEG quality in [1, 100]."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= int(quality) <= 100:
        raise ValueError(f'JPEG quality must be an integer in [1, 100], got {quality!r}.')
    return int(quality)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that H and W are multiples of ``scale``; ``(H, W, C)`` -> ``(H', W', C)``."""
    return _basicsr_mod_crop(img, scale)


def uint8_to_float(img: np.ndarray) -> np.ndarray:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]`` (same shape)."""
    return img.astype(np.float32) / 255.


def bicubic_downsample(img: np.ndarray, scale: int, method: str = 'matlab_bicubic') -> np.ndarray:
    """Bicubic downscale of a uint8 BGR image by an integer factor.

    Args:
        img: uint8 ``(H, W, 3)``; H and W must be multiples of ``scale`` (use :func:`mod_crop`).
        scale: integer factor >= 1.
        method: ``'matlab_bicubic'`` (BasicSR's MATLAB-compatible imresize, the SR benchmark
            convention) or ``'cv2_bicubic'`` (``cv2.INTER_CUBIC``, no antialiasing).
    Returns:
        uint8 ``(H / scale, W / scale, 3)``: clipped to [0, 1] then rounded.
    """
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"Unknown downsample method {method!r}; choose one of {list(DOWNSAMPLE_METHODS)}.")
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f'bicubic_downsample expects a uint8 (H, W, C) image, got {img.dtype} {img.shape}.')
    h, w = img.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f'Image size {h}x{w} is not a multiple of scale {scale}; mod_crop it first.')
    if scale == 1:
        return img.copy()
    img_f = uint8_to_float(img)
    if method == 'matlab_bicubic':
        out = _matlab_imresize(img_f, 1 / scale)
    else:
        out = cv2.resize(img_f, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC)
        if out.ndim == 2:  # cv2 drops a single channel axis
            out = out[:, :, None]
    out = np.clip(out, 0, 1)
    return np.round(out * 255.).astype(np.uint8)


def jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 BGR ``(H, W, 3)`` image as JPEG at ``quality`` with OpenCV and decode it back.

    Returns uint8 ``(H, W, 3)``. OpenCV's defaults apply otherwise (4:2:0 chroma subsampling,
    baseline, no optimisation), as in ``cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, q])``.
    """
    quality = check_quality(quality)
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f'cv2.imencode failed to JPEG-encode an image of shape {img.shape}.')
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if out is None:
        raise RuntimeError('cv2.imdecode failed on a JPEG OpenCV just encoded.')
    return out


def degrade_csr(gt: np.ndarray, scale: int, quality: int, method: str = 'matlab_bicubic') -> np.ndarray:
    """The full CSR degradation: uint8 BGR GT ``(H, W, 3)`` -> uint8 BGR LQ ``(H/scale, W/scale, 3)``.

    ``gt`` must already be mod-cropped. Equivalent to ``jpeg_round_trip(bicubic_downsample(gt))``.
    """
    return jpeg_round_trip(bicubic_downsample(gt, scale, method), quality)
