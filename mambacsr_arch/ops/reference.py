"""Sequential reference selective scan (tests and benchmarks only; slow, memory-hungry backward).

The plain recurrence of ``mamba_ssm``'s ``selective_scan_ref``, one time step at a time, with
autograd through every step (so its backward stores all (batch, dim, L, N) states).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def scan_core(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              return_last_state: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = <C_t, h_t>.

    Shapes: u, dt (batch, dim, L); A (dim, N); B, C (batch, groups, N, L), dim % groups == 0;
    all float tensors of one dtype. Returns y (batch, dim, L) and the last state (batch, dim, N)
    (None unless ``return_last_state``).
    """
    batch, dim, length = u.shape
    groups = B.shape[1]
    Bd = B.repeat_interleave(dim // groups, dim=1)  # (batch, dim, N, L)
    Cd = C.repeat_interleave(dim // groups, dim=1)
    h = u.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]
        h = torch.exp(dt_t * A) * h + dt_t * Bd[..., t] * u[:, :, t, None]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
    return y, (h if return_last_state else None)
