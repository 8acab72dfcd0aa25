"""The authors' folder layouts, built from scikit-image photos, for tests/test_official_files.py.

Public API::

    build_mambacsr_testsets(root, sets=MAMBACSR_TESTSETS, quality=10) -> {set: [(gt, lq), ...]}
        Testsets/<Set>/HR/<stem>.png + Testsets/<Set>/LR_q<quality>/<stem><tmpl>.jpg, as in the
        Google-drive download renyulin-f/MambaCSR's README links (DIV2K's LQ named '<stem>x4').
    build_mambacsr_train_set(root, quality=10, ...) -> [(gt, lq), ...]
        CSR_dataset/DF2K_HR_sub/*.png + CSR_dataset/LR_10_sub/*.png (extract_subimages.py names).
    build_hat_testsets(root, sets) -> {set name: [(gt, lq), ...]}
        ./datasets/<folder>/GTmod4/<stem>.png + ./datasets/<folder>/LRbicx4/<stem>.png (no JPEG).
    read_rgb_tensor(path) -> (1, 3, h, w) float32 in [0, 1], as BasicSR's PairedImageDataset reads it.

Each LQ file is checked after writing: its decoded pixels equal mambacsr_arch.data.degradations'
``degrade_csr`` (JPEG sets) or ``bicubic_downsample`` (HAT sets) of the GT, so the folders hold
exactly the project's degradation.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

from helpers_images import photo_bgr
from mambacsr_arch.data.degradations import bicubic_downsample, degrade_csr

SCALE = 4
# (set folder, LQ name template, [(stem, photo, GT (h, w))]): GT sizes are multiples of 4 and give LR
# sides that are odd, exact multiples of 64, and (DIV2K) above the official 192-px chop size in both
# directions, so every branch of the official chop protocol runs; every chop is at least 32 LR px, so
# the official single mirror copy always reaches the padded size.
MAMBACSR_TESTSETS: Tuple[Tuple[str, str, Tuple[Tuple[str, str, Tuple[int, int]], ...]], ...] = (
    ('Set5', '{}', (('baby', 'astronaut', (176, 160)), ('bird', 'chelsea', (164, 200)))),
    ('Set14', '{}', (('coffee', 'coffee', (200, 260)),)),
    ('Urban100', '{}', (('img_001', 'rocket', (256, 180)),)),
    ('Manga109', '{}', (('AisazuNihaIrarenai', 'camera', (180, 140)),)),
    ('DIV2K', '{}x4', (('0801', 'astronaut', (788, 776)),)),
)


def _write(path: str, img: np.ndarray, params: Sequence[int] = ()) -> str:
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, img, list(params)):
        raise OSError(f'cv2.imwrite failed for {path}')
    return path


def _write_jpeg_lq(path: str, gt: np.ndarray, quality: int) -> str:
    """Write the CSR LQ of ``gt`` as a JPEG file and check it decodes to ``degrade_csr(gt)``."""
    _write(path, bicubic_downsample(gt, SCALE), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not np.array_equal(cv2.imread(path, cv2.IMREAD_COLOR), degrade_csr(gt, SCALE, quality)):
        raise AssertionError(f'{path} does not decode to degrade_csr of its GT')
    return path


def build_mambacsr_testsets(root: str, sets=MAMBACSR_TESTSETS, quality: int = 10) -> Dict[str, List[tuple]]:
    """renyulin-f/MambaCSR's evaluation layout under ``root/Testsets``; returns {set: [(gt, lq), ...]}."""
    pairs: Dict[str, List[tuple]] = {}
    for folder, tmpl, images in sets:
        base = osp.join(root, 'Testsets', folder)
        pairs[folder] = []
        for stem, photo, size in images:
            gt = photo_bgr(photo, size)
            gt_path = _write(osp.join(base, 'HR', stem + '.png'), gt)
            lq_path = _write_jpeg_lq(osp.join(base, f'LR_q{quality}', tmpl.format(stem) + '.jpg'), gt, quality)
            pairs[folder].append((gt_path, lq_path))
    return pairs


def build_mambacsr_train_set(root: str, quality: int = 10, photos: Sequence[str] = ('coffee', 'rocket'),
                             sub: int = 64) -> List[tuple]:
    """``root/CSR_dataset/{DF2K_HR_sub,LR_10_sub}``: two GT sub-images per photo, LQ saved as PNG."""
    pairs = []
    for index, photo in enumerate(photos, start=1):
        gt_full = photo_bgr(photo, (sub, 2 * sub))
        for part in range(2):
            name = f'{index:04d}_s{part + 1:03d}.png'
            gt = np.ascontiguousarray(gt_full[:, part * sub:(part + 1) * sub])
            gt_path = _write(osp.join(root, 'CSR_dataset', 'DF2K_HR_sub', name), gt)
            lq_path = _write(osp.join(root, 'CSR_dataset', f'LR_{quality}_sub', name), degrade_csr(gt, SCALE, quality))
            pairs.append((gt_path, lq_path))
    return pairs


def build_hat_testsets(root: str, sets: Sequence[Tuple[str, Sequence[Tuple[str, str, Tuple[int, int]]]]]
                       ) -> Dict[str, List[tuple]]:
    """XPixelGroup/HAT's ``./datasets/<folder>/{GTmod4,LRbicx4}`` layout; returns {folder: [(gt, lq), ...]}."""
    pairs: Dict[str, List[tuple]] = {}
    for folder, images in sets:
        base = osp.join(root, 'datasets', folder)
        pairs[folder] = []
        for stem, photo, size in images:
            gt = photo_bgr(photo, size)
            gt_path = _write(osp.join(base, 'GTmod4', stem + '.png'), gt)
            lq_path = _write(osp.join(base, 'LRbicx4', stem + '.png'), bicubic_downsample(gt, SCALE))
            pairs[folder].append((gt_path, lq_path))
    return pairs


def read_rgb_tensor(path: str) -> torch.Tensor:
    """An 8-bit image file as BasicSR's datasets feed it: (1, 3, h, w) float32 RGB in [0, 1]."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f'cannot read {path}')
    rgb = np.ascontiguousarray(img[:, :, ::-1]).astype(np.float32) / 255.
    return torch.from_numpy(rgb.transpose(2, 0, 1)).unsqueeze(0)
