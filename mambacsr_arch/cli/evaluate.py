"""``basicsr eval``: PSNR and SSIM of restored images against ground truth.

Usage::

    basicsr eval --restored OUT_DIR --gt GT_DIR [--crop-border 4] [--y] [--suffix _x4]
                 [--csv scores.csv] [--json scores.json]

Pairing: restored ``<name><suffix>.<ext>`` <-> ground truth ``<name>.<any ext>`` (images directly
inside each folder). Every file must have a partner, otherwise nothing is computed and the
unpaired files are listed. Images are decoded by :func:`mambacsr_arch.data.image_io.read_image_bgr8`
(uint8 BGR, as BasicSR's validation sees them) and scored with BasicSR's own
``calculate_psnr`` / ``calculate_ssim`` (``crop_border``, ``test_y_channel``), so the numbers are
those ``basicsr test`` reports for the same images.

:func:`evaluate_folders` computes (no printing); :func:`run` prints the table and writes CSV/JSON.

Exit codes: 0 every pair scored; 1 some pairs failed (unreadable file, size mismatch, image
smaller than the crop border; each reported on one line, the others still scored);
2 configuration error (missing folder, no images, a symbolic-link loop named like an image,
unpaired or ambiguous files, a ``--csv``/``--json`` destination that cannot be written: checked
before scoring; both files are written atomically, so a failed write leaves any earlier file whole).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import os.path as osp
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

from mambacsr_arch.errors import EXIT_CONFIG, ConfigError

EXIT_OK, EXIT_FAILED_PAIRS = 0, 1


class EvalError(ConfigError):
    """A problem the user must fix; the message names the files involved (a ConfigError: exit 2)."""


@dataclass
class ImageScore:
    """Scores of one restored/GT pair. PSNR in dB (inf for identical images), SSIM in [-1, 1]."""
    name: str
    restored: str
    gt: str
    psnr: float
    ssim: float


@dataclass
class EvalResult:
    """Per-image scores (sorted by name), their means, and one message per pair that failed."""
    records: List[ImageScore]
    mean_psnr: float
    mean_ssim: float
    crop_border: int
    test_y_channel: bool
    failures: List[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.records)


def _image_files(folder: str, flag: str) -> List[str]:
    from mambacsr_arch.data.image_io import ImageFolderError, list_image_files

    if not osp.isdir(folder):
        raise EvalError(f"{flag} folder '{folder}' does not exist or is not a folder.")
    try:
        files = list_image_files(folder)
    except ImageFolderError as err:  # e.g. a symbolic-link loop named like an image
        raise EvalError(f'cannot list the {flag} folder: {err}') from err
    if not files:
        raise EvalError(f"{flag} folder '{folder}' has no images (png, jpg, bmp, tif, webp, ...).")
    return files


def pair_files(restored_dir: str, gt_dir: str, suffix: str = '') -> List[Tuple[str, str, str]]:
    """Match restored ``<name><suffix>.*`` to GT ``<name>.*``; returns sorted (name, restored, gt).

    The pairing is the project's one pairing by stem (:func:`mambacsr_arch.data.pairing.match_by_stem`,
    the datasets' rule) with ``filename_tmpl = '{}' + suffix``; the messages are eval's own.

    Raises:
        EvalError: a folder is missing or empty; a name is ambiguous (two files with one stem);
            or some files have no partner (all of them listed, on one line).
    """
    from mambacsr_arch.data.image_io import ImageFolderError
    from mambacsr_arch.data.pairing import PairingError, match_by_stem

    _image_files(gt_dir, '--gt')  # missing, empty or unlistable folders: named by their flag
    _image_files(restored_dir, '--restored')
    template = '{}' + suffix.replace('{', '{{').replace('}', '}}')
    try:
        match = match_by_stem(restored_dir, gt_dir, template, lq_label='--restored', gt_label='--gt')
    except (PairingError, ImageFolderError) as err:
        raise EvalError(f'{err}'.replace('\n', ' ')) from err
    if match.extra or match.missing:
        parts = []
        if match.extra:
            parts.append(f"restored without GT (expected '<name>{suffix}.<ext>' with a GT '<name>.*' in "
                         f"'{gt_dir}'): {', '.join(match.extra)}")
        if match.missing:
            parts.append(f"GT without restored '<name>{suffix}.*' in '{restored_dir}': {', '.join(match.missing)}")
        raise EvalError('unpaired files: ' + '; '.join(parts) + ' (check --suffix).')
    return [(name, restored, gt) for name, restored, gt in match.pairs]


def score_pair(restored_path: str, gt_path: str, crop_border: int = 0,
               test_y_channel: bool = False) -> Tuple[float, float]:
    """(PSNR dB, SSIM) of one pair by BasicSR's metric functions on uint8 BGR arrays.

    Raises:
        EvalError: unreadable file, sizes differ, or the image is smaller than the SSIM window after crop_border.
    """
    from basicsr.metrics import calculate_psnr, calculate_ssim

    from mambacsr_arch.data.checks import SSIM_WINDOW
    from mambacsr_arch.data.image_io import ImageReadError, read_image_bgr8

    try:
        restored = read_image_bgr8(restored_path)
        gt = read_image_bgr8(gt_path)
    except ImageReadError as err:
        raise EvalError(f'unreadable image: {err}') from err
    if restored.shape != gt.shape:
        raise EvalError(f'size mismatch: {restored_path} is {restored.shape[1]}x{restored.shape[0]} (WxH) but '
                        f'{gt_path} is {gt.shape[1]}x{gt.shape[0]}; wrong scale, or GT not mod-cropped?')
    if min(gt.shape[:2]) <= 2 * crop_border:
        raise EvalError(f'{gt_path} is {gt.shape[1]}x{gt.shape[0]}: too small for --crop-border {crop_border}.')
    if min(gt.shape[:2]) - 2 * crop_border < SSIM_WINDOW:  # BasicSR's SSIM would be nan (no valid window)
        raise EvalError(f'{gt_path} is {gt.shape[1]}x{gt.shape[0]}: SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} '
                        f'after --crop-border {crop_border}.')
    psnr = calculate_psnr(restored, gt, crop_border, input_order='HWC', test_y_channel=test_y_channel)
    ssim = calculate_ssim(restored, gt, crop_border, input_order='HWC', test_y_channel=test_y_channel)
    return float(psnr), float(ssim)


def evaluate_folders(restored_dir: str, gt_dir: str, suffix: str = '', crop_border: int = 0,
                     test_y_channel: bool = False, strict: bool = True) -> EvalResult:
    """Score every pair of :func:`pair_files`.

    Args:
        crop_border: pixels ignored at each edge (usually the SR scale).
        test_y_channel: score the Y channel of YCbCr (BT.601, as BasicSR) instead of BGR.
        strict: raise :class:`EvalError` (listing every failed pair) if any pair fails; with
            ``False`` failed pairs are returned in ``failures`` and left out of the means.
    """
    if crop_border < 0:
        raise EvalError(f'--crop-border must be >= 0, got {crop_border}.')
    records: List[ImageScore] = []
    failures: List[str] = []
    for name, restored_path, gt_path in pair_files(restored_dir, gt_dir, suffix):
        try:
            psnr, ssim = score_pair(restored_path, gt_path, crop_border, test_y_channel)
        except EvalError as err:
            failures.append(str(err))
            continue
        records.append(ImageScore(name, restored_path, gt_path, psnr, ssim))
    if strict and failures:
        raise EvalError('\n'.join(failures))
    mean_psnr = sum(r.psnr for r in records) / len(records) if records else math.nan
    mean_ssim = sum(r.ssim for r in records) / len(records) if records else math.nan
    return EvalResult(records, mean_psnr, mean_ssim, crop_border, test_y_channel, failures)


# ----------------------------------------------------------------------------- output


def format_table(result: EvalResult) -> str:
    """Plain-text table: one row per image, then the mean."""
    channel = 'Y' if result.test_y_channel else 'RGB'
    width = max([len(r.name) for r in result.records] + [len(f'mean ({result.count})'), 4])
    lines = [f'PSNR (dB) / SSIM on {channel}, crop_border={result.crop_border}',
             f"{'name':<{width}}  {'PSNR':>8}  {'SSIM':>6}"]
    lines += [f'{r.name:<{width}}  {r.psnr:8.4f}  {r.ssim:6.4f}' for r in result.records]
    lines.append(f"{f'mean ({result.count})':<{width}}  {result.mean_psnr:8.4f}  {result.mean_ssim:6.4f}")
    return '\n'.join(lines)


def _json_number(value: float) -> Optional[object]:
    """JSON has no inf/nan: identical images (PSNR inf) are written as the string 'inf'."""
    if math.isinf(value):
        return 'inf' if value > 0 else '-inf'
    return None if math.isnan(value) else value


def check_destination(path: str, flag: str, protected_dirs: Sequence[str] = ()) -> None:
    """Fail fast, before any scoring, if ``path`` (a ``--csv``/``--json`` file) cannot be written.

    Refused: an existing folder; an image inside one of ``protected_dirs`` (the folders being scored);
    a parent that is a file; a folder we cannot create a file in (probed with a temporary file when the
    folder exists; missing folders are created when writing). Raises :class:`EvalError` naming ``path``.
    """
    from mambacsr_arch.data.image_io import IMAGE_EXTENSIONS

    if osp.isdir(path):
        raise EvalError(f"{flag} '{path}' is a folder; give a file name, e.g. {osp.join(path, 'scores' + flag[1:])}.")
    parent = osp.dirname(osp.abspath(path))
    if osp.realpath(parent) in {osp.realpath(d) for d in protected_dirs} and \
            path.lower().endswith(IMAGE_EXTENSIONS):
        raise EvalError(f"{flag} '{path}' is an image in a folder being scored; write the scores elsewhere.")
    existing = parent
    while not osp.lexists(existing) and osp.dirname(existing) != existing:
        existing = osp.dirname(existing)
    if not osp.isdir(existing):
        raise EvalError(f"cannot write {flag} '{path}': '{existing}' is not a folder; choose another path.")
    if existing != parent:  # the missing folders are made when writing: the first existing one must take them
        if not os.access(existing, os.W_OK | os.X_OK):
            raise EvalError(f"cannot write {flag} '{path}': no permission to create folders in '{existing}'.")
        return
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f'.{osp.basename(path)}.', suffix='.probe')
    except OSError as err:
        raise EvalError(f"cannot write {flag} '{path}': {err.strerror or err}; choose another path.") from err
    os.close(fd)
    os.remove(probe)


def _write_text(path: str, text: str) -> None:
    from mambacsr_arch.fileio import write_bytes_atomic

    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    write_bytes_atomic(path, text.encode('utf-8'))


def write_csv(result: EvalResult, path: str) -> None:
    """Columns name, restored, gt, psnr, ssim (full precision); last row ``mean``. Written atomically."""
    buffer = io.StringIO(newline='')
    writer = csv.writer(buffer)
    writer.writerow(['name', 'restored', 'gt', 'psnr', 'ssim'])
    for r in result.records:
        writer.writerow([r.name, r.restored, r.gt, repr(r.psnr), repr(r.ssim)])
    writer.writerow(['mean', '', '', repr(result.mean_psnr), repr(result.mean_ssim)])
    _write_text(path, buffer.getvalue())


def write_json(result: EvalResult, path: str, **context: object) -> None:
    """``{settings..., images: [...], mean: {psnr, ssim, count}, failures: [...]}``, written atomically."""
    images = []
    for r in result.records:
        item = asdict(r)
        item.update(psnr=_json_number(r.psnr), ssim=_json_number(r.ssim))
        images.append(item)
    payload = dict(context, crop_border=result.crop_border, test_y_channel=result.test_y_channel, images=images,
                   mean={'psnr': _json_number(result.mean_psnr), 'ssim': _json_number(result.mean_ssim),
                         'count': result.count}, failures=result.failures)
    _write_text(path, json.dumps(payload, indent=2, allow_nan=False) + '\n')


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--restored', required=True, help='folder of restored (SR) images')
    parser.add_argument('--gt', required=True, help='folder of ground-truth images')
    parser.add_argument('--crop-border', type=int, default=0,
                        help='pixels ignored at each edge (BasicSR convention: the scale, e.g. 4); default 0')
    parser.add_argument('--y', action='store_true', help='score the Y channel (YCbCr, as test_y_channel: true)')
    parser.add_argument('--suffix', default='', help="restored names are '<gt name><suffix>.<ext>', e.g. _x4")
    parser.add_argument('--csv', metavar='FILE', help='also write per-image scores and the mean as CSV')
    parser.add_argument('--json', metavar='FILE', help='also write per-image scores and the mean as JSON')


def run(args: argparse.Namespace) -> int:
    """Run ``basicsr eval``; returns the exit code (see module doc)."""
    import mambacsr_arch  # noqa: F401  (compat shims before basicsr's metrics import)

    destinations = [(flag, path) for flag, path in (('--csv', args.csv), ('--json', args.json)) if path]
    try:
        if len(destinations) == 2 and osp.realpath(args.csv) == osp.realpath(args.json):
            raise EvalError(f"--csv and --json are the same file '{args.csv}'; give two names.")
        for flag, path in destinations:
            check_destination(path, flag, (args.restored, args.gt))
        result = evaluate_folders(args.restored, args.gt, suffix=args.suffix, crop_border=args.crop_border,
                                  test_y_channel=args.y, strict=False)
    except EvalError as err:
        print(f'basicsr eval: error: {err}', file=sys.stderr)
        return EXIT_CONFIG
    for message in result.failures:
        print(f'basicsr eval: error: {message}', file=sys.stderr)
    if result.records:
        print(format_table(result))
    writers = {'--csv': lambda path: write_csv(result, path),
               '--json': lambda path: write_json(result, path, restored=args.restored, gt=args.gt, suffix=args.suffix)}
    for flag, path in destinations:
        try:
            writers[flag](path)
        except OSError as err:  # checked before scoring, so only a change since (disk full, folder removed...)
            print(f"basicsr eval: error: cannot write {flag} '{path}': {err.strerror or err}; the scores above "
                  'are not saved there.', file=sys.stderr)
            return EXIT_CONFIG
    if result.failures:
        print(f'basicsr eval: {len(result.failures)} of {len(result.failures) + result.count} pairs failed; '
              f'the mean covers the {result.count} others.', file=sys.stderr)
        return EXIT_FAILED_PAIRS
    return EXIT_OK
