"""ONNX export of a small MambaCSR: export time and onnxruntime speed vs PyTorch eager (numba ``cpu`` scan).

Model: MambaCSR embed_dim 24, depths [6], depths2 [6], d_state 16, cross_scale_scan false, x4, at a
fixed 64 x 64 input (``basicsr export --size 64 64``), in one process::

    python benchmarks/bench_export.py [--chunks 16 32] [--size 64] [--dynamic] [--cross-scale] [--depth 6]

(``--cross-scale --depth 1``: a cross-scale MambaCSR with one block in each part, the slowest graph
to export with ``--dynamic``, as its interleaved order is computed in the graph from the size.)

Candidates for the scan in the graph (``--chunks``: the ``export`` backend's CHUNK; ``--chunks 0``:
the former form, the ``torch`` backend's Hillis-Steele ``parallel`` strategy over chunks of 1024
steps, which took 266 s to export and ran 24x slower than eager before this benchmark existed).
The ``export`` backend (mambacsr_arch/ops/export_scan.py) runs each chunk's steps unrolled
(CHUNK small ops on all chunks at once) and a Hillis-Steele scan over the chunk boundaries only:
~10 passes over the (L, batch, dim, N) states instead of 2 x 10 levels for the 1024-step form. Numbers
of this machine are in the report printed by the run. CHUNK 32 won (2-core AMD EPYC VM, load
2.2-2.9): CHUNK 16 ran 4.5x eager in onnxruntime, 32 1.23x (its export 58 s, within the 60 s target);
the former form 24x. On another 2-core AMD EPYC (AVX-512 + bf16, load 0.9, 2026-12-05) CHUNK 32
exported in 46 s and ran 2.66x eager once the token orders were gathers: as copies into one buffer
they were ScatterElements, a quarter of onnxruntime's time (2.7-3.6x eager there).
"""
import argparse
import os
import subprocess
import time

import mambacsr_arch  # noqa: F401  (first: OMP_WAIT_POLICY=PASSIVE before torch loads, as the basicsr command)
import torch
from basicsr.archs import build_network
from mambacsr_arch.cli.export import export_onnx
from mambacsr_arch.ops import export_scan, torch_scan, use_backend


def _timed(fn, repeat=3):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--chunks', type=int, nargs='+', default=[32])
    parser.add_argument('--cross-scale', action='store_true')
    parser.add_argument('--depth', type=int, default=6)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--dynamic', action='store_true')
    args = parser.parse_args()
    import onnxruntime

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f'{cpu}; load average {os.getloadavg()}; torch threads {torch.get_num_threads()}')
    torch.manual_seed(0)
    net = build_network(dict(type='MambaCSR', img_size=64, embed_dim=24, depths=[args.depth], depths2=[args.depth],
                             d_state=16, upscale=4, cross_scale_scan=args.cross_scale)).eval()
    print(f'MambaCSR embed_dim 24, depths [{args.depth}], cross_scale_scan {args.cross_scale}, '
          f"{'dynamic' if args.dynamic else 'fixed'} export")
    x = torch.rand(1, 3, args.size, args.size)
    with torch.no_grad(), use_backend('cpu'):
        eager = _timed(lambda: net(x))
    print(f'PyTorch eager, cpu scan backend: {eager:.3f} s per {args.size}x{args.size} image')
    for chunk in args.chunks:
        path = f'/tmp/bench_export_{chunk}.onnx'
        before = export_scan.CHUNK
        try:
            export_scan.CHUNK = chunk or before
            start = time.perf_counter()
            if chunk:
                export_onnx(net, path, (args.size, args.size), args.dynamic, 18)
            else:  # the former graph: torch backend, parallel strategy, 1024-step chunks
                strategy, size = torch_scan.DEFAULT_STRATEGY, torch_scan.CHUNK['parallel']
                torch_scan.DEFAULT_STRATEGY, torch_scan.CHUNK['parallel'] = 'parallel', 1024
                try:
                    with use_backend('torch'), torch.no_grad():
                        torch.onnx.export(net, (x, ), None, dynamo=True, opset_version=18, input_names=['lq'],
                                          output_names=['sr']).save(path, external_data=False)
                finally:
                    torch_scan.DEFAULT_STRATEGY, torch_scan.CHUNK['parallel'] = strategy, size
            exported = time.perf_counter() - start
        finally:
            export_scan.CHUNK = before
        session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
        feed = {'lq': x.numpy()}
        ort = _timed(lambda: session.run(None, feed))
        with torch.no_grad():
            diff = abs(session.run(None, feed)[0] - net(x).numpy()).max()
        label = f'export backend, CHUNK {chunk}' if chunk else 'torch parallel, 1024-step chunks (former)'
        print(f'{label}: export {exported:.1f} s, onnxruntime {ort:.3f} s = {ort / eager:.2f}x eager, '
              f'max abs diff {diff:.2g}')
        os.remove(path)
    print(f'load average {os.getloadavg()}')


if __name__ == '__main__':
    main()
