"""What ``torch.compile`` gains for MambaCSR on CPU: forward latency and a training step, eager vs compiled.

Run (not a test; prints one table and the ratios, all measured in this run and process)::

    python benchmarks/bench_compile.py                 # tiny and moderate networks
    python benchmarks/bench_compile.py --quick         # tiny only, fewer repeats
    python benchmarks/bench_compile.py --nets moderate --repeats 7 --threads 2 --mode max-autotune-no-cudagraphs

Networks (x4 unless said, random weights, float32):

* ``tiny``: embed_dim 24, d_state 4, depths [1], depths2 [1], mlp_ratio 1, x2, window scans only;
  forward on one 16x16 LR image, training on 4 patches of 16x16.
* ``moderate``: the demo network of ``options/demo_mambacsr_x4.yml`` (embed_dim 24, d_state 8, depths
  [2, 2], depths2 [2], DIS and cross-scale scans); forward on one 48x48 LR image, training on 8 patches of
  16x16 (the demo's batch).

Each row has its own eager network and a compiled copy with the same weights (``torch.compile(net,
mode=--mode)``, Inductor): forward in eval mode under ``torch.no_grad()``; training step = forward, L1
loss, backward, Adam step (the optimizer stays eager). ``compile s`` is the wall time of the first
compiled call (Dynamo + Inductor's C++ compilation; far less when Inductor's on-disk cache is warm).
After warm-up the eager and compiled calls alternate ``--repeats`` times, so background load hits both
alike; columns are medians: ``wall`` and ``CPU`` (process CPU time of all threads; it excludes waiting
for a busy core, the steadier number on a shared machine) and ``eager / compiled`` ratios (> 1: compile
is faster). ``breaks`` is the number of Dynamo graph breaks met while compiling (0: one graph).
The load average is printed before and after.

``--shapes static`` (default) compiles with ``dynamic=False``: one graph per input shape. With ``auto``
(torch.compile's default) a shape that changes between calls of the same code (the graph pieces
around SS2D's hand-written backwards in training, or a new image size) is made symbolic, and with
torch 2.14 Inductor then failed on the moderate network's training step ("cannot determine truth
value of Relational" while fixing an output view's strides).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import mambacsr_arch  # noqa: F401  (first import: thread policy before torch loads; registers MambaCSR)
import torch
from basicsr.archs import build_network

NETS = {
    'tiny': (dict(type='MambaCSR', upscale=2, img_size=16, embed_dim=24, d_state=4, depths=[1], depths2=[1],
                  mlp_ratio=1., scan_size=8, cross_scale_scan=False), 16, 1, 16, 4),
    'moderate': (dict(type='MambaCSR', upscale=4, in_chans=3, img_size=16, embed_dim=24, d_state=8, scan_size=8,
                      depths=[2, 2], depths2=[2], mlp_ratio=2, img_range=1., upsampler='pixelshuffle',
                      resi_connection='1conv', dual_interleaved_scan=True, cross_scale_scan=True), 48, 1, 16, 8),
}  # name -> (network_g, forward LR size, forward batch, training LR patch, training batch)


def timed(fn: Callable[[], None]) -> Tuple[float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters['graph_break'].values())


class Case:
    """One (network, task) row: an eager and a compiled callable doing the same work on equal weights."""

    def __init__(self, name: str, task: str, net_opt: dict, size: int, batch: int, mode: str,
                 dynamic: Optional[bool]) -> None:
        self.name, self.task = name, task
        torch.manual_seed(0)
        eager = build_network(dict(net_opt)).train(task == 'train')
        compiled_net = copy.deepcopy(eager)
        self.shape = (batch, 3, size, size)
        lq = torch.rand(self.shape)
        gt = torch.rand(batch, 3, size * net_opt['upscale'], size * net_opt['upscale'])
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(compiled_net, mode=mode, dynamic=dynamic)
        self.run = {'eager': self._step(eager, eager, lq, gt), 'compiled': self._step(compiled_net, compiled, lq, gt)}
        self.compile_s, _ = timed(self.run['compiled'])
        self.breaks = graph_breaks()
        self.times: Dict[str, List[Tuple[float, float]]] = {'eager': [], 'compiled': []}

    def _step(self, net: torch.nn.Module, forward: Callable, lq: torch.Tensor, gt: torch.Tensor) -> Callable[[], None]:
        if self.task == 'forward':
            def infer() -> None:
                with torch.no_grad():
                    forward(lq)
            return infer
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

        def train() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.l1_loss(forward(lq), gt).backward()
            optimizer.step()
        return train

    def measure(self, record: bool) -> None:
        for kind in ('eager', 'compiled'):
            result = timed(self.run[kind])
            if record:
                self.times[kind].append(result)

    def medians(self, kind: str) -> Tuple[float, float]:
        return (statistics.median(w for w, _ in self.times[kind]), statistics.median(c for _, c in self.times[kind]))


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nets', nargs='+', choices=sorted(NETS), default=['tiny', 'moderate'])
    parser.add_argument('--tasks', nargs='+', choices=['forward', 'train'], default=['forward', 'train'])
    parser.add_argument('--repeats', type=int, default=9, help='timed eager/compiled pairs per row')
    parser.add_argument('--mode', default='default', help="torch.compile mode (e.g. 'max-autotune-no-cudagraphs')")
    parser.add_argument('--shapes', choices=['static', 'auto'], default='static',
                        help="torch.compile dynamic=False (static, default) or None (auto: Dynamo's automatic dynamic "
                             'shapes; see the docstring)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    parser.add_argument('--quick', action='store_true', help='tiny network only, 3 repeats')
    args = parser.parse_args(argv)
    if args.quick:
        args.nets, args.repeats = ['tiny'], 3
    if args.repeats < 1:
        raise SystemExit('bench_compile: --repeats must be >= 1')
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, '
          f'scan backend for CPU tensors: {mambacsr_arch.ops.resolve_backend("cpu")[0]}, compile mode {args.mode}, '
          f'{args.shapes} shapes')
    print(f'load average before: {" ".join(f"{x:.2f}" for x in os.getloadavg())}', flush=True)
    cases = []
    for name in args.nets:
        net_opt, fwd_size, fwd_batch, train_size, train_batch = NETS[name]
        for task in args.tasks:
            size, batch = (fwd_size, fwd_batch) if task == 'forward' else (train_size, train_batch)
            case = Case(name, task, net_opt, size, batch, args.mode, False if args.shapes == 'static' else None)
            print(f'compiled {name} {task} in {case.compile_s:.1f} s ({case.breaks} graph breaks)', flush=True)
            case.measure(record=False)  # warm-up: numba, allocator, the compiled graph's first real run
            cases.append(case)
    for _ in range(args.repeats):
        for case in cases:
            case.measure(record=True)

    print(f'\nmedians of {args.repeats} alternating eager/compiled calls; ratios eager / compiled '
          '(> 1: compile wins)\n')
    print('| network | task | input | compile s | breaks | eager wall s | compiled wall s | eager CPU s | '
          'compiled CPU s | wall ratio | CPU ratio |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for case in cases:
        (ew, ec), (cw, cc) = case.medians('eager'), case.medians('compiled')
        batch, _, h, w = case.shape
        print(f'| {case.name} | {case.task} | {batch}x{h}x{w} | {case.compile_s:.1f} | {case.breaks} | {ew:.4f} | '
              f'{cw:.4f} | {ec:.4f} | {cc:.4f} | {ew / cw:.2f} | {ec / cc:.2f} |')
    print(f'load average after: {" ".join(f"{x:.2f}" for x in os.getloadavg())}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
