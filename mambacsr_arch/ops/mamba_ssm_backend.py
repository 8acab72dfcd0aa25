"""Adapter for ``mamba_ssm``'s CUDA selective-scan kernel, imported lazily (never at package import).

Importing ``mamba_ssm`` is not enough to use it: newer builds import without their compiled extension
``selective_scan_cuda`` (the interface module then holds ``selective_scan_cuda = None`` and every call
raises), and a build for another GPU architecture or CUDA runtime fails only when it runs. So
:func:`unavailable_reason` checks the import and the extension's presence, and :func:`check` runs one
small scan on the GPU against the float64 reference, forward and every gradient; the dispatcher
chooses this backend only after both pass (once per process).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch

from . import reference

MODULE = 'mamba_ssm.ops.selective_scan_interface'
INSTALL_HINT = 'install with pip install --no-build-isolation mamba-ssm (the [cuda] extra)'
# mamba_ssm's setup.py downloads a prebuilt wheel unless MAMBA_FORCE_BUILD=TRUE; building needs nvcc
REBUILD_HINT = ('reinstall mamba-ssm so that it builds its CUDA extension (selective_scan_cuda): '
                'MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-cache-dir --force-reinstall '
                "mamba-ssm (needs nvcc), or use backend='triton'")
KERNEL_CHUNK = 2048  # steps per chunk of mamba_ssm's forward kernel (128 threads x 16 items)
CHECK_LENGTH = 2 * KERNEL_CHUNK + 37  # the check scan crosses two chunk boundaries and ends in a partial one


def load() -> Callable[..., Any]:
    """Return ``selective_scan_fn``; raises ImportError (with the fix) if it is missing or its compiled
    extension is."""
    try:
        module = importlib.import_module(MODULE)
        fn = getattr(module, 'selective_scan_fn', None)
    except Exception as exc:  # a broken CUDA extension raises OSError/RuntimeError, not just ImportError
        raise ImportError(f'mamba_ssm not importable: {type(exc).__name__}: {exc}; {INSTALL_HINT}') from exc
    if fn is None:
        raise ImportError(f'{MODULE} has no selective_scan_fn (unsupported mamba_ssm version); {INSTALL_HINT}')
    if 'selective_scan_cuda' in vars(module) and module.selective_scan_cuda is None:
        raise ImportError(f'mamba_ssm imports but its CUDA extension selective_scan_cuda is not installed; '
                          f'{REBUILD_HINT}')
    return fn


def unavailable_reason() -> Optional[str]:
    """None if ``mamba_ssm``'s kernel imports with its extension, else why not (device independent)."""
    try:
        load()
    except ImportError as exc:
        return str(exc)
    return None


def check(device: torch.device, length: Optional[int] = None) -> Optional[str]:
    """None if a scan of ``length`` (default :data:`CHECK_LENGTH`) steps on ``device`` matches the
    float64 reference in its output and every gradient (:func:`reference.check_scan`), else why not,
    with the reinstall command when the compiled extension is what is missing."""
    try:
        problem = reference.check_scan(scan, device, CHECK_LENGTH if length is None else length)
    except Exception as exc:  # a missing or mismatched extension raises on the first call
        text = f'{type(exc).__name__}: {str(exc)[:300]}'
        if 'selective_scan_cuda' in str(exc):
            return f'its check scan on {device} failed ({text}); {REBUILD_HINT}'
        return f"its check scan on {device} failed ({text}); use backend='triton' or 'torch'"
    if problem is not None:
        return f"its check scan on {device} is wrong: {problem}; use backend='triton' or 'torch'"
    return None


def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
         delta_softplus: bool, return_last_state: bool) -> Any:
    """Full selective scan on CUDA. Every tensor is passed in float32 (the kernel requires delta,
    B, C, z in u's dtype and A, D, delta_bias in float32; float32 everywhere keeps the math exact);
    the output is cast back to u's dtype by the caller."""
    fn = load()

    def f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.float()

    return fn(u.float(), delta.float(), A.float(), B.float(), C.float(), D=f32(D), z=f32(z),
              delta_bias=f32(delta_bias), delta_softplus=delta_softplus,
              return_last_state=return_last_state)
