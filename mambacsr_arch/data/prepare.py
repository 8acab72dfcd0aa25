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
(new qualities and new source images are fine; every run completes all the qualities ``out``
holds). One run at a time per ``out``: a run holds an exclusive lock on ``out/.prepare-csr.lock``
(``fcntl.flock``, released by the kernel even when the run is killed) and a second run is refused
(:class:`PrepareError` naming the first run's pid) before it changes anything. Temporaries of killed
runs are removed on start by the project's one pid-checked cleaner
(:func:`mambacsr_arch.fileio.remove_stale_temp_files`); PNGs are written by its one image writer
(:func:`mambacsr_arch.fileio.write_image_atomic`) and LMDBs built in a hidden folder renamed into
place (:func:`mambacsr_arch.fileio.atomic_dir`).

Too small: a GT smaller than ``scale`` (nothing left after the mod-crop), or, with
``matlab_bicubic``, whose LQ would be 1 pixel on a side (the MATLAB kernel needs 2), is reported
as failed and named (exit 1); the other images are prepared.

Content checks (nothing prepared is reused on the strength of its name alone):

* sources: the manifest records the size and SHA-256 of every source file (``sources``), written
  before any output of the run exists. Hashing was chosen over size + mtime because a source
  replaced by a copy that keeps its timestamp (``cp -p``, ``rsync -a``, an unpacked archive) would
  pass an mtime check. On every run each source is hashed again; when it differs from the record
  (or outputs exist that no record vouches for, e.g. from an older version of this tool), all of
  that image's outputs, in every ``GT``/``LQ_q<Q>`` folder and their ``_sub`` folders, are removed
  and remade from the new content (listed in ``regenerated``). A worker hashes the bytes it decodes,
  so a file changed during the run is reported, not half-used. Outputs of sources that left the
  folder are kept; a source that cannot be read is reported as failed and its outputs are left alone.
* LMDBs: ``<folder>.lmdb/prepare_csr.json`` records, per key, the size and ``mtime_ns`` of the PNG
  it was built from and the SHA-256 of that PNG's source. The LMDB is reused only when all of these
  still match (our PNGs are only ever replaced by a rename, which gives a new mtime); otherwise it
  is rebuilt (listed in ``lmdbs_rebuilt``). LMDBs without that record are rebuilt.

Folders: prepare-csr never writes into its source. ``--out`` equal to ``--gt``, or an ``--out``
where one of the output folders (``GT``, ``LQ_q<Q>``, ``*_sub``, ``*.lmdb``) is the ``--gt`` folder
(``--gt X/GT --out X``), is refused before anything is written, as is an ``--out`` whose output
folders hold files but no ``manifest.json`` (not made by prepare-csr; they would otherwise be
mistaken for prepared data). An ``--out`` inside ``--gt`` is fine: the source listing is not
recursive. A broken link or link loop named like an image in ``--gt`` is a :class:`PrepareError`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import hashlib
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

from ..fileio import (FolderLocked, atomic_dir, folder_lock, remove_stale_temp_files, write_bytes_atomic,
                      write_image_atomic)
from .degradations import DOWNSAMPLE_METHODS, check_quality, degrade_csr, mod_crop
from .image_io import ImageFolderError, ImageReadError, decode_image_bgr8, list_image_files

__all__ = ['PrepareError', 'PrepareConfig', 'PrepareResult', 'prepare_csr', 'subimage_grid', 'libjpeg_version']

PNG_COMPRESSION = 3  # as BasicSR's extract_subimages; lossless either way
_COMPARED_OPTIONS = ('scale', 'downsample', 'crop', 'step', 'thresh')
_OUTPUT_FOLDER = re.compile(r'^(GT|LQ_q\d+)(_sub)?$')  # the image folders prepare-csr writes in --out
_OUTPUT_ENTRY = re.compile(r'^(GT|LQ_q\d+)(_sub)?(\.lmdb)?$', re.IGNORECASE)  # ... and their LMDBs, any case
_SUB_SUFFIX = re.compile(r'_s\d{3,}$')  # <stem>_s001: a sub-image key -> its image's stem
LMDB_RECORD = 'prepare_csr.json'  # in each <folder>.lmdb: what the LMDB was built from
LOCK_NAME = '.prepare-csr.lock'  # in --out: held (flock) by the one run writing there; holds its pid


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
    regenerated: List[str] = field(default_factory=list)  # sources whose content changed: outputs remade
    lmdbs_rebuilt: List[str] = field(default_factory=list)  # existing LMDBs that no longer matched their PNGs

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
    """Write ``img`` as PNG atomically (the project's one image writer)."""
    write_image_atomic(path, img, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])


def min_gt_side(scale: int, downsample: str) -> int:
    """Smallest GT side (after the mod-crop) that :func:`degrade_csr` can downscale: ``scale`` px, or
    ``2 * scale`` for ``matlab_bicubic`` (its kernel cannot make a 1-pixel LQ side)."""
    return 2 * scale if downsample == 'matlab_bicubic' and scale > 1 else scale


def _write_with_subs(img: np.ndarray, folder: str, stem: str, grid: List[Tuple[int, int]], size: int,
                     div: int) -> int:
    """Sub-images of ``img`` (positions ``grid // div``, ``size`` px) into ``folder + '_sub'``, then the whole."""
    for index, (top, left) in enumerate(grid, start=1):
        top, left = top // div, left // div
        _write_png(osp.join(f'{folder}_sub', f'{stem}_s{index:03d}.png'), img[top:top + size, left:left + size])
    _write_png(osp.join(folder, f'{stem}.png'), img)
    return len(grid) + 1


def _process_one(task: Tuple[str, str, str, Sequence[int], Dict[str, Any]]) -> Dict[str, Any]:
    """Worker: the missing outputs of one source image (GT and the LQ of ``qualities``).

    ``digest`` is the source's SHA-256 recorded in the manifest before the run; the bytes decoded
    here must still have it. Returns ``{'stem', 'status', ...}``; never raises for bad input.
    """
    src, stem, digest, qualities, cfg = task
    out, scale, crop = cfg['out_dir'], cfg['scale'], cfg['crop']
    todo_q = [q for q in qualities if not osp.exists(osp.join(out, f'LQ_q{q}', f'{stem}.png'))]
    todo_gt = not osp.exists(osp.join(out, 'GT', f'{stem}.png'))
    if not todo_q and not todo_gt:
        return {'stem': stem, 'status': 'skipped'}
    try:
        content = _read_bytes(src)
        if hashlib.sha256(content).hexdigest() != digest:
            raise ImageReadError(f'{src}: changed while prepare-csr was running (its SHA-256 differs from the '
                                 'one recorded at the start); run the same command again.')
        gt = mod_crop(decode_image_bgr8(content, src), scale)
    except ImageReadError as err:
        return {'stem': stem, 'status': 'failed', 'file': src, 'error': str(err)}
    smallest = min_gt_side(scale, cfg['downsample'])
    if min(gt.shape[:2]) < smallest:
        return {'stem': stem, 'status': 'failed', 'file': src,
                'error': f'{src}: too small ({gt.shape[1]}x{gt.shape[0]} px after the mod-crop to {scale}); '
                         f"--scale {scale} with --downsample {cfg['downsample']} needs at least {smallest} px a side."}
    grid = subimage_grid(gt.shape[0], gt.shape[1], crop, cfg['step'], cfg['thresh']) if crop else []
    files = 0
    for quality in todo_q:
        try:
            lq = degrade_csr(gt, scale, quality, cfg['downsample'])
        except (RuntimeError, ValueError) as err:  # this image only: a worker never aborts the run
            return {'stem': stem, 'status': 'failed', 'file': src,
                    'error': f'{src}: cannot degrade it at quality {quality}: {type(err).__name__}: {err}'}
        files += _write_with_subs(lq, osp.join(out, f'LQ_q{quality}'), stem, grid, (crop or 0) // scale, scale)
    if todo_gt:  # last: its presence marks the image as done
        files += _write_with_subs(gt, osp.join(out, 'GT'), stem, grid, crop or 0, 1)
    return {'stem': stem, 'status': 'written', 'files': files, 'no_subimages': bool(crop) and not grid}


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as err:
        raise ImageReadError(f'{path}: cannot read file ({err.strerror or err}).') from err


def _fingerprint(path: str) -> Dict[str, Any]:
    """``{'size', 'sha256'}`` of a file, read in 1 MiB chunks (hashlib releases the GIL on each)."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                digest.update(chunk)
                size += len(chunk)
    except OSError as err:
        raise ImageReadError(f'{path}: cannot read file ({err.strerror or err}).') from err
    return {'size': size, 'sha256': digest.hexdigest()}


def _fingerprint_sources(sources: List[Tuple[str, str]], workers: int) -> Tuple[Dict[str, Dict[str, Any]],
                                                                                 List[Dict[str, str]]]:
    """``({stem: {'file', 'size', 'sha256'}}, failures)`` for the sources; unreadable ones are failures."""
    records, failed = {}, []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for (path, stem), result in zip(sources, pool.map(_safe_fingerprint, [p for p, _ in sources])):
            if isinstance(result, ImageReadError):
                failed.append({'file': path, 'error': str(result)})
            else:
                records[stem] = {'file': path, **result}
    return records, failed


def _safe_fingerprint(path: str) -> Any:
    try:
        return _fingerprint(path)
    except ImageReadError as err:
        return err


def _init_worker() -> None:
    cv2.setNumThreads(1)
    try:
        import torch
        torch.set_num_threads(1)  # BasicSR's matlab imresize runs on torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of basicsr
        pass


def _check_config(cfg: PrepareConfig) -> PrepareConfig:
    if not osp.isdir(cfg.gt_dir):
        kind = 'a broken symbolic link or a link loop' if osp.islink(cfg.gt_dir) else 'not a folder'
        raise PrepareError(f'--gt: {cfg.gt_dir!r} is {kind}.')
    if osp.lexists(cfg.out_dir) and not osp.isdir(cfg.out_dir):
        raise PrepareError(f'--out: {cfg.out_dir!r} exists and is not a folder (a file, a broken link or a link '
                           'loop); choose another --out.')
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
    elif step is not None or thresh:
        raise PrepareError(f"{'--step' if step is not None else '--thresh'} needs --crop.")
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 1:
        raise PrepareError(f'--workers: expected a positive number of processes, got {cfg.workers!r} (e.g. '
                           '--workers 1).')
    workers = cfg.workers
    return PrepareConfig(osp.abspath(cfg.gt_dir), osp.abspath(cfg.out_dir), qualities, cfg.scale, cfg.downsample,
                         cfg.crop, step if cfg.crop else None, thresh if cfg.crop else 0, cfg.lmdb, workers,
                         cfg.progress)


def _list_sources(cfg: PrepareConfig) -> List[Tuple[str, str]]:
    try:
        files = list_image_files(cfg.gt_dir)
    except ImageFolderError as err:
        raise PrepareError(f'--gt: {err}') from None
    sources = [(path, osp.splitext(osp.basename(path))[0]) for path in files]
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


def _check_not_into_source(cfg: PrepareConfig) -> None:
    """Refuse an ``--out`` that would write into the ``--gt`` folder (see the module doc, "Folders")."""
    def same(a: str, b: str) -> bool:  # samefile also sees case-insensitive names, bind mounts and links
        return osp.realpath(a) == osp.realpath(b) or (osp.exists(a) and osp.exists(b) and osp.samefile(a, b))

    fix = (f'prepare-csr never writes into its source: keep the original images in their own folder (e.g. '
           f'{osp.join(osp.dirname(cfg.gt_dir), "HR")!r}) and pass that as --gt, or choose another --out (e.g. '
           f'{cfg.gt_dir + "_csr"!r}).')
    if same(cfg.out_dir, cfg.gt_dir):
        raise PrepareError(f'--out {cfg.out_dir!r} is the --gt folder {cfg.gt_dir!r}; the outputs (GT/, LQ_q<Q>/, '
                           f'manifest.json) would be written into it. {fix}')
    if not osp.isdir(cfg.out_dir):
        return
    for name in sorted(os.listdir(cfg.out_dir)):
        path = osp.join(cfg.out_dir, name)
        if _OUTPUT_ENTRY.match(name) and same(path, cfg.gt_dir):
            raise PrepareError(f'--gt {cfg.gt_dir!r} is the output folder {path!r} of --out {cfg.out_dir!r}: the '
                               f'mod-cropped GT (or LQ / sub-images / an LMDB) would be written over the source, '
                               f'and existing source files would be taken for prepared ones. {fix}')


def _existing_outputs(out_dir: str) -> Dict[str, List[str]]:
    """``{folder: [png names]}`` of the output image folders already in ``out_dir`` (hidden files skipped)."""
    found = {}
    if osp.isdir(out_dir):
        for name in sorted(os.listdir(out_dir)):
            path = osp.join(out_dir, name)
            if _OUTPUT_FOLDER.match(name) and osp.isdir(path):
                found[name] = sorted(n for n in os.listdir(path) if n.endswith('.png') and not n.startswith('.'))
    return found


def _stem_of(folder: str, png: str) -> str:
    """The source stem an output PNG was made from: its name, less the ``_s<index>`` of a sub-image."""
    key = osp.splitext(png)[0]
    return _SUB_SUFFIX.sub('', key) if folder.endswith('_sub') else key


def _check_outputs_are_ours(cfg: PrepareConfig, outputs: Dict[str, List[str]]) -> None:
    """Without a manifest, PNGs or LMDBs in the output folders were not made by prepare-csr: refuse to adopt them."""
    if osp.exists(osp.join(cfg.out_dir, 'manifest.json')):
        return
    lmdbs = [n for n in os.listdir(cfg.out_dir) if _OUTPUT_ENTRY.match(n) and n.endswith('.lmdb')] \
        if osp.isdir(cfg.out_dir) else []
    foreign = [osp.join(cfg.out_dir, f) for f, names in outputs.items() if names] + \
        [osp.join(cfg.out_dir, n) for n in sorted(lmdbs)]
    if foreign:
        raise PrepareError(f'--out {cfg.out_dir!r} has no manifest.json, but {", ".join(foreign)} already hold '
                           'images or LMDBs; prepare-csr did not make them and would take them for prepared data '
                           '(e.g. a raw GT that is not mod-cropped). Choose an empty --out, or move those folders '
                           'away first.')


def _invalidate_changed(cfg: PrepareConfig, outputs: Dict[str, List[str]], recorded: Dict[str, Dict[str, Any]],
                        current: Dict[str, Dict[str, Any]]) -> List[str]:
    """Remove every output of the sources whose content is not the recorded one; return their stems.

    A source is changed when its (size, sha256) differs from the manifest's record, or when it has
    outputs but no record. The whole-image PNGs (the "done" markers) go first, then the sub-images,
    so a run killed half-way still sees the image as changed (the manifest is only updated after).
    """
    with_outputs = {_stem_of(folder, png) for folder, names in outputs.items() for png in names}
    changed = sorted(stem for stem, fp in current.items() if stem in with_outputs and (
        stem not in recorded or (recorded[stem].get('size'), recorded[stem].get('sha256')) != (fp['size'],
                                                                                               fp['sha256'])))
    doomed = set(changed)
    for want_sub in (False, True):
        for folder, names in outputs.items():
            if folder.endswith('_sub') == want_sub:
                for png in names:
                    if _stem_of(folder, png) in doomed:
                        os.remove(osp.join(cfg.out_dir, folder, png))
    return changed


def _previous_manifest(cfg: PrepareConfig) -> Dict[str, Any]:
    path = osp.join(cfg.out_dir, 'manifest.json')
    if not osp.exists(path):
        return {}
    try:
        with open(path, 'r', encoding='utf-8') as f:
            old = json.load(f)
    except (OSError, ValueError) as err:
        old, problem = {}, str(err)
    else:
        ok = isinstance(old, dict) and isinstance(old.get('sources', {}), dict)
        problem = '' if ok else 'not a prepare-csr manifest'
    if problem:
        raise PrepareError(f'{path}: unreadable manifest ({problem}); without it the outputs in --out cannot be '
                           'checked against their sources: choose another --out, or delete this one and run again.')
    for key in _COMPARED_OPTIONS:
        if key in old and old[key] != getattr(cfg, key):
            raise PrepareError(f'--out {cfg.out_dir!r} holds outputs made with {key}={old[key]!r}, not '
                               f'{getattr(cfg, key)!r}; choose another --out or delete it.')
    return old


def _output_folders(cfg: PrepareConfig, qualities: Sequence[int]) -> List[str]:
    folders = ['GT'] + [f'LQ_q{q}' for q in qualities]
    return folders + [f'{f}_sub' for f in folders] if cfg.crop else folders


def _remove_stale_temporaries(folder: str) -> None:
    """Temporaries of killed runs in ``folder`` (the one pid-checked cleaner: a live writer's are kept)."""
    remove_stale_temp_files(folder)


def _lmdb_record(src: str, folder: str, names: List[str], sources: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """What an LMDB of ``src``'s PNGs is built from: per key, the PNG's size and mtime_ns and its source's SHA-256."""
    keys = {}
    for name in names:
        stat = os.stat(osp.join(src, name))
        source = sources.get(_stem_of(folder, name), {})
        keys[osp.splitext(name)[0]] = {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns,
                                       'source_sha256': source.get('sha256')}
    return {'folder': folder, 'keys': keys}


def _build_lmdb(out_dir: str, folder: str, verbose: bool, sources: Dict[str, Dict[str, Any]]) -> Tuple[str, bool]:
    """``out/<folder>.lmdb`` from ``out/<folder>`` with BasicSR's make_lmdb_from_imgs.

    Returns ``(path, rebuilt)``. An existing LMDB is reused only when its :data:`LMDB_RECORD` equals the
    current one (same keys, same PNG sizes and mtimes, same source hashes); otherwise it is replaced
    and ``rebuilt`` is True.
    """
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    src, final = osp.join(out_dir, folder), osp.join(out_dir, f'{folder}.lmdb')
    names = sorted(n for n in os.listdir(src) if n.endswith('.png') and not n.startswith('.'))
    keys = [osp.splitext(n)[0] for n in names]
    record = _lmdb_record(src, folder, names, sources)
    try:
        with open(osp.join(final, LMDB_RECORD), 'r', encoding='utf-8') as f:
            if json.load(f) == record:
                return final, False
    except (OSError, ValueError):
        pass  # no record (missing, older prepare-csr, half-written): the LMDB cannot be trusted, rebuild it
    rebuilt = osp.lexists(final)
    legacy = osp.join(out_dir, f'.{folder}.incomplete.lmdb')  # the temporary of versions before atomic_dir
    if osp.isdir(legacy) and not osp.islink(legacy):
        shutil.rmtree(legacy)
    if not names:
        if osp.isdir(final) and not osp.islink(final):
            shutil.rmtree(final)
        elif osp.lexists(final):
            os.remove(final)
        return final, rebuilt
    size = sum(item['size'] for item in record['keys'].values())
    with atomic_dir(final) as tmp:  # .<folder>.lmdb.<pid>.tmp.lmdb: BasicSR wants the .lmdb ending
        with contextlib.ExitStack() as stack:
            if not verbose:  # BasicSR prints and draws a bar per LMDB
                sink = stack.enter_context(open(os.devnull, 'w'))
                stack.enter_context(contextlib.redirect_stdout(sink))
                stack.enter_context(contextlib.redirect_stderr(sink))
            make_lmdb_from_imgs(src, tmp, names, keys, map_size=4 * size + (64 << 20))
        write_bytes_atomic(osp.join(tmp, LMDB_RECORD), json.dumps(record).encode('utf-8'))
    return final, rebuilt


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
    _check_not_into_source(cfg)
    sources = _list_sources(cfg)
    _previous_manifest(cfg)  # the refusals that only read come first: a refused run creates nothing
    _check_outputs_are_ours(cfg, _existing_outputs(cfg.out_dir))
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            stack.enter_context(folder_lock(osp.join(cfg.out_dir, LOCK_NAME), wait=False))
        except FolderLocked as err:
            holder = f'process {err.holder}' if err.holder is not None else 'another process'
            raise PrepareError(f'--out {cfg.out_dir!r} is in use: another basicsr prepare-csr ({holder}) is writing '
                               'there. Wait for it to finish (then run again to complete), or choose another '
                               '--out.') from None
        except OSError as err:
            raise PrepareError(f'--out: cannot write into {cfg.out_dir!r} ({err.strerror or err}); choose a folder '
                               'you can write to.') from None
        return _prepare_locked(cfg, sources)


def _prepare_locked(cfg: PrepareConfig, sources: List[Tuple[str, str]]) -> PrepareResult:
    """:func:`prepare_csr` once this process holds ``out``'s lock (the checks are repeated under it)."""
    remove_stale_temp_files(cfg.out_dir)  # LMDB folders of killed runs
    old = _previous_manifest(cfg)
    outputs = _existing_outputs(cfg.out_dir)
    _check_outputs_are_ours(cfg, outputs)
    qualities_all = sorted(set(old.get('qualities', [])) | set(cfg.qualities))
    current, unreadable = _fingerprint_sources(sources, cfg.workers)
    recorded = old.get('sources', {})  # an older manifest has none: its outputs count as changed
    regenerated = _invalidate_changed(cfg, outputs, recorded, current)
    records = {**recorded, **current}  # sources that left --gt keep their record (their outputs are kept)
    for folder in _output_folders(cfg, cfg.qualities):
        path = osp.join(cfg.out_dir, folder)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            reason = 'a broken symbolic link or a link loop is in the way' if osp.islink(path) else err.strerror or err
            raise PrepareError(f'--out: cannot create {path!r} ({reason}); remove it or choose another --out.') \
                from None
        _remove_stale_temporaries(path)
    # record the options and source hashes before any output exists, so a killed run is still checked on resume
    _write_manifest(cfg, qualities_all, PrepareResult(inputs=len(sources), written=0, skipped=0), records,
                    complete=False)
    shared = {k: getattr(cfg, k) for k in ('out_dir', 'scale', 'downsample', 'crop', 'step', 'thresh')}
    # every quality --out holds, not only the requested ones: a regenerated image (or one whose LQ was
    # removed) must not be left without an LQ in an older LQ_q<Q> folder
    tasks = [(path, stem, current[stem]['sha256'], qualities_all, shared) for path, stem in sources if stem in current]
    results = _run_tasks(tasks, cfg)

    by_stem = {stem: path for path, stem in sources}
    result = PrepareResult(inputs=len(sources), written=0, skipped=0, failed=list(unreadable),
                           regenerated=regenerated)
    for res in sorted(results, key=lambda r: r['stem']):
        if res['status'] == 'failed':
            result.failed.append({'file': res['file'], 'error': res['error']})
        elif res['status'] == 'skipped':
            result.skipped += 1
        else:
            result.written += 1
            if res['no_subimages']:
                result.no_subimages.append(by_stem[res['stem']])
    result.failed.sort(key=lambda f: f['file'])
    folders = _output_folders(cfg, qualities_all)
    for folder in folders:
        path = osp.join(cfg.out_dir, folder)
        result.folders[folder] = len([n for n in os.listdir(path) if n.endswith('.png')]) if osp.isdir(path) else 0
    if cfg.lmdb:
        for folder in folders:
            if result.folders[folder]:
                path, rebuilt = _build_lmdb(cfg.out_dir, folder, cfg.progress, records)
                result.lmdbs.append(path)
                if rebuilt:
                    result.lmdbs_rebuilt.append(path)
    result.manifest = _write_manifest(cfg, qualities_all, result, records)
    return result


def _write_manifest(cfg: PrepareConfig, qualities: Sequence[int], result: PrepareResult,
                    sources: Dict[str, Dict[str, Any]], complete: bool = True) -> str:
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
        'regenerated': result.regenerated,
        'lmdb_rebuilt': [osp.basename(p) for p in result.lmdbs_rebuilt],
        # per source stem: the file and its content (size, SHA-256) the outputs were made from
        'sources': {stem: sources[stem] for stem in sorted(sources)},
        'last_run': {k: v for k, v in asdict(cfg).items() if k not in ('progress',)},
    }
    path = osp.join(cfg.out_dir, 'manifest.json')
    write_bytes_atomic(path, json.dumps(manifest, indent=2, default=list).encode('utf-8'))
    return path
