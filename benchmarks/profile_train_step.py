"""Where a CPU training step of MambaCSR and HAT goes: scan forward, scan backward, matrix products,
elementwise and layout passes (released x4 configs, LR 64, batch 1, forward + L1 + backward + Adam).

Run (not a test; on a quiet machine, it prints the CPU model and the load average)::

    python benchmarks/profile_train_step.py                       # MambaCSR and HAT, LR 64, batch 1
    python benchmarks/profile_train_step.py --models MambaCSR-DIS --size 32 --top 30

How it measures (the steps of both models interleaved, after two warm-up steps each):

* step: median wall time of ``--repeats`` plain steps (no timers), the figure ratios are taken of.
* one more step under a ``TorchDispatchMode`` that times every ATen operator it dispatches:
  matrix products, convolutions and attention (``bmm``, ``mm``, ``addmm``, ``convolution`` and their
  backward, fused attention) in one share, every other operator (elementwise, reductions, copies,
  norms, the optimizer's arithmetic) in "elementwise and layout".
* scan forward / backward: the ``cpu`` backend's numba kernels (``_forward_kernels`` and
  ``_backward_kernels`` of ``mambacsr_arch.ops.cpu_scan``, which run outside the dispatcher), timed by
  wrappers; operators dispatched inside them are not counted twice.
* rest: the timed step minus all of the above (Python, autograd bookkeeping, the timers themselves).

``torch.profiler`` was not used for the shares: on this code it charged the operator that follows a
scan backward with the scan's tail (the x_proj gradient's ``bmm``, 2.2 ms a call, showed 15.7 ms).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional

import mambacsr_arch  # noqa: F401  (first: OMP_WAIT_POLICY=PASSIVE before torch loads; registers the archs)
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import MODELS, TrainStep, build  # noqa: E402

from mambacsr_arch.ops import cpu_scan  # noqa: E402

# (composite names too: under inference_mode linear, conv2d and matmul reach the dispatcher undecomposed)
PRODUCTS = {'bmm', 'mm', 'addmm', 'baddbmm', 'matmul', 'linear', 'conv2d', 'convolution', 'convolution_backward',
            'mkldnn_convolution', 'scaled_dot_product_attention',
            '_scaled_dot_product_flash_attention_for_cpu', '_scaled_dot_product_flash_attention_for_cpu_backward'}


class OpTimer(TorchDispatchMode):
    """Seconds per ATen operator (by name, and by name and input shapes), except inside a scan kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Dict[str, float] = collections.defaultdict(float)
        self.by_shape: Dict[str, float] = collections.defaultdict(float)
        self.calls: Dict[str, int] = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        spent = time.perf_counter() - start
        name = func.overloadpacket.__name__
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:3]
        self.by_name[name] += spent
        self.by_shape[f'{name} {shapes}'] += spent
        self.calls[f'{name} {shapes}'] += 1
        return out


@contextlib.contextmanager
def timed_kernels(timer: OpTimer) -> Iterator[Dict[str, float]]:
    """Time the cpu backend's forward and backward kernels (pausing ``timer`` inside them)."""
    spent = {'scan forward': 0.0, 'scan backward': 0.0}
    originals = {'scan forward': cpu_scan._forward_kernels, 'scan backward': cpu_scan._backward_kernels}

    def wrap(label, fn):
        def timed(*args, **kwargs):
            paused, timer.paused = timer.paused, True
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
                timer.paused = paused
        return timed

    cpu_scan._forward_kernels = wrap('scan forward', originals['scan forward'])
    cpu_scan._backward_kernels = wrap('scan backward', originals['scan backward'])
    try:
        yield spent
    finally:
        cpu_scan._forward_kernels = originals['scan forward']
        cpu_scan._backward_kernels = originals['scan backward']


def profile(step: TrainStep) -> Dict[str, object]:
    timer = OpTimer()
    with timed_kernels(timer) as kernels:
        start = time.perf_counter()
        with timer:
            step()
        total = time.perf_counter() - start
    products = sum(v for k, v in timer.by_name.items() if k in PRODUCTS)
    others = sum(v for k, v in timer.by_name.items() if k not in PRODUCTS)
    shares = dict(kernels)
    shares['matrix products, convolutions, attention'] = products
    shares['elementwise and layout'] = others
    shares['rest (Python, autograd, timers)'] = total - sum(shares.values())
    return dict(total=total, shares=shares, timer=timer)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['MambaCSR', 'HAT'], choices=sorted(MODELS))
    parser.add_argument('--size', type=int, default=64, help='LR patch size (default 64)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--top', type=int, default=12, help='operators (by name and input shapes) to list')
    args = parser.parse_args(argv)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(':')
    print(f"CPU: {cpu[-1].strip() or 'unknown'}; {torch.get_num_threads()} torch threads; load average "
          f'{os.getloadavg()}; OMP_WAIT_POLICY {os.environ.get("OMP_WAIT_POLICY")}; scan backend cpu')
    device = torch.device('cpu')
    steps = {name: TrainStep(build(name, device), args.size, args.batch, device) for name in args.models}
    for step in steps.values():
        step(), step()  # warm-up: kernels compiled, optimizer state allocated
    walls: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            walls[name].append(step()[0])
    results = {name: profile(step) for name, step in steps.items()}
    for name, result in results.items():
        wall = statistics.median(walls[name])
        print(f'\n{name}: training step {wall:.2f} s (median of {args.repeats}); timed step {result["total"]:.2f} s')
        for label, seconds in result['shares'].items():
            print(f'  {label:<42} {seconds:6.2f} s  {seconds / result["total"]:5.1%}')
        timer = result['timer']
        print('  top operators (name, input shapes: seconds, calls):')
        for key, seconds in sorted(timer.by_shape.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f'    {seconds:6.3f} s {timer.calls[key]:5d}  {key[:100]}')
    names = list(results)
    if len(names) > 1:
        base = names[-1]
        for name in names[:-1]:
            ratio = statistics.median(walls[name]) / statistics.median(walls[base])
            print(f'\n{name} / {base} training step (wall, plain steps): {ratio:.2f}')
    print(f'load average at the end {os.getloadavg()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
