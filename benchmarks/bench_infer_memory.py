"""Peak RSS of ``basicsr infer`` as the LR image grows, with a fixed tile size (tiling keeps it flat).

Run (not a test; prints one table and the ratio largest/smallest, all measured in this run)::

    python benchmarks/bench_infer_memory.py                      # LR 256..2048 px, tile 256
    python benchmarks/bench_infer_memory.py --quick              # LR 128..512 px, tile 128
    python benchmarks/bench_infer_memory.py --sizes 256 1024 --tile 128 --untiled-up-to 512

Each size runs ``basicsr infer`` in its own process on one random-texture LR image of s x s px
with a tiny MambaCSR (random weights saved as a BasicSR checkpoint; the network does not matter,
the memory behaviour does) and reads that process's peak RSS from ``os.wait4``. Columns:

* peak RSS: the whole process (Python, torch, the model, the image buffers, the tiles).
* output buffers: the full-size HR buffers alive together at the end of ``restore_image``: the
  float32 RGB accumulator (12 bytes per HR pixel), the blending weights (4) and the float32
  quotient (12), i.e. 28 bytes per HR pixel; computed, not measured. (Afterwards infer holds
  less: the float32 result converted in place, the uint8 image and its BGR copy, 18 bytes.)
* rest: peak RSS - output buffers: the network's working memory plus fixed costs; with tiling
  it stays flat as the image grows, which is the point of this benchmark.

``--untiled-up-to S`` also runs sizes <= S with ``--tile 0`` (whole image in one forward) to show
what tiling saves.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

TINY_MAMBACSR = {'type': 'MambaCSR', 'in_chans': 3, 'upscale': 4, 'embed_dim': 24, 'd_state': 8, 'scan_size': 8,
                 'depths': [4], 'depths2': [4], 'mlp_ratio': 2, 'img_range': 1., 'upsampler': 'pixelshuffle',
                 'resi_connection': '1conv', 'dual_interleaved_scan': True, 'cross_scale_scan': False}
SCALE = 4
OUTPUT_BYTES_PER_HR_PIXEL = 3 * 4 + 4 + 3 * 4  # float32 accumulator, weights, float32 quotient


def make_checkpoint(path: str) -> None:
    """Seeded tiny MambaCSR saved as ``{'params': state_dict}``."""
    import torch

    import mambacsr_arch  # noqa: F401  (registers MambaCSR)
    from basicsr.archs import build_network

    torch.manual_seed(0)
    torch.save({'params': build_network(dict(TINY_MAMBACSR)).state_dict()}, path)


def make_image(path: str, size: int) -> None:
    """An s x s BGR image with texture at every scale (smoothed noise plus gradients)."""
    rng = np.random.default_rng(size)
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    ramp = np.linspace(0, 96, size, dtype=np.float32)
    img = np.clip(img.astype(np.float32) * 0.6 + ramp[None, :, None] + ramp[:, None, None] * 0.5, 0, 255)
    if not cv2.imwrite(path, img.astype(np.uint8)):
        raise OSError(f'cannot write {path}')


def run_infer(image: str, out_dir: str, ckpt: str, tile: int, overlap: int, threads: Optional[int]) -> Dict:
    """Run ``basicsr infer`` once in a child process; returns its peak RSS (bytes) and wall seconds."""
    arch_opts = [f'{k}={v}' for k, v in TINY_MAMBACSR.items() if k != 'type']
    cmd = [osp.join(osp.dirname(sys.executable), 'basicsr'), 'infer', '-i', image, '-o', out_dir, '--overwrite',
           '--arch', 'MambaCSR', '--weights', ckpt, '--device', 'cpu', '--no-progress',
           '--tile', str(tile), '--tile-overlap', str(overlap), '--arch-opt'] + arch_opts
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        # wait4 on this child only: RUSAGE_CHILDREN would give the max over every child so far
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{log.read().decode()[-3000:]}')
    return {'peak': usage.ru_maxrss * 1024, 'seconds': seconds}  # ru_maxrss is KiB on Linux


def measure(sizes: Sequence[int], tile: int, overlap: int, untiled_up_to: int, threads: Optional[int]) -> List[Dict]:
    """One row per (size, mode): LR size, tile (0 = whole image), peak RSS, output buffers, seconds."""
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench_infer_memory_') as root:
        ckpt = osp.join(root, 'tiny_mambacsr.pth')
        make_checkpoint(ckpt)
        for size in sizes:
            image = osp.join(root, f'lr_{size}.png')
            make_image(image, size)
            modes = [tile] + ([0] if size <= untiled_up_to else [])
            for mode in modes:
                result = run_infer(image, osp.join(root, 'out'), ckpt, mode, overlap, threads)
                output = (size * SCALE) ** 2 * OUTPUT_BYTES_PER_HR_PIXEL
                rows.append(dict(size=size, tile=mode, peak=result['peak'], output=output,
                                 seconds=result['seconds']))
                print(f'  measured LR {size}x{size} tile {mode or "off"}: {result["peak"] / 2 ** 20:.0f} MiB, '
                      f'{result["seconds"]:.0f} s', file=sys.stderr)
            os.remove(image)
    return rows


def format_rows(rows: List[Dict]) -> str:
    mib = 2 ** 20
    lines = ['| LR size | HR size | tile (LR px) | peak RSS (MiB) | output buffers (MiB) | rest (MiB) | wall (s) |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        hr = r['size'] * SCALE
        lines.append(f"| {r['size']}x{r['size']} | {hr}x{hr} | {r['tile'] or 'off'} | {r['peak'] / mib:.0f} | "
                     f"{r['output'] / mib:.0f} | {(r['peak'] - r['output']) / mib:.0f} | {r['seconds']:.0f} |")
    return '\n'.join(lines)


def format_ratios(rows: List[Dict], tile: int) -> str:
    tiled = [r for r in rows if r['tile'] == tile]
    if len(tiled) < 2:
        return ''
    small, large = tiled[0], tiled[-1]
    pixels = (large['size'] / small['size']) ** 2
    lines = [f"tiled, LR {large['size']} vs {small['size']} ({pixels:.0f}x the pixels):",
             f"  peak RSS ratio largest/smallest: {large['peak'] / small['peak']:.2f}",
             f"  rest (peak - output buffers) ratio largest/smallest: "
             f"{(large['peak'] - large['output']) / (small['peak'] - small['output']):.2f}"]
    for r in rows:
        if r['tile'] == 0:
            twin = next(t for t in tiled if t['size'] == r['size'])
            lines.append(f"  LR {r['size']}: untiled / tiled peak RSS: {r['peak'] / twin['peak']:.2f}")
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', help='LR sizes in px (default 256 512 1024 2048; '
                        '--quick: 128 256 512)')
    parser.add_argument('--tile', type=int, help='LR tile size (default 256; --quick: 128)')
    parser.add_argument('--tile-overlap', type=int, default=32, help='LR px (default 32)')
    parser.add_argument('--untiled-up-to', type=int, help='also run sizes <= this untiled (default 512; '
                        '--quick: 256; 0: never)')
    parser.add_argument('--quick', action='store_true', help='smaller sizes and tiles')
    parser.add_argument('--threads', type=int, help='OMP_NUM_THREADS for the child processes')
    args = parser.parse_args(argv)
    sizes = sorted(args.sizes or ([128, 256, 512] if args.quick else [256, 512, 1024, 2048]))
    tile = args.tile or (128 if args.quick else 256)
    untiled = args.untiled_up_to if args.untiled_up_to is not None else (256 if args.quick else 512)
    print(f'basicsr infer, tiny MambaCSR x{SCALE} (embed_dim 24, depths [4]: w8 and w64 scans, d_state 8), CPU, '
          f'tile {tile} overlap {args.tile_overlap} LR px, one image per process, peak RSS from wait4')
    rows = measure(sizes, tile, args.tile_overlap, untiled, args.threads)
    print()
    print(format_rows(rows))
    print()
    print(format_ratios(rows, tile))
    return 0


if __name__ == '__main__':
    sys.exit(main())
