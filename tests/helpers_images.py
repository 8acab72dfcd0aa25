"""Tiny test image folders made from the photos scikit-image ships (no network).

Public API (other test modules import it)::

    photo_bgr(name='astronaut', size=(h, w)) -> uint8 BGR (h, w, 3)
    make_image_folder(dir, names=('astronaut', 'chelsea'), size=(h, w), ext='.png') -> [paths]

Files are named ``<photo>.<ext>`` (``<photo>_<i>`` if a name repeats).
"""
from __future__ import annotations

import os
import os.path as osp
from typing import List, Sequence, Tuple, Union

import cv2
import numpy as np

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'camera')


def photo_bgr(name: str = 'astronaut', size: Tuple[int, int] = (96, 128)) -> np.ndarray:
    """A scikit-image photo as uint8 BGR ``(h, w, 3)``: centre-cropped to the aspect of ``size``, then resized."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = np.ascontiguousarray(img[:, :, 2::-1])  # RGB(A) -> BGR
    h, w = size
    src_h, src_w = img.shape[:2]
    # crop to target aspect, then resize with area interpolation (keeps real texture)
    if src_h * w > src_w * h:
        crop_h = max(1, src_w * h // w)
        top = (src_h - crop_h) // 2
        img = img[top:top + crop_h]
    else:
        crop_w = max(1, src_h * w // h)
        left = (src_w - crop_w) // 2
        img = img[:, left:left + crop_w]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def make_image_folder(folder: Union[str, os.PathLike],
                      names: Sequence[str] = ('astronaut', 'chelsea'),
                      size: Tuple[int, int] = (96, 128),
                      ext: str = '.png') -> List[str]:
    """Write one image per photo name into ``folder`` (created); return the file paths in order."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths, seen = [], {}
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        stem = name if count == 0 else f'{name}_{count}'
        path = osp.join(folder, stem + ext)
        if not cv2.imwrite(path, photo_bgr(name, size)):
            raise OSError(f'cv2.imwrite failed for {path}')
        paths.append(path)
    return paths
