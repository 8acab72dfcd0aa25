"""Data-loading throughput: on-the-fly CSR degradation vs BasicSR's PairedImageDataset on pre-made pairs.

Per-worker figures (one process, torch and OpenCV limited to one thread, as inside a DataLoader
worker). Images are DIV2K-sized (2040x1356), synthesised by tiling resized scikit-image photos.

    .venv/bin/python benchmarks/bench_data.py [--images 4] [--patches 40] [--quality 10] [--keep DIR]

Rows: training patches (gt_size 256, from whole images and from 480x480 sub-images as the official
recipe) and whole-image validation. ``ratio`` = on-the-fly samples/s / PairedImageDataset samples/s.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import random
import shutil
import sys
import tempfile
import time
from typing import Callable, List, Tuple

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import mambacsr_arch  # noqa: E402,F401  (shims before basicsr)
from basicsr.data.paired_image_dataset import PairedImageDataset  # noqa: E402
from mambacsr_arch.data.jpeg_degraded_dataset import JPEGDegradedPairedDataset  # noqa: E402
from mambacsr_arch.data.prepare import PrepareConfig, prepare_csr  # noqa: E402

DIV2K_HW = (1356, 2040)
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry')


def div2k_like(index: int) -> np.ndarray:
    """A 1356x2040 uint8 BGR image: 2x2 tiles of resized photos, flipped for variety."""
    import skimage.data

    h, w = DIV2K_HW[0] // 2, DIV2K_HW[1] // 2
    tiles = []
    for k in range(4):
        rgb = getattr(skimage.data, PHOTOS[(index + k) % len(PHOTOS)])()
        tile = cv2.resize(np.ascontiguousarray(rgb[:, :, 2::-1]), (w, h), interpolation=cv2.INTER_CUBIC)
        tiles.append(tile[:, ::-1] if (index + k) % 2 else tile)
    return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)


def rate(get: Callable[[int], object], n: int, count: int) -> float:
    """Samples per second of ``get(i)`` over ``count`` calls (after one warm-up call)."""
    get(0)
    start = time.perf_counter()
    for i in range(count):
        get(i % n)
    return count / (time.perf_counter() - start)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=4, help='number of DIV2K-sized images')
    parser.add_argument('--patches', type=int, default=40, help='training samples timed per row')
    parser.add_argument('--quality', type=int, default=10)
    parser.add_argument('--keep', default=None, help='work folder to keep (default: a temporary one)')
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    random.seed(0)
    work = args.keep or tempfile.mkdtemp(prefix='bench_data_')
    gt_dir = osp.join(work, 'src')
    os.makedirs(gt_dir, exist_ok=True)
    for i in range(args.images):
        cv2.imwrite(osp.join(gt_dir, f'{i:04d}.png'), div2k_like(i), [cv2.IMWRITE_PNG_COMPRESSION, 3])

    out = osp.join(work, 'csr')
    start = time.perf_counter()
    prepare_csr(PrepareConfig(gt_dir=gt_dir, out_dir=out, qualities=[args.quality], scale=4, crop=480, step=240,
                              workers=1, progress=False))
    prep_s = (time.perf_counter() - start) / args.images
    lq = osp.join(out, f'LQ_q{args.quality}')

    def fly(phase: str, downsample: str = 'matlab_bicubic', root: str = gt_dir) -> JPEGDegradedPairedDataset:
        return JPEGDegradedPairedDataset(dict(name='b', phase=phase, scale=4, dataroot_gt=root, gt_size=256,
                                              use_hflip=True, use_rot=True, jpeg_quality=args.quality,
                                              downsample=downsample))

    def paired(phase: str, gt: str, lq_: str) -> PairedImageDataset:
        return PairedImageDataset(dict(phase=phase, scale=4, dataroot_gt=gt, dataroot_lq=lq_, gt_size=256,
                                       use_hflip=True, use_rot=True, io_backend={'type': 'disk'}))

    n, n_sub = args.images, len(os.listdir(osp.join(out, 'GT_sub')))
    rows: List[Tuple[str, float, float]] = []
    base = rate(paired('train', osp.join(out, 'GT'), lq).__getitem__, n, args.patches)
    rows.append(('train gt_size 256, whole 2040x1356 images (matlab)', rate(fly('train').__getitem__, n,
                                                                            args.patches), base))
    rows.append(('train gt_size 256, whole 2040x1356 images (cv2)', rate(fly('train', 'cv2_bicubic').__getitem__,
                                                                         n, args.patches), base))
    base_sub = rate(paired('train', osp.join(out, 'GT_sub'), lq + '_sub').__getitem__, n_sub, args.patches)
    rows.append(('train gt_size 256, 480x480 sub-images (matlab)',
                 rate(fly('train', root=osp.join(out, 'GT_sub')).__getitem__, n_sub, args.patches), base_sub))
    count = max(2, n)
    base_val = rate(paired('val', osp.join(out, 'GT'), lq).__getitem__, n, count)
    rows.append(('val whole 2040x1356 image (matlab)', rate(fly('val').__getitem__, n, count), base_val))
    rows.append(('val whole 2040x1356 image (cv2)', rate(fly('val', 'cv2_bicubic').__getitem__, n, count), base_val))

    print(f'\nper worker (1 thread); JPEG quality {args.quality}; scale 4; {n} images of {DIV2K_HW[1]}x{DIV2K_HW[0]}')
    print(f'{"case":<52} {"on-the-fly/s":>13} {"Paired/s":>10} {"ratio":>7}')
    for name, ours, theirs in rows:
        print(f'{name:<52} {ours:>13.2f} {theirs:>10.2f} {ours / theirs:>7.2f}')
    print(f'prepare-csr (one quality, with 480/240 sub-images): {prep_s:.2f} s per image')
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == '__main__':
    sys.exit(main())
