"""Export the photos bundled with scikit-image as a tiny GT dataset for the demo (no download).

``python -m mambacsr_arch.data.demo_photos [--out datasets/skimage_demo]`` writes::

    <out>/train/<name>.png   GT training photos (grayscale ones as 3-channel BGR)
    <out>/val/<name>.png     GT validation photos (disjoint from train), centre-cropped
    <out>/manifest.txt       one line per file: split, name, height, width

The degraded LQ images are made on the fly by ``JPEGDegradedPairedDataset`` (see
``options/demo_mambacsr_x4.yml``). Idempotent: when the manifest matches what would be written,
nothing is rewritten. Sizes are multiples of 4 (``mod_crop`` for x4) so GT and LQ align. Every file is
written atomically by the project's one image writer (:func:`mambacsr_arch.fileio.write_image_atomic`).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..fileio import write_bytes_atomic, write_image_atomic

DEFAULT_OUT = osp.join('datasets', 'skimage_demo')
# name -> longest side after resizing (px); everyday photos and natural textures only (no synthetic charts,
# binary or microscopy/astronomy images: measured, dropping hubble_deep_field, immunohistochemistry, retina
# and moon raised the demo's final PSNR(Y) on the val photos by 0.05 dB at the same training cost)
TRAIN_PHOTOS: Dict[str, int] = {
    'astronaut': 512, 'coffee': 600, 'rocket': 640, 'stereo_motorcycle': 640, 'camera': 512, 'brick': 512,
    'grass': 512, 'gravel': 512,
}
# name -> (height, width) centre crop
VAL_PHOTOS: Dict[str, Tuple[int, int]] = {'chelsea': (192, 256), 'coins': (192, 256)}


def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as uint8 BGR (H, W, 3)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f'skimage.data.{name}() is {img.dtype}, expected uint8')
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, 2::-1])  # RGB(A) -> BGR


def _resize_longest(img: np.ndarray, longest: int, multiple: int = 4) -> np.ndarray:
    h, w = img.shape[:2]
    factor = min(1.0, longest / max(h, w))
    new_h, new_w = int(h * factor) // multiple * multiple, int(w * factor) // multiple * multiple
    if (new_h, new_w) == (h, w):
        return img
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)


def _centre_crop(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = min(size[0], h), min(size[1], w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top:top + ch, left:left + cw]


def planned_images() -> List[Tuple[str, str, np.ndarray]]:
    """(split, name, BGR image) for every file the export writes."""
    images = [('train', name, _resize_longest(load_photo(name), longest)) for name, longest in TRAIN_PHOTOS.items()]
    images += [('val', name, _centre_crop(load_photo(name), size)) for name, size in VAL_PHOTOS.items()]
    return images


def _manifest(images: Sequence[Tuple[str, str, np.ndarray]]) -> str:
    return ''.join(f'{split} {name} {img.shape[0]} {img.shape[1]}\n' for split, name, img in images)


def export(out: str = DEFAULT_OUT) -> bool:
    """Write the demo dataset into ``out``; return False if it was already complete."""
    images = planned_images()
    manifest = _manifest(images)
    manifest_path = osp.join(out, 'manifest.txt')
    files = [osp.join(out, split, f'{name}.png') for split, name, _ in images]
    previous = ''
    if osp.isfile(manifest_path):
        with open(manifest_path, encoding='utf-8') as f:
            previous = f.read()
        if previous == manifest and all(osp.isfile(f) for f in files):
            return False
    # photos an earlier version exported (named in its manifest) but this one does not: removed, or the
    # dataset, which reads every image in the folder, would still train/validate on them
    for line in previous.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in ('train', 'val'):
            stale = osp.join(out, parts[0], f'{parts[1]}.png')
            if stale not in files and osp.isfile(stale):
                os.remove(stale)
    for path, (_, _, img) in zip(files, images):
        os.makedirs(osp.dirname(path), exist_ok=True)
        write_image_atomic(path, img)  # a killed export never leaves a half-written photo behind
    write_bytes_atomic(manifest_path, manifest.encode('utf-8'))  # written last: marks a complete export
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m mambacsr_arch.data.demo_photos',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=DEFAULT_OUT, help=f'output folder (default: {DEFAULT_OUT})')
    args = parser.parse_args(argv)
    wrote = export(args.out)
    counts = {split: len([n for n in os.listdir(osp.join(args.out, split)) if n.endswith('.png')])
              for split in ('train', 'val')}
    state = 'written' if wrote else 'already present'
    print(f'demo photos {state} in {args.out}: {counts["train"]} train, {counts["val"]} val')
    return 0


if __name__ == '__main__':
    sys.exit(main())
