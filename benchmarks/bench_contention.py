"""Thread contention: a MambaCSR training step with and without one busy process beside it.

Run (not a test; prints one table and the ratios, all measured in this run)::

    python benchmarks/bench_contention.py                # demo network, LR 16x16 patches, batch 8
    python benchmarks/bench_contention.py --steps 5 --lr-size 32 --batch 4

Each measurement runs in a fresh child process, because OpenMP reads ``OMP_WAIT_POLICY`` only once,
when torch loads. Conditions, interleaved over ``--rounds`` so background drift hits all alike:

* ``default``: the environment ``import mambacsr_arch`` gives (``OMP_WAIT_POLICY=PASSIVE`` unless set);
* ``ACTIVE``: ``OMP_WAIT_POLICY=ACTIVE`` (spinning idle OpenMP threads, torch's usual behaviour);
* ``--policies`` picks others: ``PASSIVE``, or ``spin:N`` (``GOMP_SPINCOUNT=N``: spin, then sleep);

each ``quiet`` and ``busy`` (a second process spinning in a pure Python loop, i.e. one core taken).
A child builds the network, runs 2 warm-up steps (numba compilation, allocator), then reports the
median wall time of ``--steps`` steps (forward, L1 loss, backward, Adam). The table shows medians over
rounds; the ratio busy/quiet per policy is the number to watch (goal: <= 1.5 with the default).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

CHILD = r'''
import json, statistics, sys, time
import mambacsr_arch  # first import: sets the thread policy before torch loads
import torch
from basicsr.archs import build_network

cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
net = build_network(dict(type='MambaCSR', upscale=4, in_chans=3, img_size=cfg['lr_size'], embed_dim=24, d_state=16,
                         scan_size=8, depths=[2, 2], depths2=[2], mlp_ratio=2, img_range=1.,
                         upsampler='pixelshuffle', resi_connection='1conv', dual_interleaved_scan=True,
                         cross_scale_scan=True))
opt = torch.optim.Adam(net.parameters(), lr=1e-4)
lq = torch.rand(cfg['batch'], 3, cfg['lr_size'], cfg['lr_size'])
gt = torch.rand(cfg['batch'], 3, cfg['lr_size'] * 4, cfg['lr_size'] * 4)
times = []
for i in range(cfg['steps'] + 2):
    start = time.perf_counter()
    opt.zero_grad()
    loss = torch.nn.functional.l1_loss(net(lq), gt)
    loss.backward()
    opt.step()
    if i >= 2:
        times.append(time.perf_counter() - start)
print(json.dumps({'step_s': statistics.median(times), 'threads': torch.get_num_threads()}))
'''


def policy_env(policy: str) -> Dict[str, str]:
    """The environment of a child for ``policy``: 'default' (what ``import mambacsr_arch`` gives),
    an OMP_WAIT_POLICY value ('ACTIVE', 'PASSIVE'), or 'spin:N' (GOMP_SPINCOUNT=N, libgomp's spin
    iterations before an idle thread sleeps)."""
    env = dict(os.environ)
    for key in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'):
        env.pop(key, None)
    if policy.startswith('spin:'):
        env['GOMP_SPINCOUNT'] = policy.split(':', 1)[1]
    elif policy != 'default':
        env['OMP_WAIT_POLICY'] = policy
    return env


def run_child(cfg: Dict[str, int], policy: str, busy: bool) -> float:
    env = policy_env(policy)
    spinner = subprocess.Popen([sys.executable, '-c', 'while True: pass']) if busy else None
    try:
        if spinner is not None:
            time.sleep(0.5)  # let it take its core
        proc = subprocess.run([sys.executable, '-c', CHILD, json.dumps(cfg)], env=env, capture_output=True,
                              text=True, timeout=1800)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode != 0:
        raise RuntimeError(f'child failed ({policy}, busy={busy}):\n{proc.stderr[-3000:]}')
    return float(json.loads(proc.stdout.strip().splitlines()[-1])['step_s'])


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=3, help='timed steps per child (median)')
    parser.add_argument('--rounds', type=int, default=2, help='interleaved repetitions of every condition')
    parser.add_argument('--lr-size', type=int, default=16, help='LR patch size (px)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--policies', nargs='+', default=['default', 'ACTIVE'],
                        help="'default', an OMP_WAIT_POLICY value or 'spin:N' (GOMP_SPINCOUNT=N)")
    args = parser.parse_args(argv)
    cfg = dict(steps=args.steps, lr_size=args.lr_size, batch=args.batch)
    print(f'cores {os.cpu_count()}, load average before: {os.getloadavg()}')
    conditions = [(policy, busy) for policy in args.policies for busy in (False, True)]
    results: Dict[tuple, List[float]] = {c: [] for c in conditions}
    for _ in range(args.rounds):
        for condition in conditions:
            results[condition].append(run_child(cfg, *condition))
    print(f'\nMambaCSR demo network, training step, batch {args.batch}, LR {args.lr_size}px, '
          f'median of {args.rounds} round(s) x {args.steps} step(s)')
    print("| threads' wait policy | quiet (s) | one busy process (s) | busy / quiet |")
    print('|---|---|---|---|')
    for policy in args.policies:
        quiet = statistics.median(results[(policy, False)])
        busy = statistics.median(results[(policy, True)])
        label = 'default (set by mambacsr_arch)' if policy == 'default' else policy
        print(f'| {label} | {quiet:.3f} | {busy:.3f} | {busy / quiet:.2f} |')
    print(f'\nload average after: {os.getloadavg()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
