"""Adapter for ``mamba_ssm``'s CUDA selective-scan kernel, imported lazily (never at package import)."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch

MODULE = 'mamba_ssm.ops.selective_scan_interface'
INSTALL_HINT = "install with pip install 'mambacsr-arch[cuda]'"


def load() -> Callable[..., Any]:
    """Return ``selective_scan_fn``; raises ImportError (with the install hint) if unavailable."""
    try:
        module = importlib.import_module(MODULE)
        fn = getattr(module, 'selective_scan_fn', None)
    except Exception as exc:  # a broken CUDA extension raises OSError/RuntimeError, not just ImportError
        raise ImportError(f'mamba_ssm not importable: {type(exc).__name__}: {exc}; {INSTALL_HINT}') from exc
    if fn is None:
        raise ImportError(f'{MODULE} has no selective_scan_fn (unsupported mamba_ssm version); {INSTALL_HINT}')
    return fn


def unavailable_reason() -> Optional[str]:
    """None if ``mamba_ssm``'s kernel imports, else why not."""
    try:
        load()
    except ImportError as exc:
        return str(exc)
    return None


def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
         delta_softplus: bool, return_last_state: bool) -> Any:
    """Full selective scan on CUDA. Every tensor is passed in float32 (the kernel requires delta,
    B, C, z in u's dtype and A, D, delta_bias in float32; float32 everywhere keeps the math exact);
    the output is cast back to u's dtype by the caller."""
    fn = load()
    f32 = (lambda t: None if t is None else t.float())
    return fn(u.float(), delta.float(), A.float(), B.float(), C.float(), D=f32(D), z=f32(z),
              delta_bias=f32(delta_bias), delta_softplus=delta_softplus,
              return_last_state=return_last_state)
