"""Selective-scan backends against the sequential reference and the torch.exp floor.

The MambaCSR 64x64 training case: dim = 720 (4 scan directions x 180 channels, groups = 4), N = 16,
L = 4096, with D, delta_bias and softplus (as the SS2D mixer calls it), batch 1 and 4.
Prints seconds per call (median of --repeat after one warm-up), cycles per state update and ratios:

* cycles / upd: process CPU seconds of the call (all threads) x the CPU clock from /proc/cpuinfo's
  "cpu MHz" (the nominal clock: turbo makes real cycles higher), divided by the number of 8-wide
  state updates, batch * dim * L * N / 8 (forward: one per step and 8 states; fwd+bwd: the same count,
  so it includes the backward's recomputation). Process CPU time, not wall time, so other jobs on a
  shared machine inflate it less.

* vs ref: the sequential reference's forward at the same size in this process. Its backward keeps
  every state and takes minutes, so its forward+backward is measured at L = --ref-bwd-length and
  scaled linearly in L (the recurrence is linear in L); the output says so.
* vs exp floor: one ``torch.exp`` over a (batch, dim, L, N) float32 tensor, the cost any method that
  materialises exp(delta A) pays at least once.

Peak memory added by one forward+backward at batch 4 is measured in a fresh subprocess as the rise
of the RSS (sampled every millisecond, glibc mmap threshold fixed at 128 KiB so freed blocks leave
the RSS) over the RSS once the inputs exist; the (batch, dim, L, N) float32
states it never stores would be 755 MB. Usage: ``python benchmarks/bench_scan.py [--quick]``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import mambacsr_arch  # noqa: F401  (first import: the thread policy before torch loads; shims before basicsr)
import torch
from mambacsr_arch.ops import available_backends, selective_scan

DIM, N_STATE, GROUPS, LENGTH = 720, 16, 4, 4096
NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')


def make_inputs(batch: int, length: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs shaped and scaled like MambaCSR's (dt = softplus(delta + bias) ~ 0.001..0.1)."""
    g = torch.Generator().manual_seed(seed)
    return {
        'u': torch.randn(batch, DIM, length, generator=g),
        'delta': torch.randn(batch, DIM, length, generator=g) * 0.5,
        'A': -torch.arange(1, N_STATE + 1, dtype=torch.float32).repeat(DIM, 1),
        'B': torch.randn(batch, GROUPS, N_STATE, length, generator=g),
        'C': torch.randn(batch, GROUPS, N_STATE, length, generator=g),
        'D': torch.ones(DIM),
        'delta_bias': torch.rand(DIM, generator=g) * 4.6 - 6.9,
    }


def call(inputs: Dict[str, torch.Tensor], backend: str) -> torch.Tensor:
    return selective_scan(inputs['u'], inputs['delta'], inputs['A'], inputs['B'], inputs['C'], inputs['D'],
                          delta_bias=inputs['delta_bias'], delta_softplus=True, backend=backend)


def forward_backward(inputs: Dict[str, torch.Tensor], backend: str) -> None:
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    out = call(leaves, backend)
    out.backward(torch.ones_like(out))


def timed(fn: Callable[[], object], repeat: int, warmup: int = 1, slow_s: float = 10.0) -> float:
    """Median wall seconds of ``fn`` over ``repeat`` runs after ``warmup`` runs (one run if the
    warm-up alone took over ``slow_s`` seconds: slow backends are timed once)."""
    return timed_cpu(fn, repeat, warmup, slow_s)[0]


def timed_cpu(fn: Callable[[], object], repeat: int, warmup: int = 1, slow_s: float = 10.0) -> Tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn``, timed as in :func:`timed`."""
    times: List[float] = []
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if times and min(times) > slow_s:
        repeat = 1
    times, cpu_times = [], []
    for _ in range(repeat):
        gc.collect()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), statistics.median(cpu_times)


def cpu_mhz() -> Optional[float]:
    """The first "cpu MHz" of /proc/cpuinfo (None where there is none, e.g. not Linux)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('cpu MHz'):
                    return float(line.split(':')[1])
    except (OSError, ValueError):
        pass
    return None


def cycles_per_update(cpu_s: float, mhz: Optional[float], batch: int) -> str:
    """Process CPU cycles per 8-wide state update, formatted ('?' without a clock)."""
    if mhz is None:
        return '?'
    return f'{cpu_s * mhz * 1e6 / (batch * DIM * LENGTH * N_STATE / 8):.1f}'


def rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def memory_child(backend: str, batch: int) -> None:
    """Run in a fresh process: print the peak RSS rise of one forward+backward, in bytes, sampled
    every millisecond by a thread (getrusage's lifetime peak also counts earlier temporaries)."""
    forward_backward(make_inputs(1, 70), backend)  # compile / warm up on a tiny case
    inputs = make_inputs(batch, LENGTH)
    gc.collect()
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    forward_backward(inputs, backend)
    done.set()
    sampler.join()
    print(json.dumps({'added_bytes': max(peak[0], rss_bytes()) - before}))


def peak_memory(backend: str, batch: int) -> Optional[int]:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', backend, '--batch', str(batch)]
    # fixed mmap threshold: blocks >= 128 KiB go back to the OS when freed, so RSS tracks live memory
    # instead of glibc's heap high-water mark
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072')
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f'  memory child for {backend} failed: {result.stderr.strip()[-500:]}')
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])['added_bytes']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='batch 1 only, one timed run, no memory run')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 4])
    parser.add_argument('--backends', nargs='+', default=None, help='default: every available one')
    parser.add_argument('--ref-bwd-length', type=int, default=256)
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory runs')
    parser.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--batch', type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch)
        return
    if args.quick:
        args.repeat, args.batches = 1, [1]
    usable = [name for name, why in available_backends().items() if why is None and name != 'reference']
    usable = [b for b in usable if b != 'mamba_ssm']  # CUDA only; this benchmark runs on CPU tensors
    backends = args.backends or usable
    import numba
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'torch {torch.__version__}, numba {numba.__version__}, {torch.get_num_threads()} threads (torch and the '
          f'cpu kernel), {os.cpu_count()} CPUs, load average {load:.1f}; dim {DIM}, N {N_STATE}, groups {GROUPS}, '
          f'L {LENGTH}, D + delta_bias + softplus')
    mhz = cpu_mhz()
    print(f'CPU clock (/proc/cpuinfo "cpu MHz", nominal): {mhz} MHz; cycles / upd = process CPU seconds x that '
          f'clock / (batch * dim * L * N / 8) 8-wide state updates')
    print(f'backends: {backends}; unavailable: '
          f'{ {k: v for k, v in available_backends().items() if v} }')
    rows = []
    header = ('| batch | backend | forward s | fwd cycles / upd | fwd+bwd s | fwd+bwd cycles / upd '
              '| fwd speed-up vs ref | fwd+bwd speed-up vs ref* | forward / exp floor |\n'
              '|---|---|---|---|---|---|---|---|---|')
    for batch in args.batches:
        inputs = make_inputs(batch, LENGTH)
        floor = timed(lambda: torch.exp(torch.empty(batch, DIM, LENGTH, N_STATE)), args.repeat)
        ref_fwd = timed(lambda: call(inputs, 'reference'), 1, warmup=0)
        short = make_inputs(batch, args.ref_bwd_length)
        ref_fb = timed(lambda: forward_backward(short, 'reference'), 1, warmup=0) * LENGTH / args.ref_bwd_length
        print(f'\nbatch {batch}: exp floor {floor:.3f} s; reference forward {ref_fwd:.2f} s; reference '
              f'forward+backward ~{ref_fb:.1f} s (measured at L={args.ref_bwd_length}, scaled x'
              f'{LENGTH / args.ref_bwd_length:g})', flush=True)
        for backend in backends:
            fwd, fwd_cpu = timed_cpu(lambda: call(inputs, backend), args.repeat)
            fb, fb_cpu = timed_cpu(lambda: forward_backward(inputs, backend), args.repeat)
            rows.append(f'| {batch} | {backend} | {fwd:.3f} | {cycles_per_update(fwd_cpu, mhz, batch)} | {fb:.3f} '
                        f'| {cycles_per_update(fb_cpu, mhz, batch)} | {ref_fwd / fwd:.0f}x | {ref_fb / fb:.0f}x '
                        f'| {fwd / floor:.2f} |')
            print(rows[-1], flush=True)
    print('\n' + header)
    print('\n'.join(rows))
    print(f'* reference forward+backward extrapolated linearly from L={args.ref_bwd_length}.')
    if not (args.quick or args.no_memory):
        states = 4 * DIM * LENGTH * N_STATE * 4
        print(f'\npeak memory added by one forward+backward, batch 4 (states would be {states / 2**20:.0f} MiB):')
        for backend in backends:
            added = peak_memory(backend, 4)
            if added is not None:
                print(f'  {backend}: {added / 2**20:.0f} MiB')


if __name__ == '__main__':
    main()
