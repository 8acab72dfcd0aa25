"""``cpu`` backend: exact fused numba kernel (see :mod:`._cpu_kernels`) behind two torch.library custom
operators, ``mambacsr::cpu_scan_fwd`` and ``mambacsr::cpu_scan_bwd`` (the autograd formula of the first),
so ``torch.compile`` keeps the scan in its graph as one opaque node (no graph break) and compiled training
runs the same kernels. Eager calls reach the same kernel functions through :class:`_EagerScan`, an
autograd.Function, which skips the custom-operator dispatch.

Saved for backward: u, delta, z (batch*dim, L), the transposed B, C (batch*groups, L, N) and one state
per chunk of ``CHUNK`` steps (batch*dim, L / CHUNK, N) -- never the (batch, dim, L, N) states.
numba is imported on first use, not at package import; if it is missing, :func:`unavailable_reason`
says so and the dispatch falls back to the ``torch`` backend.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _threads

CHUNK = 512  # steps between state checkpoints (backward recomputes one chunk at a time). Each chunk costs
# fixed work per row (its dt pass, checkpoint, loop set-up): on a 2-core AMD EPYC (AVX-512), MambaCSR's scan
# (720 channels, N 16, L 4096) took 0.79-0.86x the forward and 0.81-0.89x the forward+backward time of 64-step
# chunks (256: 0.84-0.89 / 0.85-0.94; 1024 no better; N 64 and L 1024 likewise), while the backward's two
# (CHUNK + 1, N / 16, 8, 16) float32 buffers per thread (0.5 MiB at N 16) still sit in L2
BACKWARD_TASKS = 16  # backward: channel blocks with their own dB/dC partial sums; fixed, not per thread,
# so results are bitwise identical for any thread count
PIECES_PER_THREAD = 4  # load balancing: work ranges per thread
_KERNELS: Optional[ModuleType] = None
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY: Tuple[int, int] = (0, 0)  # (pid, workers) of _POOL: a forked child builds its own
_POOL_LOCK = threading.Lock()
_SPIN_NOTED = False  # the spinning-OpenMP-threads check ran (and warned if needed; once per process)


def _kernels() -> ModuleType:
    """Import the numba kernels (raises ImportError with the install hint if numba is missing)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = importlib.import_module('mambacsr_arch.ops._cpu_kernels')
        except Exception as exc:  # numba/llvmlite import failures are not always ImportError
            raise ImportError(f'numba not importable: {type(exc).__name__}: {exc}; install with '
                              f"pip install 'numba>=0.59'") from exc
    return _KERNELS


def _run(kernel: Callable[..., None], n_items: int, *args: Any) -> None:
    """Run ``kernel(lo, hi, *args)`` over 0..n_items in ``PIECES_PER_THREAD * threads`` ranges on a
    thread pool, threads = :func:`scan_threads`. The kernels release the GIL; the calling thread takes part."""
    threads = scan_threads()  # outside the try: a bad MAMBACSR_SCAN_THREADS is the user's error, said as such
    try:
        _run_pieces(kernel, n_items, threads, *args)
    except Exception as exc:  # e.g. a numba compile error on an unusual CPU: say how to avoid it
        name = getattr(kernel, '__name__', 'kernel')
        raise RuntimeError(f'cpu selective-scan {name} failed: {type(exc).__name__}: {exc}. Use the portable '
                           f"backend instead: backend='torch' or MAMBACSR_SCAN_BACKEND=torch") from exc


def _note_spinning_threads() -> None:
    """Log once per process that torch's OpenMP threads spin beside the scan's pool (see
    :data:`mambacsr_arch._threads.OMP_THREADS_SPIN`), with the fix."""
    global _SPIN_NOTED
    if _SPIN_NOTED:  # checked once: the policy cannot change after torch has loaded
        return
    _SPIN_NOTED = True
    if not _threads.OMP_THREADS_SPIN:
        return
    logging.getLogger('basicsr').warning(
        'torch was imported before mambacsr_arch and OMP_WAIT_POLICY is not set, so torch\'s idle OpenMP '
        'threads spin on the cores the cpu selective scan\'s threads need (its calls take up to ~1.5x as long; '
        'much longer beside another busy process). Set OMP_WAIT_POLICY=PASSIVE in the environment, or import '
        'mambacsr_arch before torch.')


THREADS_ENV = 'MAMBACSR_SCAN_THREADS'


def scan_threads() -> int:
    """Threads of the cpu scan's kernels: ``MAMBACSR_SCAN_THREADS`` if set (a positive integer), else
    ``torch.get_num_threads()`` (so torch.set_num_threads and OMP_NUM_THREADS apply). Read on every call."""
    value = os.environ.get(THREADS_ENV, '').strip()
    if not value:
        return torch.get_num_threads()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f'{THREADS_ENV}={value!r}: expected a positive integer (threads of the cpu selective '
                         f'scan), or unset it to use torch.get_num_threads()')
    return threads


def _run_pieces(kernel: Callable[..., None], n_items: int, threads: int, *args: Any) -> None:
    global _POOL, _POOL_KEY
    threads = max(1, min(threads, n_items))
    if threads == 1:
        kernel(0, n_items, *args)
        return
    _note_spinning_threads()
    pieces = min(n_items, PIECES_PER_THREAD * threads)
    bounds = [n_items * k // pieces for k in range(pieces + 1)]
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY[0] != os.getpid() or _POOL_KEY[1] < threads - 1:
            if _POOL is not None and _POOL_KEY[0] == os.getpid():
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix='mambacsr-scan')
            _POOL_KEY = (os.getpid(), threads - 1)
        pool = _POOL
    todo = iter(range(pieces))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                return
            kernel(bounds[k], bounds[k + 1], *args)

    futures = [pool.submit(worker) for _ in range(threads - 1)]
    worker()
    for future in futures:
        future.result()  # re-raises a worker's exception


def unavailable_reason() -> Optional[str]:
    """None if the numba kernel can be used, else why not."""
    try:
        _kernels()
    except ImportError as exc:
        return str(exc)
    return None


def _np(x: torch.Tensor) -> Any:
    """numpy view of a float32 tensor for the kernels (C-contiguous; no copy when already so)."""
    if x.dtype != torch.float32:
        raise TypeError(f'cpu selective-scan kernels take float32 tensors, got {x.dtype} (call '
                        'mambacsr_arch.ops.selective_scan, which converts)')
    return x.detach().contiguous().numpy()


def _optional(x: Optional[torch.Tensor], shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """x, or zeros of ``shape`` standing for an absent D / z / delta_bias (the kernels ignore them)."""
    return like.new_zeros(shape) if x is None else x


# The two halves of the scan are torch.library custom operators: torch.compile (Dynamo, AOTAutograd,
# Inductor) treats each as one opaque node with the shapes of its fake implementation, so a compiled
# model keeps the numba kernels and has no graph break in the scan; autograd goes through
# ``_scan_fwd_backward`` (registered below), so compiled training works too. Their arguments are the
# kernels' layout (float32, rows = batch * dim, states padded to a multiple of ``W``); :func:`scan`
# builds it from selective_scan's tensors with ordinary, differentiable torch ops.
def _forward_kernels(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, Ct: torch.Tensor,
                     D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                     softplus: bool, delta_weight: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, z (rows, L); delta (rows, L), or with ``delta_weight`` (dim, R) the projection's input
    (batch * groups, R, L); A (dim, NP); Bt, Ct (batch * groups, L, NP); D, delta_bias (dim,).
    Returns out (rows, L), the last state (rows, NP) and the chunk checkpoints (rows, ceil(L / CHUNK), NP)."""
    kernels = _kernels()
    rows, length = u.shape
    dim, padded = A.shape
    batch = rows // dim
    groups = Bt.shape[0] // batch
    out = u.new_empty((rows, length))
    last = u.new_empty((rows, padded))
    ckpt = u.new_empty((rows, _chunks(length), padded))
    row_blocks = batch * groups * math.ceil(dim // groups / kernels.R)  # see _cpu_kernels.block_rows
    _run(kernels.scan_forward, row_blocks, *_delta_args(u, delta, delta_weight), _np(A), _np(Bt), _np(Ct),
         _np(_optional(D, (dim,), u)), _np(_optional(z, (1, 1), u)), _np(_optional(delta_bias, (dim,), u)),
         bool(softplus), z is not None, dim, groups, CHUNK, out.numpy(), last.numpy(), ckpt.numpy())
    return out, last, ckpt


def _delta_args(u: torch.Tensor, delta: torch.Tensor, delta_weight: Optional[torch.Tensor]) -> Tuple[Any, ...]:
    """The kernels' (u, delta, delta_in, delta_w, lowrank) arguments (placeholders for the unused form)."""
    if delta_weight is None:
        return _np(u), _np(delta), _np(u.new_zeros((1, 1, 1))), _np(u.new_zeros((1, 1))), False
    return _np(u), _np(u.new_zeros((1, 1))), _np(delta), _np(delta_weight), True


_scan_fwd = torch.library.custom_op('mambacsr::cpu_scan_fwd', _forward_kernels, mutates_args=(),
                                    device_types='cpu')


def _chunks(length: Any) -> Any:
    """Number of state checkpoints for ``length`` >= 1 steps (works on symbolic sizes too)."""
    return (length + CHUNK - 1) // CHUNK


@_scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, delta_weight):
    rows, length = u.shape
    padded = A.shape[1]
    return u.new_empty((rows, length)), u.new_empty((rows, padded)), u.new_empty((rows, _chunks(length), padded))


def _backward_kernels(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, Ct: torch.Tensor,
                      D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                      softplus: bool, delta_weight: Optional[torch.Tensor], ckpt: torch.Tensor, dout: torch.Tensor,
                      dlast: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_forward_kernels` given those of out and last: du, ddelta, dA, dBt, dCt, dD, dz
    (empty (0,) without z), ddelta_bias, each shaped like its input, except ddelta: (rows, L), the
    gradient of the projected delta when ``delta_weight`` is given (see :func:`_gradients`)."""
    kernels = _kernels()
    rows, length = u.shape
    dim, padded = A.shape
    batch = rows // dim
    groups = Bt.shape[0] // batch
    has_z = z is not None
    blocks = max(1, min(math.ceil(dim // groups / kernels.R), math.ceil(BACKWARD_TASKS / (batch * groups))))
    du = u.new_empty((rows, length))
    ddelta = u.new_empty((rows, length))
    dz = u.new_empty((rows, length)) if has_z else u.new_zeros((1, 1))
    dA_rows = u.new_empty((rows, padded))
    dD_rows = u.new_empty(rows)
    dbias_rows = u.new_empty(rows)
    dB_part = u.new_empty((batch * groups * blocks, length, padded))
    dC_part = u.new_empty((batch * groups * blocks, length, padded))
    _run(kernels.scan_backward, batch * groups * blocks, *_delta_args(u, delta, delta_weight), _np(A), _np(Bt),
         _np(Ct), _np(_optional(D, (dim,), u)), _np(_optional(z, (1, 1), u)),
         _np(_optional(delta_bias, (dim,), u)), bool(softplus), has_z, dim, groups, CHUNK, _np(ckpt), _np(dout),
         _np(dlast), blocks, du.numpy(), ddelta.numpy(), dz.numpy(), dA_rows.numpy(), dD_rows.numpy(),
         dbias_rows.numpy(), dB_part.numpy(), dC_part.numpy())
    parts = (batch * groups, blocks, length, padded)
    return (du, ddelta, dA_rows.view(batch, dim, padded).sum(0), dB_part.view(parts).sum(1),
            dC_part.view(parts).sum(1), dD_rows.view(batch, dim).sum(0), dz if has_z else u.new_empty(0),
            dbias_rows.view(batch, dim).sum(0))


_scan_bwd = torch.library.custom_op('mambacsr::cpu_scan_bwd', _backward_kernels, mutates_args=(),
                                    device_types='cpu')


@_scan_bwd.register_fake
def _scan_bwd_fake(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, delta_weight, ckpt, dout, dlast):
    dim = A.shape[0]
    return (torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(Bt),
            torch.empty_like(Ct), u.new_empty(dim), torch.empty_like(u) if z is not None else u.new_empty(0),
            u.new_empty(dim))


def _scan_fwd_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, ...]) -> None:
    u, delta, A, Bt, Ct, D, z, delta_bias, softplus, delta_weight = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, delta_bias, delta_weight, output[2])
    ctx.softplus = softplus


def _no_double_backward(ctx: Any, *grads: Any):
    raise RuntimeError("the cpu selective-scan backend is differentiable once (no double backward); use "
                       "backend='torch' or MAMBACSR_SCAN_BACKEND=torch for higher-order gradients")


_scan_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _gradients(ctx: Any, dout: torch.Tensor, dlast: torch.Tensor, backward: Callable[..., Tuple[torch.Tensor, ...]]):
    """Gradients of the forward's inputs (None for absent ones) by ``backward`` (the op or its kernels)."""
    u, delta, A, Bt, Ct, D, z, delta_bias, delta_weight, ckpt = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = backward(u, delta, A, Bt, Ct, D, z, delta_bias, ctx.softplus,
                                                      delta_weight, ckpt, dout, dlast)
    dweight = None
    if delta_weight is not None:  # the projection's backward: two products per group of channels
        rank, length = delta.shape[1:]
        dim = delta_weight.shape[0]
        groups = delta.shape[0] * dim // u.shape[0]
        grad = ddelta.view(-1, groups, dim // groups, length)  # (batch, groups, dim / groups, L)
        inputs = delta.view(-1, groups, rank, length)
        dweight = torch.matmul(grad, inputs.transpose(-1, -2)).sum(0).view(dim, rank)
        ddelta = torch.matmul(delta_weight.view(groups, dim // groups, rank).transpose(-1, -2), grad)
        ddelta = ddelta.view(delta.shape)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, dweight)


def _scan_fwd_backward(ctx: Any, dout: torch.Tensor, dlast: torch.Tensor, _dckpt: Any):
    return _gradients(ctx, dout, dlast, _scan_bwd)


_scan_fwd.register_autograd(_scan_fwd_backward, setup_context=_scan_fwd_setup)


class _EagerScan(torch.autograd.Function):
    """Eager mode: the same kernels, saved tensors and gradient formula as ``mambacsr::cpu_scan_fwd``
    without the custom-operator dispatch, which costs 0.1-0.3 ms a call (a third of a small scan)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        output = _forward_kernels(*inputs)
        _scan_fwd_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, dlast: torch.Tensor, _dckpt: Any):
        # create_graph=True: the custom op, whose autograd formula raises on a double backward
        return _gradients(ctx, dout, dlast, _scan_bwd if torch.is_grad_enabled() else _backward_kernels)



def _kernel_layout(x: torch.Tensor, padded: int) -> torch.Tensor:
    """float32, C-contiguous, last dim zero-padded to ``padded`` (differentiable; no copy when already so)."""
    x = x.float()
    if x.shape[-1] != padded:
        x = F.pad(x, (0, padded - x.shape[-1]))
    return x.contiguous()


def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
         delta_softplus: bool, return_last_state: bool, delta_weight: Optional[torch.Tensor] = None):
    """Full fused selective scan on CPU tensors (shapes as in ``selective_scan``, B/C 4-D; with
    ``delta_weight`` (dim, R), delta is (batch, groups, R, L) and projected inside the kernels).

    Not empty (the dispatcher answers empty inputs). Returns (out float32 (batch, dim, L), last_state
    (batch, dim, N) or None). Traceable by torch.compile: the kernels run inside two custom operators."""
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    padded = -(-n_state // _kernels().W) * _kernels().W
    rows = batch * dim

    def flat(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.float().contiguous().view(rows, length)

    def states_last(x: torch.Tensor) -> torch.Tensor:  # (batch, groups, N, L) -> (batch * groups, L, NP)
        return _kernel_layout(x.transpose(2, 3).reshape(batch * groups, length, n_state), padded)

    forward = _scan_fwd if torch.compiler.is_compiling() else _EagerScan.apply
    if delta_weight is None:
        delta = flat(delta)
    else:
        delta = delta.float().contiguous().view(batch * groups, delta.shape[2], length)
        delta_weight = delta_weight.float().contiguous()
    out, last, _ = forward(flat(u), delta, _kernel_layout(A, padded), states_last(B), states_last(C),
                           None if D is None else D.float(), flat(z),
                           None if delta_bias is None else delta_bias.float(), bool(delta_softplus), delta_weight)
    out = out.view(batch, dim, length)
    return out, (last[:, :n_state].reshape(batch, dim, n_state) if return_last_state else None)
