"""Training-step cost of the demo MambaCSR per LR pixel, by patch size and batch.

Run (not a test; prints one table and the ratios, all measured in this run and process)::

    python benchmarks/bench_train_step.py                      # demo network, default grid
    python benchmarks/bench_train_step.py --steps 3 --rounds 1 # quicker
    python benchmarks/bench_train_step.py --configs 8x64 16x16 32x4 --embed-dim 32 --depths 2 2

A configuration ``<lr>x<batch>`` trains on ``batch`` LR patches of ``lr`` x ``lr`` px (GT 4x larger):
forward, L1 loss, backward, Adam, as ``MambaCSRModel.optimize_parameters`` does (without EMA).
Each configuration has its own network (same seed) and 2 warm-up steps (numba compilation,
allocator); the configurations are then interleaved over ``--rounds`` so background load drifts over
all alike. Columns are medians over the timed steps:

* ``wall`` / ``CPU``: seconds per step; ``CPU`` is the process CPU time (all threads), which on a shared
  machine excludes waiting for a busy core and so is the steadier number;
* ``CPU us / LR px``: CPU time per step divided by ``batch * lr * lr``;
* ``vs <ref>``: CPU time per LR pixel over that of the reference configuration (``--ref``, default
  ``32x4``). The issue-13 target: ``8x64`` (64 patches of 8x8) <= 1.5x ``32x4`` (same pixel count).

The load average is printed before and after: with more runnable processes than cores, wall times
stretch but the CPU-time ratios hold.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Tuple

import mambacsr_arch  # noqa: F401  (first import: thread policy before torch loads; registers MambaCSR)
import torch
from basicsr.archs import build_network

DEFAULT_CONFIGS = ['8x64', '16x16', '32x4', '8x16', '8x32', '16x4', '16x8', '32x1', '32x2']


def parse_config(text: str) -> Tuple[int, int]:
    try:
        lr, batch = (int(part) for part in text.lower().split('x'))
    except ValueError:
        raise SystemExit(f"bench_train_step: configuration '{text}' is not <lr>x<batch>, e.g. 16x8") from None
    if lr < 1 or batch < 1:
        raise SystemExit(f"bench_train_step: configuration '{text}': lr and batch must be positive")
    return lr, batch


def demo_network(args: argparse.Namespace, lr: int) -> torch.nn.Module:
    """The network of options/demo_mambacsr_x4.yml (sizes overridable from the command line)."""
    return build_network(dict(type='MambaCSR', upscale=4, in_chans=3, img_size=lr, embed_dim=args.embed_dim,
                              d_state=args.d_state, scan_size=8, depths=args.depths, depths2=args.depths2,
                              mlp_ratio=2, img_range=1., upsampler='pixelshuffle', resi_connection='1conv',
                              dual_interleaved_scan=True, cross_scale_scan=True, drop_path_rate=0.))


class Trainer:
    """One configuration: network, optimizer, fixed random batch; :meth:`step` times one step."""

    def __init__(self, args: argparse.Namespace, lr: int, batch: int) -> None:
        torch.manual_seed(0)
        self.net = demo_network(args, lr)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        self.lq = torch.rand(batch, 3, lr, lr)
        self.gt = torch.rand(batch, 3, lr * 4, lr * 4)
        self.pixels = batch * lr * lr
        self.wall: List[float] = []
        self.cpu: List[float] = []

    def step(self, record: bool) -> None:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.l1_loss(self.net(self.lq), self.gt)
        loss.backward()
        self.opt.step()
        if record:
            self.wall.append(time.perf_counter() - wall0)
            self.cpu.append(time.process_time() - cpu0)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS, help='<lr>x<batch> items')
    parser.add_argument('--ref', default='32x4', help='reference configuration of the ratio column')
    parser.add_argument('--steps', type=int, default=3, help='timed steps per configuration and round')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--embed-dim', type=int, default=24)
    parser.add_argument('--d-state', type=int, default=16)
    parser.add_argument('--depths', type=int, nargs='+', default=[2, 2])
    parser.add_argument('--depths2', type=int, nargs='+', default=[2])
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = list(dict.fromkeys(args.configs + [args.ref]))
    print(f'cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, '
          f'load average before: {" ".join(f"{x:.2f}" for x in os.getloadavg())}')
    print(f'network: MambaCSR x4, embed_dim {args.embed_dim}, d_state {args.d_state}, depths {args.depths}, '
          f'depths2 {args.depths2}, scan backend for CPU tensors: {mambacsr_arch.ops.resolve_backend("cpu")[0]}')
    trainers: Dict[str, Trainer] = {}
    for text in configs:
        trainers[text] = Trainer(args, *parse_config(text))
        for _ in range(2):
            trainers[text].step(record=False)
    for _ in range(args.rounds):
        for text in configs:
            for _ in range(args.steps):
                trainers[text].step(record=True)

    ref = trainers[args.ref]
    ref_cost = statistics.median(ref.cpu) / ref.pixels
    print(f'\nmedian of {args.rounds} round(s) x {args.steps} step(s) per configuration; ratio: CPU per LR px '
          f'over {args.ref}\n')
    print('| LR patch | batch | LR px / step | wall (s) | CPU (s) | CPU us / LR px | vs ' + args.ref + ' |')
    print('|---|---|---|---|---|---|---|')
    for text in configs:
        trainer = trainers[text]
        lr, batch = parse_config(text)
        cpu = statistics.median(trainer.cpu)
        print(f'| {lr}x{lr} | {batch} | {trainer.pixels} | {statistics.median(trainer.wall):.3f} | {cpu:.3f} | '
              f'{cpu / trainer.pixels * 1e6:.1f} | {cpu / trainer.pixels / ref_cost:.2f} |')
    if '8x64' in trainers and args.ref == '32x4':
        small = trainers['8x64']
        ratio = statistics.median(small.cpu) / statistics.median(ref.cpu)
        verdict = 'meets' if ratio <= 1.5 else 'MISSES'
        print(f'\n64 x 8x8 vs 4 x 32x32 (same LR pixels): {ratio:.2f}x CPU time ({verdict} the <= 1.5x target)')
    print(f'load average after: {" ".join(f"{x:.2f}" for x in os.getloadavg())}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
