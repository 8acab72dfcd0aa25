"""``cpu`` backend: exact fused numba kernel (see :mod:`._cpu_kernels`) behind a custom autograd Function.

Saved for backward: u, delta, z (batch*dim, L), the transposed B, C (batch*groups, L, N) and one state
per chunk of ``CHUNK`` steps (batch*dim, L / CHUNK, N) -- never the (batch, dim, L, N) states.
numba is imported on first use, not at package import; if it is missing, :func:`unavailable_reason`
says so and the dispatch falls back to the ``torch`` backend.
"""
from __future__ import annotations

import importlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

CHUNK = 64  # steps between state checkpoints (backward recomputes one chunk at a time)
BACKWARD_TASKS = 16  # backward: channel blocks with their own dB/dC partial sums; fixed, not per thread,
# so results are bitwise identical for any thread count
PIECES_PER_THREAD = 4  # load balancing: work ranges per thread
_KERNELS: Optional[ModuleType] = None
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY: Tuple[int, int] = (0, 0)  # (pid, workers) of _POOL: a forked child builds its own
_POOL_LOCK = threading.Lock()


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
    thread pool, threads = torch.get_num_threads() (so torch.set_num_threads / OMP_NUM_THREADS under
    torchrun apply). The kernels release the GIL; the calling thread takes part."""
    try:
        _run_pieces(kernel, n_items, *args)
    except Exception as exc:  # e.g. a numba compile error on an unusual CPU: say how to avoid it
        name = getattr(kernel, '__name__', 'kernel')
        raise RuntimeError(f'cpu selective-scan {name} failed: {type(exc).__name__}: {exc}. Use the portable '
                           f"backend instead: backend='torch' or MAMBACSR_SCAN_BACKEND=torch") from exc


def _run_pieces(kernel: Callable[..., None], n_items: int, *args: Any) -> None:
    global _POOL, _POOL_KEY
    threads = max(1, min(torch.get_num_threads(), n_items))
    if threads == 1:
        kernel(0, n_items, *args)
        return
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


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Detached, C-contiguous float32 (no copy when already so)."""
    return x.detach().to(torch.float32).contiguous()


def _pad_states(x: torch.Tensor, padded: int) -> torch.Tensor:
    """Float32, C-contiguous, last dim zero-padded to ``padded``."""
    if x.shape[-1] == padded:
        return _f32(x)
    out = torch.zeros(x.shape[:-1] + (padded,), dtype=torch.float32)
    out[..., :x.shape[-1]] = x.detach()
    return out


def _rows(x: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    return _f32(x).view(rows, length)


class _CpuScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                delta_bias: Optional[torch.Tensor], softplus: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        kernels = _kernels()
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        padded = -(-n_state // kernels.W) * kernels.W
        rows = batch * dim
        u2, delta2 = _rows(u, rows, length), _rows(delta, rows, length)
        z2 = _rows(z, rows, length) if z is not None else u2.new_zeros((1, 1))
        D1 = _f32(D) if D is not None else u2.new_zeros(dim)
        bias1 = _f32(delta_bias) if delta_bias is not None else u2.new_zeros(dim)
        Ap = _pad_states(A, padded)
        Bt = _pad_states(B.transpose(2, 3).reshape(batch * groups, length, n_state), padded)
        Ct = _pad_states(C.transpose(2, 3).reshape(batch * groups, length, n_state), padded)
        out = u2.new_empty((rows, length))
        last = u2.new_empty((rows, padded))
        ckpt = u2.new_empty((rows, max(1, math.ceil(length / CHUNK)), padded))
        row_blocks = batch * groups * math.ceil(dim // groups / kernels.R)  # see _cpu_kernels.block_rows
        _run(kernels.scan_forward, row_blocks, u2.numpy(), delta2.numpy(), Ap.numpy(), Bt.numpy(), Ct.numpy(),
             D1.numpy(), z2.numpy(), bias1.numpy(), bool(softplus), z is not None, dim, groups, CHUNK,
             out.numpy(), last.numpy(), ckpt.numpy())
        ctx.save_for_backward(u2, delta2, z2, Ap, Bt, Ct, D1, bias1, ckpt)
        ctx.meta = (batch, dim, length, groups, n_state, bool(softplus), z is not None)
        return out.view(batch, dim, length), last[:, :n_state].reshape(batch, dim, n_state)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor, dlast: torch.Tensor):
        kernels = _kernels()
        u2, delta2, z2, Ap, Bt, Ct, D1, bias1, ckpt = ctx.saved_tensors
        batch, dim, length, groups, n_state, softplus, has_z = ctx.meta
        rows, padded = u2.shape[0], Ap.shape[1]
        per_group = dim // groups
        blocks = max(1, min(per_group, math.ceil(BACKWARD_TASKS / (batch * groups))))
        dout2 = _rows(dout, rows, length)
        dlast2 = _pad_states(dlast.reshape(rows, n_state), padded)
        du = u2.new_empty((rows, length))
        ddelta = u2.new_empty((rows, length))
        dz = u2.new_empty((rows, length)) if has_z else u2.new_zeros((1, 1))
        dA_rows = u2.new_empty((rows, padded))
        dD_rows = u2.new_empty(rows)
        dbias_rows = u2.new_empty(rows)
        dB_part = u2.new_empty((batch * groups * blocks, length, padded))
        dC_part = u2.new_empty((batch * groups * blocks, length, padded))
        _run(kernels.scan_backward, batch * groups * blocks, u2.numpy(), delta2.numpy(), Ap.numpy(),
             Bt.numpy(), Ct.numpy(), D1.numpy(), z2.numpy(), bias1.numpy(), softplus, has_z, dim, groups,
             CHUNK, ckpt.numpy(), dout2.numpy(), dlast2.numpy(), blocks, du.numpy(), ddelta.numpy(),
             dz.numpy(), dA_rows.numpy(), dD_rows.numpy(), dbias_rows.numpy(), dB_part.numpy(),
             dC_part.numpy())
        need = ctx.needs_input_grad
        shape = (batch, dim, length)
        dA = dA_rows.view(batch, dim, padded).sum(0)[:, :n_state]
        dB = dC = None
        if need[3]:
            dB = dB_part.view(batch, groups, blocks, length, padded).sum(2)[..., :n_state].transpose(2, 3)
        if need[4]:
            dC = dC_part.view(batch, groups, blocks, length, padded).sum(2)[..., :n_state].transpose(2, 3)
        dD = dD_rows.view(batch, dim).sum(0) if need[5] else None
        dz_out = dz.view(shape) if (has_z and need[6]) else None
        dbias = dbias_rows.view(batch, dim).sum(0) if need[7] else None
        return du.view(shape), ddelta.view(shape), dA, dB, dC, dD, dz_out, dbias, None


def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
         delta_softplus: bool, return_last_state: bool):
    """Full fused selective scan on CPU tensors (shapes as in ``selective_scan``, B/C 4-D).

    Not empty (the dispatcher answers empty inputs). Returns (out float32 (batch, dim, L), last_state
    (batch, dim, N) or None)."""
    out, last = _CpuScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return out, (last if return_last_state else None)
