"""``JPEGDegradedPairedDataset``: GT images paired with bicubic-downscaled, JPEG-compressed LQ.

Two modes, chosen by whether ``dataroot_lq`` is set:

* **on the fly** (no ``dataroot_lq``): LQ = :func:`~mambacsr_arch.data.degradations.degrade_csr`
  of the GT. Training: a random ``gt_size`` GT patch is cut (top/left on the ``scale`` grid),
  flipped/rotated, *then* degraded, so the LQ patch is always exactly the degraded GT patch;
  the JPEG quality is drawn per sample with python ``random`` (seeded per worker by BasicSR's
  ``worker_init_fn``). Validation/test: the whole mod-cropped image, quality
  ``qualities[index % len(qualities)]`` -- the same LQ every epoch, run and worker count.
  Samples also carry ``jpeg_quality`` (int).
* **pre-generated pairs** (``dataroot_lq`` set): BasicSR's ``PairedImageDataset`` options
  (``filename_tmpl``, ``meta_info_file``, lmdb), with LQ files paired by stem whatever their
  image extension (:mod:`mambacsr_arch.data.pairing`: ``HR/coffee.png`` + ``LR_q10/coffee.jpg``,
  ``0801.png`` + ``0801x4.jpg``) and robust decoding. Each LQ must be the mod-cropped GT divided
  by ``scale`` (``lq = gt // scale`` per side).

Options (YAML, BasicSR style)::

    dataroot_gt: path (folder, or *.lmdb with io_backend lmdb)       required
    dataroot_lq: path                                                 optional, see above
    io_backend: {type: disk | lmdb}                                   default disk
    meta_info_file: path (GT names, first token per line)             optional, disk only
    scale: int                                                        required (BasicSR fills it)
    jpeg_quality: 10 | [10, 20, 30, 40]   # int, or a LIST OF CHOICES (any length, even two)
    jpeg_quality_range: [10, 40]          # inclusive integer range; exclusive with jpeg_quality
    downsample: matlab_bicubic | cv2_bicubic                          default matlab_bicubic
    gt_size: int, multiple of scale                                   required when phase is train
    use_hflip / use_rot: bool                                         default false
    color: rgb | y                                                    default rgb
    mean / std: per-channel lists                                     optional normalisation
    phase: train | val | test                                         required (BasicSR fills it)
    strict_options: bool      # unknown keys: error (default true) or only a warning (false)

Images are decoded with :func:`~mambacsr_arch.data.image_io.read_image_bgr8` (grayscale -> 3
channels, alpha dropped, 16-bit scaled); anything unreadable raises an error naming the file.
With ``io_backend: lmdb`` every dataset of the process reading one database shares one environment
(:mod:`mambacsr_arch.data.shared_lmdb`).
"""
from __future__ import annotations

import difflib
import os.path as osp
import random
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from basicsr.data.data_util import paired_paths_from_lmdb, paths_from_lmdb
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import bgr2ycbcr, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data
from torchvision.transforms.functional import normalize

from ..errors import ConfigError
from ..registry import registers
from .checks import pair_size_problem
from .degradations import DOWNSAMPLE_METHODS, check_quality, degrade_csr, uint8_to_float
from .image_io import ImageFolderError, ImageReadError, decode_image_bgr8, list_image_files, read_image_bgr8
from .pairing import PairingError, paired_paths_from_folder, paired_paths_from_meta_info_file
from .shared_lmdb import SharedLmdbBackend

__all__ = ['JPEGDegradedPairedDataset', 'parse_quality_spec']

_OWN_KEYS = {
    'dataroot_gt', 'dataroot_lq', 'io_backend', 'meta_info_file', 'filename_tmpl', 'scale', 'jpeg_quality',
    'jpeg_quality_range', 'downsample', 'gt_size', 'use_hflip', 'use_rot', 'color', 'mean', 'std', 'phase',
    'strict_options'
}
# keys BasicSR's option parser, build_dataset/build_dataloader and samplers read from a dataset block
_BASICSR_KEYS = {
    'name', 'type', 'phase', 'scale', 'batch_size_per_gpu', 'num_worker_per_gpu', 'dataset_enlarge_ratio',
    'prefetch_mode', 'num_prefetch_queue', 'pin_memory', 'persistent_workers', 'use_shuffle', 'filename_tmpl',
    'meta_info_file'
}
KNOWN_KEYS = frozenset(_OWN_KEYS | _BASICSR_KEYS)


def parse_quality_spec(opt: Dict[str, Any], where: str = 'dataset') -> Tuple[int, ...]:
    """The candidate JPEG qualities from ``jpeg_quality`` / ``jpeg_quality_range``.

    * ``jpeg_quality: q`` -> ``(q,)``; ``jpeg_quality: [a, b, ...]`` -> those values (a list is
      always a set of choices, also when it has two elements);
    * ``jpeg_quality_range: [low, high]`` -> every integer ``low..high`` inclusive.
    Exactly one of the two keys must be given. Values must be integers in [1, 100].
    """
    has_q, has_r = opt.get('jpeg_quality') is not None, opt.get('jpeg_quality_range') is not None
    if has_q == has_r:
        raise ValueError(f'{where}: give exactly one of jpeg_quality (an int, or a list of qualities to choose '
                         'from) or jpeg_quality_range ([low, high], inclusive); got '
                         f"jpeg_quality={opt.get('jpeg_quality')!r}, "
                         f"jpeg_quality_range={opt.get('jpeg_quality_range')!r}.")
    try:
        if has_q:
            spec = opt['jpeg_quality']
            values = [spec] if not isinstance(spec, (list, tuple)) else list(spec)
            if not values:
                raise ValueError('empty list')
            return tuple(check_quality(q) for q in values)
        spec = opt['jpeg_quality_range']
        if not isinstance(spec, (list, tuple)) or len(spec) != 2:
            raise ValueError(f'expected [low, high], got {spec!r}')
        low, high = check_quality(spec[0]), check_quality(spec[1])
        if low > high:
            raise ValueError(f'low {low} > high {high}')
        return tuple(range(low, high + 1))
    except ValueError as err:
        key = 'jpeg_quality' if has_q else 'jpeg_quality_range'
        raise ValueError(f'{where}: invalid {key}: {err}') from None


def _check_keys(opt: Dict[str, Any], where: str) -> None:
    unknown = sorted(k for k in opt if k not in KNOWN_KEYS)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ''))
    msg = (f'{where}: unknown option(s) for JPEGDegradedPairedDataset: {", ".join(hints)}. '
           'Fix the spelling, or set strict_options: false to only warn.')
    if opt.get('strict_options', True):
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)


@registers(DATASET_REGISTRY)
class JPEGDegradedPairedDataset(data.Dataset):
    """GT / JPEG-compressed LQ pairs for compressed image SR; see the module doc for the options.

    ``__getitem__`` returns ``{'lq': (C, h, w), 'gt': (C, h*scale, w*scale)}`` float32 RGB (or Y)
    tensors in [0, 1] (before optional mean/std), plus ``lq_path``, ``gt_path`` (str; an LMDB key
    with the lmdb backend; in on-the-fly mode ``lq_path`` is the GT source) and, on the fly,
    ``jpeg_quality`` (int).
    """

    def __init__(self, opt: Dict[str, Any]) -> None:
        super().__init__()
        self.opt = opt
        self.where = f"datasets.{opt.get('name', '?')}"
        _check_keys(opt, self.where)
        self.phase = self._require('phase')
        if self.phase not in ('train', 'val', 'test'):
            raise ConfigError(f"{self.where}.phase: expected 'train', 'val' or 'test', got {self.phase!r}.")
        self.scale = self._require('scale')
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ConfigError(f'{self.where}.scale: expected a positive integer, got {self.scale!r}.')
        self.io_backend_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        self.backend = self.io_backend_opt.get('type', 'disk')
        if self.backend not in ('disk', 'lmdb'):
            raise ConfigError(f"{self.where}.io_backend.type: expected 'disk' or 'lmdb', got {self.backend!r}.")
        self.color = opt.get('color', 'rgb') or 'rgb'
        if self.color not in ('rgb', 'y'):
            raise ConfigError(f"{self.where}.color: expected 'rgb' or 'y', got {self.color!r}.")
        self.mean, self.std = opt.get('mean'), opt.get('std')
        self.use_hflip, self.use_rot = bool(opt.get('use_hflip', False)), bool(opt.get('use_rot', False))
        self.gt_size: Optional[int] = None
        if self.phase == 'train':
            self.gt_size = self._require('gt_size')
            if not isinstance(self.gt_size, int) or self.gt_size < self.scale or self.gt_size % self.scale:
                raise ConfigError(f'{self.where}.gt_size: expected a positive multiple of scale {self.scale}, '
                                 f'got {self.gt_size!r}.')

        self.gt_folder = self._existing_root('dataroot_gt')
        self.lq_folder = self._existing_root('dataroot_lq') if opt.get('dataroot_lq') is not None else None
        self.on_the_fly = self.lq_folder is None
        self.lmdb: Optional[SharedLmdbBackend] = None
        if self.on_the_fly:
            self.qualities = parse_quality_spec(opt, self.where)
            self.downsample = opt.get('downsample', 'matlab_bicubic')
            if self.downsample not in DOWNSAMPLE_METHODS:
                raise ConfigError(f'{self.where}.downsample: expected one of {list(DOWNSAMPLE_METHODS)}, '
                                 f'got {self.downsample!r}.')
            self.paths = self._gt_paths()
        else:
            for key in ('jpeg_quality', 'jpeg_quality_range', 'downsample'):
                if opt.get(key) is not None:
                    raise ConfigError(f'{self.where}.{key} has no effect when dataroot_lq is set (the LQ images '
                                     'are read, not generated); remove one of the two.')
            self.paths = self._paired_paths()
        if not self.paths:
            raise ConfigError(f'{self.where}: no images found in dataroot_gt {self.gt_folder!r}.')

    # ---------------------------------------------------------------- construction helpers
    def _require(self, key: str) -> Any:
        if self.opt.get(key) is None:
            raise ConfigError(f'{self.where}: option {key!r} is required.')
        return self.opt[key]

    def _existing_root(self, key: str) -> str:
        path = self._require(key)
        if not osp.exists(path):
            raise FileNotFoundError(f'{self.where}.{key}: {path!r} does not exist.')
        if self.backend == 'lmdb':
            if not path.endswith('.lmdb') or not osp.isfile(osp.join(path, 'meta_info.txt')):
                raise ConfigError(f'{self.where}.{key}: {path!r} is not a BasicSR LMDB (a *.lmdb folder with '
                                 'meta_info.txt), as io_backend lmdb requires.')
        elif not osp.isdir(path):
            raise NotADirectoryError(f'{self.where}.{key}: {path!r} is not a folder.')
        return path

    def _gt_paths(self) -> List[Dict[str, str]]:
        if self.backend == 'lmdb':
            names = sorted(paths_from_lmdb(self.gt_folder))
            self.io_backend_opt.update(db_paths=[self.gt_folder], client_keys=['gt'])
        elif self.opt.get('meta_info_file') is not None:
            meta = self.opt['meta_info_file']
            if not osp.isfile(meta):
                raise FileNotFoundError(f'{self.where}.meta_info_file: {meta!r} does not exist.')
            with open(meta, 'r', encoding='utf-8') as f:
                names = [osp.join(self.gt_folder, line.split()[0]) for line in f if line.strip()]
        else:
            names = list_image_files(self.gt_folder)
        return [{'gt_path': name, 'lq_path': name} for name in names]

    def _paired_paths(self) -> List[Dict[str, str]]:
        folders, keys = [self.lq_folder, self.gt_folder], ['lq', 'gt']
        tmpl = self.opt.get('filename_tmpl', '{}')
        try:
            if self.backend == 'lmdb':
                self.io_backend_opt.update(db_paths=folders, client_keys=keys)
                return paired_paths_from_lmdb(folders, keys)
            if self.opt.get('meta_info_file') is not None:
                if not osp.isfile(self.opt['meta_info_file']):
                    raise FileNotFoundError(f"meta_info_file {self.opt['meta_info_file']!r} does not exist")
                return paired_paths_from_meta_info_file(folders, keys, self.opt['meta_info_file'], tmpl)
            return paired_paths_from_folder(folders, keys, tmpl)
        except (PairingError, ImageFolderError) as err:  # they name the files already; keep their type
            raise type(err)(f'{self.where}: {err}') from err
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f'{self.where}: cannot pair dataroot_lq {self.lq_folder!r} with dataroot_gt '
                             f'{self.gt_folder!r}: {err}') from err

    # ---------------------------------------------------------------- reading
    def _read(self, path: str, client_key: str) -> np.ndarray:
        """uint8 BGR (H, W, 3) from the disk path or LMDB key ``path``."""
        if self.backend != 'lmdb':
            return read_image_bgr8(path)
        if self.lmdb is None:
            backend_opt = dict(self.io_backend_opt)
            backend_opt.pop('type', None)
            self.lmdb = SharedLmdbBackend(**backend_opt)
        db = self.gt_folder if client_key == 'gt' else self.lq_folder
        content = self.lmdb.get(path, client_key)
        if content is None:
            raise ImageReadError(f"{db}:{path}: LMDB {db!r} has no key {path!r} (listed in its meta_info.txt); "
                                 'rebuild the LMDB.')
        return decode_image_bgr8(content, f'{db}:{path}')

    def quality_for_index(self, index: int) -> int:
        """The JPEG quality of sample ``index``: random per call when training, fixed otherwise."""
        if self.phase == 'train':
            return random.choice(self.qualities)
        return self.qualities[index % len(self.qualities)]

    # ---------------------------------------------------------------- samples
    def _on_the_fly(self, index: int, gt_path: str) -> Tuple[np.ndarray, np.ndarray, int]:
        gt = self._read(gt_path, 'gt')
        scale = self.scale
        h, w = gt.shape[0] - gt.shape[0] % scale, gt.shape[1] - gt.shape[1] % scale
        if self.phase == 'train':
            size = self.gt_size
            if h < size or w < size:
                raise ValueError(f'{gt_path}: image is {gt.shape[0]}x{gt.shape[1]} ({h}x{w} after mod-crop to '
                                 f'scale {scale}), smaller than gt_size {size}; remove it or lower gt_size.')
            top = random.randint(0, (h - size) // scale) * scale
            left = random.randint(0, (w - size) // scale) * scale
            gt = np.ascontiguousarray(gt[top:top + size, left:left + size])
            gt = augment(gt, self.use_hflip, self.use_rot)
            gt = np.ascontiguousarray(gt)
        else:
            if h == 0 or w == 0:
                raise ValueError(f'{gt_path}: image is {gt.shape[0]}x{gt.shape[1]}, smaller than scale {scale}.')
            gt = np.ascontiguousarray(gt[:h, :w])
        quality = self.quality_for_index(index)
        lq = degrade_csr(gt, scale, quality, self.downsample)
        return uint8_to_float(gt), uint8_to_float(lq), quality

    def _pre_generated(self, gt_path: str, lq_path: str) -> Tuple[np.ndarray, np.ndarray]:
        gt = uint8_to_float(self._read(gt_path, 'gt'))
        lq = uint8_to_float(self._read(lq_path, 'lq'))
        scale = self.scale
        h_lq, w_lq = lq.shape[:2]
        problem = pair_size_problem(gt.shape[:2], (h_lq, w_lq), scale)
        if problem is not None:
            raise ValueError(f'{gt_path} with LQ {lq_path}: {problem}; fix the pair or the scale option.')
        if self.phase == 'train':
            lq_size = self.gt_size // scale
            if h_lq < lq_size or w_lq < lq_size:
                raise ValueError(f'{lq_path}: LQ is {h_lq}x{w_lq}, smaller than the training patch '
                                 f'{lq_size}x{lq_size} (gt_size {self.gt_size} / scale {scale}).')
            gt, lq = gt[:h_lq * scale, :w_lq * scale], lq
            gt, lq = paired_random_crop(gt, lq, self.gt_size, scale, gt_path)
            gt, lq = augment([np.ascontiguousarray(gt), np.ascontiguousarray(lq)], self.use_hflip, self.use_rot)
        else:
            gt = gt[:h_lq * scale, :w_lq * scale]
        return gt, lq

    def __getitem__(self, index: int) -> Dict[str, Any]:
        gt_path, lq_path = self.paths[index]['gt_path'], self.paths[index]['lq_path']
        out: Dict[str, Any] = {}
        if self.on_the_fly:
            img_gt, img_lq, out['jpeg_quality'] = self._on_the_fly(index, gt_path)
        else:
            img_gt, img_lq = self._pre_generated(gt_path, lq_path)
        if self.color == 'y':
            img_gt = bgr2ycbcr(img_gt, y_only=True)[..., None]
            img_lq = bgr2ycbcr(img_lq, y_only=True)[..., None]
        img_gt, img_lq = img2tensor([np.ascontiguousarray(img_gt), np.ascontiguousarray(img_lq)],
                                    bgr2rgb=self.color == 'rgb', float32=True)
        if self.mean is not None or self.std is not None:
            normalize(img_lq, self.mean, self.std, inplace=True)
            normalize(img_gt, self.mean, self.std, inplace=True)
        out.update(lq=img_lq, gt=img_gt, lq_path=lq_path, gt_path=gt_path)
        return out

    def __len__(self) -> int:
        return len(self.paths)
