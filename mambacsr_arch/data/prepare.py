"""``basicsr prepare-csr``: write GT / JPEG-degraded LQ folders, sub-images, LMDBs and a manifest.

Output layout under ``out``::

    GT/<stem>.png              the GT, decoded like the dataset does and mod-cropped to ``scale``
    LQ_q<Q>/<stem>.png         degrade_csr(GT, scale, Q): the decoded JPEG, stored losslessly
    GT_sub/<stem>_s001.png     with crop: GT sub-images (crop x crop, every step pixels)
    LQ_q<Q>_sub/<stem>_s001.png  the matching LQ sub-images (crop/scale, every step/scale pixels)
    <folder>.lmdb              with lmdb: one BasicSR LMDB per folder above (keys = file stems)
    manifest.json              options, library versions (OpenCV, libjpeg), counts, failures

The LQ come from :func:`~mambacsr_arch.data.degradations.degrade_csr`, the function the dataset
uses, so ``LQ_q<Q>/x.png`` is bit-identical to the dataset's validation LQ of ``x`` at quality Q.
Sub-images follow BasicSR's ``extract_subimages`` recipe (positions ``0, step, 2*step, ...`` plus
a last one flush with the border when more than ``thresh`` pixels would be left over): whole
images are degraded first and both GT and LQ are then cut, the LQ at the GT positions / scale.
(The on-the-fly dataset instead degrades each training patch; the two differ near patch borders.)

Resuming: every file is written to a hidden temporary name, then renamed, so a killed run leaves
no half-written PNG. Per image, the sub-images are written before the whole image, so an
existing ``LQ_q<Q>/<stem>.png`` (or ``GT/<stem>.png``) means that part is complete and a re-run
skips it. A corrupt input is reported, listed in the manifest and skipped; the others finish.
Re-running with a different scale, downsample or crop/step/thresh into the same ``out`` is refused
(new qualities and new source images are fine). Do not run two instances on one ``out`` at once:
each removes the other's in-progress temporaries on start.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import os.path as osp
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .degradations import DOWNSAMPLE_METHODS, check_quality, degrade_csr, mod_crop
from .image_io import ImageReadError, list_image_files, read_image_bgr8

__all__ = ['PrepareError', 'PrepareConfig', 'PrepareResult', 'prepare_csr', 'subimage_grid', 'libjpeg_version']

PNG_COMPRESSION = 3  # as BasicSR's extract_subimages; lossless either way
_COMPARED_OPTIONS = ('scale', 'downsample', 'crop', 'step', 'thresh')


class PrepareError(ValueError):
    """The request cannot be carried out (bad option, unusable folder); the message says what to fix."""


@dataclass
class PrepareConfig:
    """Options of :func:`prepare_csr` (the CLI flags of ``basicsr prepare-csr``)."""
    gt_dir: str
    out_dir: str
    qualities: Sequence[int]
    scale: int = 4
    downsample: str = 'matlab_bicubic'
    crop: Optional[int] = None  # GT sub-image size in pixels; None: whole images only
    step: Optional[int] = None  # GT sub-image stride; default crop // 2
    thresh: int = 0  # leftover (pixels) above which a last, border-flush sub-image is added
    lmdb: bool = False
    workers: int = 1
    progress: bool = True


@dataclass
class PrepareResult:
    """What a run did. ``failed``: ``[{'file', 'error'}]``; ``ok`` is False when any input failed."""
    inputs: int
    written: int
    skipped: int
    failed: List[Dict[str, str]] = field(default_factory=list)
    no_subimages: List[str] = field(default_factory=list)
    folders: Dict[str, int] = field(default_factory=dict)
    lmdbs: List[str] = field(default_factory=list)
    manifest: str = ''

    @property
    def ok(self) -> bool:
        return not self.failed


def libjpeg_version() -> str:
    """The JPEG codec OpenCV was built with, from ``cv2.getBuildInformation()`` (e.g. 'libjpeg-turbo (ver 3.1)')."""
    for line in cv2.getBuildInformation().splitlines():
        match = re.match(r'\s*JPEG:\s*(.+)$', line)
        if match:
            return match.group(1).strip()
    return 'unknown'


def subimage_grid(height: int, width: int, crop: int, step: int, thresh: int) -> List[Tuple[int, int]]:
    """Top-left corners ``(top, left)`` of the sub-images, row-major, as BasicSR's extract_subimages.

    Empty when the image is smaller than ``crop`` in either direction.
    """

    def axis(size: int) -> List[int]:
        if size < crop:
            return []
        starts = list(range(0, size - crop + 1, step))
        if size - (starts[-1] + crop) > thresh:
            starts.append(size - crop)
        return starts

    return [(top, left) for top in axis(height) for left in axis(width)]


def _write_png(path: str, img: np.ndarray) -> None:
    """Write ``img`` as PNG atomically: hidden temporary file in the same folder, then rename."""
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise OSError(f'cv2.imencode could not encode {path} as PNG')
    folder, name = osp.split(path)
    tmp = osp.join(folder, f'.{name}.{os.getpid()}.tmp')
    with open(tmp, 'wb') as f:
        f.write(buf.tobytes())
    os.replace(tmp, path)


def _write_with_subs(img: np.ndarray, folder: str, stem: str, grid: List[Tuple[int, int]], size: int,
                     div: int) -> int:
    """Sub-images of ``img`` (positions ``grid // div``, ``size`` px) into ``folder + '_sub'``, then the whole."""
    for index, (top, left) in enumerate(grid, start=1):
        top, left = top // div, left // div
        _write_png(osp.join(f'{folder}_sub', f'{stem}_s{index:03d}.png'), img[top:top + size, left:left + size])
    _write_png(osp.join(folder, f'{stem}.png'), img)
    return len(grid) + 1


def _process_one(task: Tuple[str, str, Dict[str, Any]]) -> Dict[str, Any]:
    """Worker: all outputs of one source image. Returns ``{'stem', 'status', ...}``; never raises for bad input."""
    src, stem, cfg = task
    out, scale, crop = cfg['out_dir'], cfg['scale'], cfg['crop']
    todo_q = [q for q in cfg['qualities'] if not osp.exists(osp.join(out, f'LQ_q{q}', f'{stem}.png'))]
    todo_gt = not osp.exists(osp.join(out, 'GT', f'{stem}.png'))
    if not todo_q and not todo_gt:
        return {'stem': stem, 'status': 'skipped'}
    try:
        gt = mod_crop(read_image_bgr8(src), scale)
    except ImageReadError as err:
        return {'stem': stem, 'status': 'failed', 'file': src, 'error': str(err)}
    if gt.shape[0] == 0 or gt.shape[1] == 0:
        return {'stem': stem, 'status': 'failed', 'file': src, 'error': f'{src}: smaller than scale {scale}.'}
    grid = subimage_grid(gt.shape[0], gt.shape[1], crop, cfg['step'], cfg['thresh']) if crop else []
    files = 0
    for quality in todo_q:
        lq = degrade_csr(gt, scale, quality, cfg['downsample'])
        files += _write_with_subs(lq, osp.join(out, f'LQ_q{quality}'), stem, grid, (crop or 0) // scale, scale)
    if todo_gt:  # last: its presence marks the image as done
        files += _write_with_subs(gt, osp.join(out, 'GT'), stem, grid, crop or 0, 1)
    return {'stem': stem, 'status': 'written', 'files': files, 'no_subimages': bool(crop) and not grid}


def _init_worker() -> None:
    cv2.setNumThreads(1)
    try:
        import torch
        torch.set_num_threads(1)  # BasicSR's matlab imresize runs on torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of basicsr
        pass


def _check_config(cfg: PrepareConfig) -> PrepareConfig:
    if not osp.isdir(cfg.gt_dir):
        raise PrepareError(f'--gt: {cfg.gt_dir!r} is not a folder.')
    if not cfg.qualities:
        raise PrepareError('--quality: give at least one JPEG quality, e.g. --quality 10 20 30 40.')
    try:
        qualities = tuple(sorted({check_quality(q) for q in cfg.qualities}))
    except ValueError as err:
        raise PrepareError(f'--quality: {err}') from None
    if cfg.scale < 1:
        raise PrepareError(f'--scale: expected a positive integer, got {cfg.scale}.')
    if cfg.downsample not in DOWNSAMPLE_METHODS:
        raise PrepareError(f'--downsample: expected one of {list(DOWNSAMPLE_METHODS)}, got {cfg.downsample!r}.')
    step, thresh = cfg.step, cfg.thresh
    if cfg.crop is not None:
        step = cfg.crop // 2 if step is None else step
        for flag, value in (('--crop', cfg.crop), ('--step', step)):
            if value < cfg.scale or value % cfg.scale:
                raise PrepareError(f'{flag}: {value} must be a positive multiple of --scale {cfg.scale} so the LQ '
                                   'sub-images stay aligned.')
        if thresh < 0:
            raise PrepareError(f'--thresh: must be >= 0, got {thresh}.')
    elif step is not None:
        raise PrepareError('--step needs --crop.')
    workers = max(1, int(cfg.workers))
    return PrepareConfig(osp.abspath(cfg.gt_dir), osp.abspath(cfg.out_dir), qualities, cfg.scale, cfg.downsample,
                         cfg.crop, step if cfg.crop else None, thresh if cfg.crop else 0, cfg.lmdb, workers,
                         cfg.progress)


def _list_sources(cfg: PrepareConfig) -> List[Tuple[str, str]]:
    sources = [(path, osp.splitext(osp.basename(path))[0]) for path in list_image_files(cfg.gt_dir)]
    if not sources:
        raise PrepareError(f'--gt: no images ({", ".join(("png", "jpg", "bmp", "tif", "webp"))}...) in '
                           f'{cfg.gt_dir!r}.')
    by_stem: Dict[str, str] = {}
    for path, stem in sources:
        if stem in by_stem:
            raise PrepareError(f'{by_stem[stem]} and {path} have the same name {stem!r}; outputs are PNGs named by '
                               'stem, so rename one.')
        by_stem[stem] = path
    if cfg.lmdb:
        bad = [p for p, s in sources if '.' in s or not s.isascii() or ' ' in s]
        if bad:
            raise PrepareError(f'--lmdb: BasicSR LMDB keys are ASCII file stems without dots or spaces; rename: '
                               f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}.')
    return sources


def _previous_manifest(cfg: PrepareConfig) -> Dict[str, Any]:
    path = osp.join(cfg.out_dir, 'manifest.json')
    if not osp.exists(path):
        return {}
    try:
        with open(path, 'r', encoding='utf-8') as f:
            old = json.load(f)
    except (OSError, ValueError) as err:
        raise PrepareError(f'{path}: unreadable manifest ({err}); delete it only if the outputs in --out were '
                           'made with the same --scale/--downsample/--crop/--step/--thresh.') from None
    for key in _COMPARED_OPTIONS:
        if key in old and old[key] != getattr(cfg, key):
            raise PrepareError(f'--out {cfg.out_dir!r} holds outputs made with {key}={old[key]!r}, not '
                               f'{getattr(cfg, key)!r}; choose another --out or delete it.')
    return old


def _output_folders(cfg: PrepareConfig, qualities: Sequence[int]) -> List[str]:
    folders = ['GT'] + [f'LQ_q{q}' for q in qualities]
    return folders + [f'{f}_sub' for f in folders] if cfg.crop else folders


def _remove_stale_temporaries(folder: str) -> None:
    for name in os.listdir(folder):
        if name.startswith('.') and name.endswith('.tmp'):
            os.remove(osp.join(folder, name))


def _build_lmdb(out_dir: str, folder: str, verbose: bool) -> str:
    """``out/<folder>.lmdb`` from ``out/<folder>`` with BasicSR's make_lmdb_from_imgs; reused when complete."""
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    src, final = osp.join(out_dir, folder), osp.join(out_dir, f'{folder}.lmdb')
    names = sorted(n for n in os.listdir(src) if n.endswith('.png') and not n.startswith('.'))
    keys = [osp.splitext(n)[0] for n in names]
    meta = osp.join(final, 'meta_info.txt')
    if osp.isfile(meta):
        with open(meta, 'r', encoding='utf-8') as f:
            if sorted(line.split('.')[0] for line in f if line.strip()) == keys:
                return final
    tmp = osp.join(out_dir, f'.{folder}.incomplete.lmdb')
    for path in (tmp, final):
        if osp.exists(path):
            shutil.rmtree(path)
    if names:
        size = sum(osp.getsize(osp.join(src, n)) for n in names)
        with contextlib.ExitStack() as stack:
            if not verbose:  # BasicSR prints and draws a bar per LMDB
                sink = stack.enter_context(open(os.devnull, 'w'))
                stack.enter_context(contextlib.redirect_stdout(sink))
                stack.enter_context(contextlib.redirect_stderr(sink))
            make_lmdb_from_imgs(src, tmp, names, keys, map_size=4 * size + (64 << 20))
        os.replace(tmp, final)
    return final


def _run_tasks(tasks: List[Tuple[str, str, Dict[str, Any]]], cfg: PrepareConfig) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit='img', desc='prepare-csr', disable=not cfg.progress)
    results = []
    if cfg.workers == 1 or len(tasks) == 1:
        for task in tasks:
            results.append(_process_one(task))
            bar.update(1)
    else:
        # 'spawn', not the Linux default 'fork': forking a process whose torch/OpenMP/numba thread
        # pools are already running can deadlock the children on a lock held by a dead thread.
        context = multiprocessing.get_context('spawn')
        with context.Pool(min(cfg.workers, len(tasks)), initializer=_init_worker) as pool:
            for result in pool.imap_unordered(_process_one, tasks):
                results.append(result)
                bar.update(1)
    bar.close()
    return results


def prepare_csr(config: PrepareConfig) -> PrepareResult:
    """Write the CSR folders (and LMDBs) described in the module doc; see :class:`PrepareConfig`.

    Raises:
        PrepareError: bad options, missing/empty ``gt_dir``, or ``out_dir`` made with other options.
    Returns:
        a :class:`PrepareResult`; inputs that could not be decoded are in ``failed`` (not raised).
    """
    cfg = _check_config(config)
    sources = _list_sources(cfg)
    old = _previous_manifest(cfg)
    qualities_all = sorted(set(old.get('qualities', [])) | set(cfg.qualities))
    for folder in _output_folders(cfg, cfg.qualities):
        os.makedirs(osp.join(cfg.out_dir, folder), exist_ok=True)
        _remove_stale_temporaries(osp.join(cfg.out_dir, folder))
    # record the options before any output exists, so a killed first run is still checked on resume
    _write_manifest(cfg, qualities_all, PrepareResult(inputs=len(sources), written=0, skipped=0), complete=False)
    shared = {k: getattr(cfg, k) for k in ('out_dir', 'scale', 'qualities', 'downsample', 'crop', 'step', 'thresh')}
    results = _run_tasks([(path, stem, shared) for path, stem in sources], cfg)

    by_stem = {stem: path for path, stem in sources}
    result = PrepareResult(inputs=len(sources), written=0, skipped=0)
    for res in sorted(results, key=lambda r: r['stem']):
        if res['status'] == 'failed':
            result.failed.append({'file': res['file'], 'error': res['error']})
        elif res['status'] == 'skipped':
            result.skipped += 1
        else:
            result.written += 1
            if res['no_subimages']:
                result.no_subimages.append(by_stem[res['stem']])
    folders = _output_folders(cfg, qualities_all)
    for folder in folders:
        path = osp.join(cfg.out_dir, folder)
        result.folders[folder] = len([n for n in os.listdir(path) if n.endswith('.png')]) if osp.isdir(path) else 0
    if cfg.lmdb:
        result.lmdbs = [_build_lmdb(cfg.out_dir, folder, cfg.progress) for folder in folders if result.folders[folder]]
    result.manifest = _write_manifest(cfg, qualities_all, result)
    return result


def _write_manifest(cfg: PrepareConfig, qualities: Sequence[int], result: PrepareResult, complete: bool = True) -> str:
    import basicsr

    from ..version import __version__

    manifest = {
        'tool': 'basicsr prepare-csr',
        'mambacsr_arch': __version__,
        'created_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'complete': complete,  # false while a run is in progress or after it was killed
        'source': cfg.gt_dir,
        'scale': cfg.scale,
        'qualities': list(qualities),
        'downsample': cfg.downsample,
        'crop': cfg.crop,
        'step': cfg.step,
        'thresh': cfg.thresh,
        'pipeline': ('GT uint8 BGR, mod-crop to scale -> /255 -> bicubic 1/scale -> clip [0,1] -> round uint8 -> '
                     'cv2.imencode .jpg (IMWRITE_JPEG_QUALITY=Q) -> cv2.imdecode -> PNG'),
        'versions': {'opencv': cv2.__version__, 'libjpeg': libjpeg_version(), 'numpy': np.__version__,
                     'basicsr': getattr(basicsr, '__version__', 'unknown')},
        'counts': {'inputs': result.inputs, 'written': result.written, 'skipped_done': result.skipped,
                   'failed': len(result.failed), 'files': result.folders},
        'failed': result.failed,
        'no_subimages': result.no_subimages,
        'lmdb': [osp.basename(p) for p in result.lmdbs],
        'last_run': {k: v for k, v in asdict(cfg).items() if k not in ('progress',)},
    }
    path = osp.join(cfg.out_dir, 'manifest.json')
    tmp = osp.join(cfg.out_dir, '.manifest.json.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=2, default=list)
    os.replace(tmp, path)
    return path
