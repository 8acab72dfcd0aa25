"""MambaCSR vs HAT: forward latency, training step, images/s, peak memory, params and FLOPs (released x4 configs).

Run (not a test; prints one table and the ratios, all measured in this run)::

    python benchmarks/bench_models.py                 # LR 64x64 and 128x128, CPU (+ CUDA if present)
    python benchmarks/bench_models.py --quick         # LR 32x32, 2 repeats: a smoke run
    python benchmarks/bench_models.py --sizes 64 --repeats 5 --devices cpu --threads 2
    python benchmarks/bench_models.py --sizes 64 --train-sizes 64 --models MambaCSR HAT   # issue-13 table
    python benchmarks/bench_models.py --train-sizes                                       # no training column
    python benchmarks/bench_models.py --models MambaCSR HAT --allocator adapted           # glibc keeps big blocks

Measured per (device, LR size), models interleaved within each repeat so that background load
hits all of them alike:

* warm-up: one forward per model at LR 16x16 before anything is measured (numba compilation,
  allocator and thread-pool start-up are not measured).
* peak memory: the first forward at each size. CPU: growth of the process's peak RSS (``VmHWM``,
  reset via ``/proc/self/clear_refs``) over the RSS before it, after ``malloc_trim`` released the
  heap pages earlier forwards freed (else a model could reuse them unseen); CUDA:
  ``max_memory_allocated`` growth over it.
* latency: median wall time of the next ``repeats`` eval-mode forwards of one (1, 3, s, s) image
  under ``torch.inference_mode()`` (CUDA: synchronised); images/s = 1 / latency.
* CPU time: median process CPU time (all threads) of the same forwards. On a loaded machine wall
  time includes waiting for a core; CPU time does not, so its ratio is the steadier CPU comparison.
* training step (``--train-sizes``, default LR 64): one optimisation step of a train-mode copy of each
  model on a (``--train-batch``, 3, s, s) batch (GT 4x larger): forward, L1 loss, backward, Adam, as
  ``MambaCSRModel.optimize_parameters`` does (no EMA); median wall and CPU time of ``repeats`` steps after
  one warm-up step, models interleaved. The issue-13 target is MambaCSR/HAT CPU time <= 1.0 at LR 64, batch 1.
* scan share: time inside ``mambacsr_arch.ops.selective_scan`` / forward time, summed over the timed
  forwards (the function is wrapped by a timer; on CUDA synchronised around each call, which
  costs a little latency there).
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` for conv/linear/matmul/einsum/attention
  (2 FLOPs per multiply-add), counted on a ``meta``-device copy (no compute), plus the selective
  scan counted analytically (its CPU kernel runs outside PyTorch's dispatcher). With u (batch,
  D, L), A (D, N), per call::

      scan FLOPs = batch * D * L * (8 * N + 6 + 2 * [z given] + 2 * R)

  per (b, d, l, n) 8: delta*A (1), exp (1, a transcendental counted as one FLOP), delta*u*B (2),
  x = dA*x + dBu (2), y += C*x (2); per (b, d, l) 6: delta + bias and softplus (~4), y + D*u (2),
  plus the silu gate (~2) when z is given (MambaCSR's SS2D gates outside the scan, so no z there),
  plus the rank-R dt projection (2 R) when it is passed as ``delta_weight`` (MambaCSR's R = 12; it is a
  matrix product inside the cpu kernel, counted here so that every backend counts the same FLOPs).
  Elementwise ops outside the scan (norms, activations, residuals) are not counted, as usual.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mambacsr_arch  # noqa: F401  (first import: the thread policy before torch loads; registers MambaCSR, HAT)
import torch
from basicsr.archs import build_network
from torch import nn

from mambacsr_arch import ops

MAMBACSR = dict(type='MambaCSR', img_size=64, in_chans=3, upscale=4, embed_dim=180, d_state=16, scan_size=8,
                depths=[6] * 6, depths2=[6], mlp_ratio=2, img_range=1., upsampler='pixelshuffle',
                resi_connection='1conv', dual_interleaved_scan=True)
HAT = dict(type='HAT', img_size=64, in_chans=3, upscale=4, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6,
           window_size=16, compress_ratio=3, squeeze_factor=30, conv_scale=0.01, overlap_ratio=0.5, mlp_ratio=2,
           img_range=1., upsampler='pixelshuffle', resi_connection='1conv')
MODELS: Dict[str, Dict[str, Any]] = {
    'MambaCSR': dict(MAMBACSR, cross_scale_scan=True),
    'MambaCSR-DIS': dict(MAMBACSR, cross_scale_scan=False),
    'HAT': HAT,
}
BASELINE = 'HAT'
#: ``--allocator adapted``: glibc keeps large freed blocks for reuse (no mmap per block, no trimming), as it
#: partly does by itself once large blocks were freed; HAT's CPU forward runs up to 25% faster in this state
ADAPTED_MALLOC = 'glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184'


# ----------------------------------------------------------------------------- measurements


@contextlib.contextmanager
def replaced_scan(fn: Callable[..., Any]) -> Iterator[None]:
    """Temporarily route every ``mambacsr_arch.ops.selective_scan`` call (the archs call it by attribute) to ``fn``."""
    original = ops.selective_scan
    ops.selective_scan = fn
    try:
        yield
    finally:
        ops.selective_scan = original


def scan_flops(u: torch.Tensor, A: torch.Tensor, z: Optional[torch.Tensor] = None,
               delta_weight: Optional[torch.Tensor] = None) -> int:
    """Analytic FLOPs of one selective-scan call (formula in the module doc); u (b, D, L), A (D, N);
    a low-rank delta's projection (``delta_weight`` (D, R)) adds 2 R per (b, d, l)."""
    b, d, length = u.shape
    n = A.shape[-1]
    rank = 0 if delta_weight is None else delta_weight.shape[1]
    return b * d * length * (8 * n + 6 + (2 if z is not None else 0) + 2 * rank)


def count_flops(net: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    """(total FLOPs, of which selective scan) of one forward of ``x``; the scan itself is not run.

    Pass a ``meta``-device copy of the net and ``x`` to count without computing.
    """
    from torch.utils.flop_counter import FlopCounterMode

    scan_total = [0]

    def counting_stub(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, backend=None, delta_weight=None):
        scan_total[0] += scan_flops(u, A, z, delta_weight)
        out = torch.zeros_like(u)  # values do not change the FLOP count of the layers after the scan
        return (out, u.new_zeros(u.shape[0], u.shape[1], A.shape[-1])) if return_last_state else out

    counter = FlopCounterMode(display=False)
    with replaced_scan(counting_stub), torch.inference_mode(), counter:
        net(x)
    return counter.get_total_flops() + scan_total[0], scan_total[0]


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_forward(net: nn.Module, x: torch.Tensor) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward (synchronised on CUDA)."""
    _sync(x.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        net(x)
    _sync(x.device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def _proc_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status (Linux only)')


def _malloc_trim() -> None:
    """glibc ``malloc_trim(0)``: give free heap memory back to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: peaks may then be under-reported after another model freed memory


def peak_memory_bytes(net: nn.Module, x: torch.Tensor) -> Optional[int]:
    """Extra memory at the peak of one forward (see module doc); None where it cannot be measured."""
    if x.device.type == 'cuda':
        torch.cuda.synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        time_forward(net, x)
        return torch.cuda.max_memory_allocated(x.device) - before
    try:
        gc.collect()
        _malloc_trim()  # return freed heap pages, or the next model's forward reuses them unseen
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current RSS
        before = _proc_status_kib('VmRSS')
        time_forward(net, x)
        return (_proc_status_kib('VmHWM') - before) * 1024
    except OSError:
        return None


@contextlib.contextmanager
def timed_scan(device: torch.device) -> Iterator[List[float]]:
    """Wrap ``selective_scan`` by a timer; yields a one-element list accumulating seconds inside it."""
    inside = [0.0]
    original = ops.selective_scan

    def timed(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        _sync(device)
        inside[0] += time.perf_counter() - start
        return out

    with replaced_scan(timed):
        yield inside


# ----------------------------------------------------------------------------- driver


class TrainStep:
    """One training step of a train-mode copy of ``net`` (forward, L1, backward, Adam) on a fixed batch."""

    def __init__(self, net: nn.Module, size: int, batch: int, device: torch.device) -> None:
        torch.manual_seed(0)
        self.net = copy.deepcopy(net).train()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        self.lq = torch.rand(batch, 3, size, size).to(device)
        self.gt = torch.rand(batch, 3, size * 4, size * 4).to(device)

    def __call__(self) -> Tuple[float, float]:
        """(wall seconds, process CPU seconds) of one step (synchronised on CUDA)."""
        _sync(self.lq.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        nn.functional.l1_loss(self.net(self.lq), self.gt).backward()
        self.opt.step()
        _sync(self.lq.device)
        return time.perf_counter() - start, time.process_time() - cpu_start


def bench_training(nets: Dict[str, nn.Module], size: int, batch: int, repeats: int,
                   device: torch.device) -> Dict[str, Tuple[float, float, float, float]]:
    """Median (wall, CPU) seconds per training step for each model, then its fastest and slowest wall
    time; models interleaved in every repeat."""
    steps = {name: TrainStep(net, size, batch, device) for name, net in nets.items()}
    for step in steps.values():
        step()  # warm-up: backward kernels compile, the optimizer state is allocated
    times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in nets}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step())
    result = {}
    for name, measured in times.items():
        walls = [t[0] for t in measured]
        result[name] = (statistics.median(walls), statistics.median(t[1] for t in measured), min(walls), max(walls))
        print(f'  measured {name:<13} {device.type} {size}x{size} training step (batch {batch}): '
              f'{result[name][0]:.2f} s ({min(walls):.2f}-{max(walls):.2f})', file=sys.stderr)
    del steps
    gc.collect()
    return result


def build(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_network(MODELS[name]).to(device).eval()


def bench_device(names: Sequence[str], sizes: Sequence[int], repeats: int, device: torch.device,
                 train_sizes: Sequence[int] = (), train_batch: int = 1) -> List[dict]:
    """One row per (model, size) on ``device``; models interleaved inside every repeat. Training steps are
    measured at ``train_sizes`` (batch ``train_batch``); the other rows have no training column.

    Every forward is timed before any training step, as in an inference process. The order matters on
    CPU: the gigabytes a training step allocates and frees raise glibc's mmap threshold, after which
    HAT's forwards (10x the page faults of MambaCSR's) run up to 25% faster; one process measured the
    LR 64 MambaCSR/HAT latency ratio at 0.73 before and 0.83, then 0.91 after the training steps."""
    nets = {name: build(name, device) for name in names}
    for net in nets.values():
        time_forward(net, torch.rand(1, 3, 16, 16, device=device))  # warm-up
    rows = []
    for size in sorted(set(sizes)):
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
        stats: Dict[str, dict] = {}
        for name, net in nets.items():
            total, scan = count_flops(copy.deepcopy(net).to('meta'), x.to('meta'))
            stats[name] = dict(flops=total, scan_flops=scan, peak=peak_memory_bytes(net, x), times=[],
                               cpu_times=[], inside=0.0)
        for _ in range(repeats):
            for name, net in nets.items():
                with timed_scan(device) as inside:
                    wall, cpu = time_forward(net, x)
                stats[name]['times'].append(wall)
                stats[name]['cpu_times'].append(cpu)
                stats[name]['inside'] += inside[0]
        for name, net in nets.items():
            s = stats[name]
            s['scan_share'] = s['inside'] / sum(s['times']) if s['inside'] > 0 else None
            latency = statistics.median(s['times'])
            rows.append(dict(model=name, device=device.type, size=size, latency=latency, ips=1.0 / latency,
                             cpu=statistics.median(s['cpu_times']),
                             params=sum(p.numel() for p in net.parameters()), flops=s['flops'],
                             scan_flops=s['scan_flops'], peak=s['peak'], scan_share=s['scan_share'],
                             train=None, train_batch=train_batch))
            print(f'  measured {name:<13} {device.type} {size}x{size}: {latency * 1e3:.0f} ms', file=sys.stderr)
        print(format_rows(rows), file=sys.stderr)  # partial results, in case a long run is cut short
    for size in sorted(set(train_sizes)):
        train = bench_training(nets, size, train_batch, repeats, device)
        for name in nets:
            row = next((r for r in rows if r['model'] == name and r['size'] == size), None)
            if row is None:  # a training-only size
                rows.append(dict(model=name, device=device.type, size=size, latency=None, train=train[name],
                                 train_batch=train_batch))
            else:
                row['train'] = train[name]
    rows.sort(key=lambda r: (r['size'], list(nets).index(r['model'])))
    return rows


def _mib(value: Optional[int]) -> str:
    return 'n/a' if value is None else f'{value / 2 ** 20:.0f}'


def format_rows(rows: List[dict]) -> str:
    lines = ['| model | device | LR size | params (M) | GFLOPs | scan GFLOPs | latency (ms) | images/s | '
             'CPU time (s) | peak mem (MiB) | scan share of time | train step (s) | train step CPU (s) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        train = ('- | -' if r['train'] is None else f"{r['train'][0]:.2f} | {r['train'][1]:.2f}")
        if r['latency'] is None:  # training only
            lines.append(f"| {r['model']} | {r['device']} | {r['size']}x{r['size']} | - | - | - | - | - | - | - | - | "
                         f"{train} |")
            continue
        share = '-' if r['scan_share'] is None else f"{100 * r['scan_share']:.0f}%"
        lines.append(f"| {r['model']} | {r['device']} | {r['size']}x{r['size']} | {r['params'] / 1e6:.2f} | "
                     f"{r['flops'] / 1e9:.1f} | {r['scan_flops'] / 1e9:.1f} | {r['latency'] * 1e3:.0f} | "
                     f"{r['ips']:.3g} | {r['cpu']:.1f} | {_mib(r['peak'])} | {share} | {train} |")
    return '\n'.join(lines)


def _baseline(rows: List[dict], row: dict) -> Optional[dict]:
    """The BASELINE model's row for the same device and size as ``row`` (None if it was not measured)."""
    return next((b for b in rows if b['model'] == BASELINE and b['device'] == row['device']
                 and b['size'] == row['size']), None)


def format_ratios(rows: List[dict]) -> str:
    lines = [f'| model / {BASELINE} | device | LR size | latency ratio | CPU time ratio | FLOPs ratio | '
             'peak memory ratio | train step ratio | train step CPU ratio |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r['model'] == BASELINE:
            continue
        base = _baseline(rows, r)
        if base is None:
            continue
        train = '- | -'
        if r['train'] is not None and base['train'] is not None:
            train = f"{r['train'][0] / base['train'][0]:.2f} | {r['train'][1] / base['train'][1]:.2f}"
        if r['latency'] is None:
            lines.append(f"| {r['model']} | {r['device']} | {r['size']}x{r['size']} | - | - | - | - | {train} |")
            continue
        mem = ('n/a' if not (r['peak'] and base['peak']) else f"{r['peak'] / base['peak']:.2f}")
        lines.append(f"| {r['model']} | {r['device']} | {r['size']}x{r['size']} | "
                     f"{r['latency'] / base['latency']:.2f} | {r['cpu'] / base['cpu']:.2f} | "
                     f"{r['flops'] / base['flops']:.2f} | {mem} | {train} |")
    return '\n'.join(lines)


def format_train_spread(rows: List[dict]) -> str:
    """The training-step ratio from each model's fastest and from its slowest step: a CPU step's time
    varies with the allocator's state (HAT's 56 MiB attention maps are page-faulted afresh in some
    steps), so the median ratio alone can hide which model the spread comes from."""
    lines = []
    for r in rows:
        base = _baseline(rows, r)
        if r['model'] == BASELINE or base is None or r['train'] is None or base['train'] is None:
            continue
        fast, slow = (f"{r['train'][i] / base['train'][i]:.2f} ({r['train'][i]:.2f} s / {base['train'][i]:.2f} s)"
                      for i in (2, 3))
        lines.append(f"{r['model']} / {BASELINE} training step, {r['device']} {r['size']}x{r['size']}: "
                     f"fastest steps {fast}, slowest {slow}")
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', help='LR sizes in px (default 64 128; --quick: 32)')
    parser.add_argument('--repeats', type=int, help='timed forwards per model and size (default 3; --quick: 2)')
    parser.add_argument('--quick', action='store_true', help='LR 32x32, 2 repeats')
    parser.add_argument('--models', nargs='+', choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument('--devices', nargs='+', choices=('cpu', 'cuda'),
                        help='default: cpu, plus cuda when available')
    parser.add_argument('--threads', type=int, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--train-sizes', type=int, nargs='*',
                        help='LR sizes of the training-step column (default 64; --quick: 32; none: no training)')
    parser.add_argument('--train-batch', type=int, default=1, help='batch of the training step (default 1)')
    parser.add_argument('--allocator', choices=('default', 'adapted'), default='default',
                        help="glibc malloc state: 'adapted' re-runs this script with GLIBC_TUNABLES raising the "
                             'mmap and trim thresholds (large blocks are reused instead of re-faulted; see the '
                             "README's Performance section)")
    args = parser.parse_args(argv)
    if args.allocator == 'adapted' and os.environ.get('GLIBC_TUNABLES') != ADAPTED_MALLOC:
        env = dict(os.environ, GLIBC_TUNABLES=ADAPTED_MALLOC)  # read by glibc at process start only
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None
                                                                                   else argv), env)
    if args.train_batch < 1:
        parser.error(f'--train-batch must be >= 1, got {args.train_batch}')
    train_sizes = args.train_sizes if args.train_sizes is not None else ([32] if args.quick else [64])
    sizes = args.sizes or ([32] if args.quick else [64, 128])
    repeats = args.repeats or (2 if args.quick else 3)
    devices = args.devices or (['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu'])
    if 'cuda' in devices and not torch.cuda.is_available():
        parser.error('--devices cuda: CUDA is not available here.')
    if args.threads:
        torch.set_num_threads(args.threads)

    malloc = os.environ.get('GLIBC_TUNABLES') or "glibc's default"
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, os.cpu_count() {os.cpu_count()}, '
          f'load average {os.getloadavg()[0]:.1f}; x4, batch 1, float32, eval mode; '
          f'median of {repeats} forwards; training steps at LR {train_sizes or "-"}, batch {args.train_batch}; '
          f'malloc tunables: {malloc}; OMP_WAIT_POLICY {os.environ.get("OMP_WAIT_POLICY", "unset")}')
    rows = []
    for name in devices:
        device = torch.device(name)
        backend, why = ops.resolve_backend(device)
        extra = f', {torch.cuda.get_device_name(device)}' if device.type == 'cuda' else ''
        print(f'{name}{extra}: selective-scan backend {backend} ({why})')
        rows += bench_device(args.models, sizes, repeats, device, train_sizes, args.train_batch)
    print()
    print(format_rows(rows))
    print()
    print(format_ratios(rows))
    spread = format_train_spread(rows)
    if spread:
        print(spread)
    print(f'load average at the end {os.getloadavg()[0]:.1f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
