"""``basicsr prepare-csr``: GT + JPEG-degraded LQ folders, sub-images and LMDBs, once, on disk.

Example (DIV2K, the official sub-image recipe, four qualities, LMDBs)::

    basicsr prepare-csr --gt DIV2K_train_HR --out datasets/DIV2K_csr --scale 4 \\
        --quality 10 20 30 40 --crop 480 --step 240 --thresh 0 --lmdb --workers 8

Exit status: 0 all inputs done (or already done); 1 some inputs could not be read (they are
listed on stderr and in manifest.json; every other output is complete, re-run to retry them);
2 unusable options or folders (nothing written: e.g. --out would write into --gt, a link loop in
--gt, an --out holding images prepare-csr did not make); 130 interrupted (re-run to resume).
The layout, the resume rules and the content checks (sources by SHA-256, LMDBs re-checked before
reuse) are documented in :mod:`mambacsr_arch.data.prepare`.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..data.degradations import DOWNSAMPLE_METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``basicsr prepare-csr``."""
    parser.add_argument('--gt', required=True, help='folder of ground-truth images (not recursive)')
    parser.add_argument('--out', required=True, help='output folder (created; re-running resumes)')
    parser.add_argument('--scale', type=int, default=4, help='downscaling factor (default 4)')
    parser.add_argument('--quality', type=int, nargs='+', required=True, metavar='Q',
                        help='JPEG qualities in [1, 100]; one LQ_q<Q> folder each, e.g. --quality 10 20 30 40')
    parser.add_argument('--downsample', choices=DOWNSAMPLE_METHODS, default='matlab_bicubic',
                        help='bicubic kernel (default matlab_bicubic, as the SR benchmarks)')
    parser.add_argument('--crop', type=int, default=None,
                        help='also write GT sub-images of this size (e.g. 480) and LQ ones of size crop/scale')
    parser.add_argument('--step', type=int, default=None, help='sub-image stride in GT pixels (default crop/2)')
    parser.add_argument('--thresh', type=int, default=0,
                        help='add a border-flush last sub-image when more than this many pixels are left (default 0)')
    parser.add_argument('--lmdb', action='store_true', help='also write one BasicSR LMDB per output folder')
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                        help='parallel processes (default: CPU count, at most 8)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    """Run prepare-csr with parsed flags; returns the exit status documented in the module doc."""
    from ..data.prepare import PrepareConfig, PrepareError, prepare_csr

    config = PrepareConfig(gt_dir=args.gt, out_dir=args.out, qualities=args.quality, scale=args.scale,
                           downsample=args.downsample, crop=args.crop, step=args.step, thresh=args.thresh,
                           lmdb=args.lmdb, workers=args.workers, progress=not args.quiet)
    try:
        result = prepare_csr(config)
    except PrepareError as err:
        print(f'basicsr prepare-csr: error: {err}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('basicsr prepare-csr: interrupted; run the same command again to resume.', file=sys.stderr)
        return 130
    print(f'prepare-csr: {result.inputs} inputs: {result.written} written, {result.skipped} already done, '
          f'{len(result.failed)} failed.')
    for folder, count in result.folders.items():
        print(f'  {folder}: {count} files')
    if result.regenerated:
        print(f'  {len(result.regenerated)} sources changed since their outputs were made; all their outputs were '
              f'remade: {", ".join(result.regenerated[:5])}{" ..." if len(result.regenerated) > 5 else ""}')
    for path in result.lmdbs:
        note = ' (rebuilt: its PNGs or their sources changed)' if path in result.lmdbs_rebuilt else ''
        print(f'  lmdb: {path}{note}')
    if result.no_subimages:
        print(f'  {len(result.no_subimages)} images smaller than --crop have no sub-images: '
              f'{", ".join(result.no_subimages[:5])}{" ..." if len(result.no_subimages) > 5 else ""}')
    print(f'  manifest: {result.manifest}')
    for failure in result.failed:
        print(f"basicsr prepare-csr: skipped: {failure['error']}", file=sys.stderr)
    return 0 if result.ok else 1
