"""Sequential reference selective scan (tests, benchmarks and the backends' check scans; its backward
stores every state).

The recurrence of ``mamba_ssm``'s ``selective_scan_ref``: exp(dt A) and dt B u are formed for all
steps at once as (batch, dim, L, N) tensors, then the state is advanced one step at a time.
:func:`check_scan` compares a backend's forward and every gradient with it in float64: the GPU
backends (``mamba_ssm``, ``triton``) are chosen automatically only after passing it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


def scan_core(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              return_last_state: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = <C_t, h_t>.

    Shapes: u, dt (batch, dim, L); A (dim, N); B, C (batch, groups, N, L), dim % groups == 0,
    channel d reading group d // (dim / groups); one float dtype. Returns y (batch, dim, L) and the
    last state (batch, dim, N) (None unless ``return_last_state``).
    """
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    per_group = dim // groups
    decay = torch.exp(dt.unsqueeze(-1) * A[:, None, :])  # (batch, dim, L, N)
    Bg = B.transpose(2, 3).unsqueeze(2)  # (batch, groups, 1, L, N)
    drive = ((dt * u).view(batch, groups, per_group, length, 1) * Bg).view(batch, dim, length, n_state)
    Cd = C.transpose(2, 3).unsqueeze(2).expand(batch, groups, per_group, length, n_state)
    Cd = Cd.reshape(batch, dim, length, n_state)
    h = u.new_zeros((batch, dim, n_state))
    ys = []
    for t in range(length):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append((h * Cd[:, :, t]).sum(-1))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
    return y, (h if return_last_state else None)


def scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
         delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False
         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole selective scan (delta_bias, softplus, D, silu(z) gate around :func:`scan_core`) in the
    inputs' own dtype (float64 for a reference). B, C 4-D. Returns (out, last state)."""
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    y, last = scan_core(u, dt, A, B, C, True)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, last


CHECK_NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
CHECK_TOLERANCE = 2e-3  # largest |error| / largest |reference| allowed, per tensor


def check_inputs(length: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Small float32 CPU inputs of a check scan (batch 2, dim 4, N 3, 2 groups of B and C, D, z and
    delta_bias present) with a well-conditioned system: decays exp(dt A) around 0.9 per step."""
    g = torch.Generator().manual_seed(seed)
    batch, dim, n_state, groups = 2, 4, 3, 2
    return {
        'u': torch.randn(batch, dim, length, generator=g),
        'delta': torch.randn(batch, dim, length, generator=g) * 0.5 - 2.0,  # softplus(delta + bias) ~ 0.1
        'A': -(torch.rand(dim, n_state, generator=g) + 0.5),
        'B': torch.randn(batch, groups, n_state, length, generator=g),
        'C': torch.randn(batch, groups, n_state, length, generator=g),
        'D': torch.randn(dim, generator=g),
        'z': torch.randn(batch, dim, length, generator=g),
        'delta_bias': torch.rand(dim, generator=g) * 0.2,
    }


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    err = (got.detach().double().cpu() - expected).abs().max().item()
    return err / max(expected.abs().max().item(), 1e-12)


def check_scan(run: Callable[..., Any], device: torch.device, length: int) -> Optional[str]:
    """Run one selective scan of ``length`` steps on ``device`` through ``run`` and compare it with this
    module's float64 scan on the CPU; None if it agrees, else what differs (an error ``run`` raises
    propagates: the caller words it).

    ``run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)`` is a backend's
    full scan (D, z, delta_bias and softplus all on); it returns out or (out, last_state). Compared: out,
    the last state, and the gradient of every input (u, delta, A, B, C, D, z, delta_bias) of a random
    weighting of out, each to :data:`CHECK_TOLERANCE` of its largest reference value. Runs with grad
    enabled and autocast off whatever the caller's mode (the first scan may come from inference)."""
    with torch.inference_mode(False), torch.enable_grad(), autocast_off('cpu'), autocast_off(device.type):
        inputs = check_inputs(length)
        weight = torch.randn(inputs['u'].shape, generator=torch.Generator().manual_seed(1))
        ref_leaves = [inputs[k].double().requires_grad_() for k in CHECK_NAMES]
        ref_out, ref_last = scan(*ref_leaves[:5], D=ref_leaves[5], z=ref_leaves[6], delta_bias=ref_leaves[7],
                                 delta_softplus=True)
        ref_grads = torch.autograd.grad((ref_out * weight.double()).sum(), ref_leaves)
        leaves = [inputs[k].to(device).requires_grad_() for k in CHECK_NAMES]
        result = run(*leaves, True, True)
        out, last = result if isinstance(result, tuple) else (result, None)
        if tuple(out.shape) != tuple(ref_out.shape):
            return f'output shape {tuple(out.shape)}, expected {tuple(ref_out.shape)}'
        compared = [('output', out, ref_out)] + ([('last state', last, ref_last)] if last is not None else [])
        problem = _first_difference(compared, length)
        if problem is not None:
            return problem
        if not out.requires_grad:
            return 'output is not differentiable (no autograd graph)'
        grads = torch.autograd.grad((out.float() * weight.to(device)).sum(), leaves, allow_unused=True)
    compared = []
    for name, got, expected in zip(CHECK_NAMES, grads, ref_grads):
        if got is None:
            return f'no gradient for {name}'
        if tuple(got.shape) != tuple(expected.shape):
            return f'gradient of {name} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}'
        compared.append((f'gradient of {name}', got, expected))
    return _first_difference(compared, length)


def _first_difference(compared: List[Tuple[str, torch.Tensor, torch.Tensor]], length: int) -> Optional[str]:
    for name, got, expected in compared:
        rel = _relative_error(got, expected)
        if not rel <= CHECK_TOLERANCE:  # NaN fails too
            return (f'{name} differs from the float64 reference by {rel:.3g} of its largest value '
                    f'(allowed {CHECK_TOLERANCE:g}; length {length}, D, z, delta_bias, softplus)')
    return None


def autocast_off(device_type: str):
    """Context disabling autocast for ``device_type`` (a no-op where torch has no autocast for it)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to disable
        return contextlib.nullcontext()
