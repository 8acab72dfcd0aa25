"""``triton`` backend: fused chunked-scan Triton kernels (see :mod:`._triton_kernels`) behind an autograd Function.

Runs on CUDA tensors with nothing to compile by hand: Triton ships with every CUDA build of PyTorch
and compiles the kernels on first use (cached in ``~/.triton``). Under ``TRITON_INTERPRET=1`` it
runs on CPU tensors through Triton's interpreter (slowly): that is how CI tests it without a GPU.

Saved for backward: u, delta, z (batch, dim, L), B, C (batch, groups, N, L), all float32, and one
state per chunk of ``CHUNK`` steps (batch, dim, L / CHUNK, NP) -- never the (batch, dim, L, N)
states; backward recomputes one chunk at a time from those checkpoints.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

CHUNK = 64  # steps per chunk (parallel scan within, state carried across; checkpoint per chunk)
CHECK_LENGTH = 2 * CHUNK + 5  # the check scan crosses two chunk boundaries and ends in a partial chunk
MAX_TILE = 4096  # BLOCK_D * CHUNK * NP elements per program; BLOCK_D (channels per program) follows
NUM_WARPS = 4
INTERPRET_ENV = 'TRITON_INTERPRET'
INSTALL_HINT = 'install a CUDA build of PyTorch (it ships triton) or pip install triton'
_KERNELS: Optional[ModuleType] = None
_KERNELS_INTERPRETED: Optional[bool] = None
_KERNEL_MODULE = 'mambacsr_arch.ops._triton_kernels'


def interpreting() -> bool:
    """True if ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get(INTERPRET_ENV, '').strip().lower() in ('1', 'true', 'on', 'yes')


def devices() -> Tuple[str, ...]:
    """Device types the backend runs on: CUDA, plus CPU under ``TRITON_INTERPRET=1``."""
    return ('cuda', 'cpu') if interpreting() else ('cuda',)


def _patch_interpreter_scan() -> None:
    """Make the interpreter's ``tl.associative_scan`` log-depth and vectorised.

    Triton's interpreter runs a user combine function once per element in Python (~100 us each:
    minutes for one small scan). This replaces it by a Hillis-Steele scan that calls the same
    combine function on whole shifted arrays (log2(length) calls), with the same left-to-right
    order of operands, so results differ only by float rounding, as on a GPU. Applied only when
    interpreting; left alone (slow but correct) if this triton's interpreter looks different. Triton's
    own method stays reachable as ``ScanOps.triton_generic_scan`` (tests compare the two).
    """
    interp = sys.modules.get('triton.runtime.interpreter') or importlib.import_module('triton.runtime.interpreter')
    ops = getattr(interp, 'ScanOps', None)
    if ops is None or not hasattr(ops, 'generic_scan') or not hasattr(ops, 'to_tensor') \
            or getattr(ops, '_mambacsr_vectorised', False):
        return
    import numpy as np

    def generic_scan(self, inputs):
        axis = self.axis
        data = [arg.handle.data for arg in inputs]
        size = data[0].shape[axis]
        shift = 1
        keep = np.arange(size).reshape([-1 if k == axis else 1 for k in range(data[0].ndim)])
        while shift < size:
            # left operand of step i is element i - shift (any element for i < shift: discarded), so the
            # operands keep the block's power-of-two shape
            earlier = np.concatenate([np.arange(shift), np.arange(size - shift)])
            left = tuple(self.to_tensor(np.take(x, earlier, axis=axis), arg.dtype) for x, arg in zip(data, inputs))
            right = tuple(self.to_tensor(x, arg.dtype) for x, arg in zip(data, inputs))
            combined = self.combine_fn.fn(*left, *right)
            combined = combined if isinstance(combined, tuple) else (combined, )
            data = [np.where(keep >= shift, value.handle.data, x) for x, value in zip(data, combined)]
            shift *= 2
        return [self.to_tensor(x, arg.dtype) for x, arg in zip(data, inputs)]

    ops.triton_generic_scan = ops.generic_scan
    ops.generic_scan = generic_scan
    ops._mambacsr_vectorised = True


def _check_interpreter_mode() -> None:
    """Raise if triton itself was imported before ``TRITON_INTERPRET`` was set: its own library functions
    (``tl.zeros``, ``tl.sum``, ...) are then compiled-mode and cannot run in the interpreter."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.zeros, InterpretedFunction):
        raise ImportError(f'{INTERPRET_ENV}=1 was set after triton had been imported in this process (triton reads '
                          f'it at import; importing torch._dynamo imports triton); set {INTERPRET_ENV}=1 in the '
                          'environment before starting Python')


def _kernels() -> ModuleType:
    """Import the Triton kernels (raises ImportError with the install hint if triton is missing).

    ``triton.jit`` decides at definition time whether a kernel is interpreted, so the module is
    re-imported when ``TRITON_INTERPRET`` changed since it was last imported."""
    global _KERNELS, _KERNELS_INTERPRETED
    mode = interpreting()
    if _KERNELS is None or _KERNELS_INTERPRETED != mode:
        try:
            import triton  # noqa: F401  (the install hint below if this fails)
        except Exception as exc:  # a broken triton install raises more than ImportError
            raise ImportError(f'triton not importable: {type(exc).__name__}: {exc}; {INSTALL_HINT}') from exc
        if mode:
            _check_interpreter_mode()
            _patch_interpreter_scan()
        try:
            module = sys.modules.get(_KERNEL_MODULE)
            _KERNELS = importlib.reload(module) if module is not None else importlib.import_module(_KERNEL_MODULE)
        except Exception as exc:  # e.g. a triton too old for the kernels' language features
            raise ImportError(f'triton kernels do not load: {type(exc).__name__}: {exc}; {INSTALL_HINT}') from exc
        _KERNELS_INTERPRETED = mode
    return _KERNELS


def unavailable_reason() -> Optional[str]:
    """None if the Triton kernels load and have a device to run on (CUDA, or CPU when interpreting),
    else why not. Whether they compute the right thing on the GPU is :func:`check`'s question."""
    try:
        _kernels()
    except ImportError as exc:
        return str(exc)
    if not interpreting() and not torch.cuda.is_available():
        return ('no CUDA GPU visible (torch.cuda.is_available() is False); the triton backend needs CUDA '
                f'tensors ({INTERPRET_ENV}=1 runs it on CPU tensors, slowly, for tests)')
    return None


def check(device: torch.device, length: Optional[int] = None) -> Optional[str]:
    """None if a scan of ``length`` steps (default :data:`CHECK_LENGTH`: three chunks, the last partial)
    on ``device`` matches the float64 reference in its output, last state and every gradient
    (:func:`reference.check_scan`), else why not: compile errors, a GPU too old for this triton, wrong
    results."""
    from . import reference
    try:
        problem = reference.check_scan(scan, device, CHECK_LENGTH if length is None else length)
    except Exception as exc:  # noqa: BLE001 - reported as the reason the backend is skipped
        return (f'its check scan on {device} failed ({type(exc).__name__}: {str(exc)[:300]}); use '
                "backend='torch' (or install mamba_ssm)")
    if problem is not None:
        return f"its check scan on {device} is wrong: {problem}; use backend='torch' (or install mamba_ssm)"
    return None


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous()


def _pow2(x: int) -> int:
    return 1 << max(1, (int(x) - 1).bit_length())  # >= 2


def _tiling(dim: int, groups: int, length: int, n_state: int) -> Tuple[int, int, int, int]:
    """(BLOCK_D, CHUNK, NP, n_chunks) for a call."""
    padded = _pow2(n_state)
    chunk = min(CHUNK, _pow2(length))
    block_d = max(2, min(_pow2(dim // groups), MAX_TILE // (chunk * padded)))
    return block_d, chunk, padded, -(-length // chunk)


class _TritonScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, flags: Tuple[bool, bool, bool, bool], tiling: Tuple[int, int, int, int],
                *tensors: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """flags: (has D, has z, has delta_bias, softplus); tiling: :func:`_tiling`'s; tensors: u, delta,
        A, B, C, D, z, delta_bias (absent ones None)."""
        has_d, has_z, has_bias, softplus = flags
        block_d, chunk, padded, n_chunks = tiling
        u32, delta32, A32, B32, C32 = (_f32(t) for t in tensors[:5])
        # absent D, z, delta_bias: placeholders that the kernels never read (HAS_* flags)
        D32, z32, bias32 = (_f32(t) if t is not None else A32 for t in tensors[5:])
        batch, dim, length = u32.shape
        groups, n_state = B32.shape[1], A32.shape[1]
        out = torch.empty_like(u32)
        last = u32.new_empty((batch, dim, n_state))
        ckpt = u32.new_empty((batch, dim, n_chunks, padded))
        grid = (batch * groups, -(-(dim // groups) // block_d))
        _kernels().scan_fwd_kernel[grid](
            u32, delta32, A32, B32, C32, D32, z32, bias32, out, last, ckpt, dim, groups, length, n_state,
            n_chunks, HAS_D=has_d, HAS_Z=has_z, HAS_BIAS=has_bias, SOFTPLUS=softplus, BLOCK_D=block_d,
            CHUNK=chunk, NP=padded, num_warps=NUM_WARPS)
        ctx.save_for_backward(u32, delta32, A32, B32, C32, D32, z32, bias32, ckpt)
        ctx.flags, ctx.tiling = flags, tiling
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor, dlast: torch.Tensor):
        u32, delta32, A32, B32, C32, D32, z32, bias32, ckpt = ctx.saved_tensors
        has_d, has_z, has_bias, softplus = ctx.flags
        block_d, chunk, padded, n_chunks = ctx.tiling
        batch, dim, length = u32.shape
        groups, n_state = B32.shape[1], A32.shape[1]
        dout32 = _f32(dout)
        dlast32 = _f32(dlast) if dlast is not None else u32.new_zeros((batch, dim, n_state))
        du, ddelta = torch.empty_like(u32), torch.empty_like(u32)
        dz = torch.empty_like(u32) if has_z else u32
        dA_rows = u32.new_empty((batch, dim, n_state))
        dD_rows, dbias_rows = u32.new_empty((batch, dim)), u32.new_empty((batch, dim))
        dB, dC = torch.zeros_like(B32), torch.zeros_like(C32)
        grid = (batch * groups, -(-(dim // groups) // block_d))
        _kernels().scan_bwd_kernel[grid](
            u32, delta32, A32, B32, C32, D32, z32, bias32, ckpt, dout32, dlast32,
            du, ddelta, dz, dA_rows, dD_rows, dbias_rows, dB, dC, dim, groups, length, n_state, n_chunks,
            HAS_D=has_d, HAS_Z=has_z, HAS_BIAS=has_bias, SOFTPLUS=softplus, BLOCK_D=block_d, CHUNK=chunk,
            NP=padded, num_warps=NUM_WARPS)
        need = ctx.needs_input_grad[2:]
        return (None, None, du, ddelta, dA_rows.sum(0), dB if need[3] else None, dC if need[4] else None,
                dD_rows.sum(0) if (has_d and need[5]) else None, dz if (has_z and need[6]) else None,
                dbias_rows.sum(0) if (has_bias and need[7]) else None)

def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
         delta_softplus: bool, return_last_state: bool):
    """Full fused selective scan (shapes as in ``selective_scan``, B/C 4-D) on CUDA tensors, or on CPU
    tensors under ``TRITON_INTERPRET=1``; not empty (the dispatcher answers empty inputs). Returns (out
    float32 (batch, dim, L), last_state or None)."""
    if u.device.type == 'cpu' and not interpreting():
        raise RuntimeError(f"selective-scan backend 'triton' needs CUDA tensors, got cpu; set {INTERPRET_ENV}=1 "
                           "to run it on CPU through Triton's interpreter (slow; for tests), or use backend 'cpu'")
    flags = (D is not None, z is not None, delta_bias is not None, bool(delta_softplus))
    tiling = _tiling(u.shape[1], B.shape[1], u.shape[2], A.shape[1])
    out, last = _TritonScan.apply(flags, tiling, u, delta, A, B, C, D, z, delta_bias)
    return out, (last if return_last_state else None)
