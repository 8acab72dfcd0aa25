"""Sequential reference selective scan (tests and benchmarks only; its backward stores every state).

The recurrence of ``mamba_ssm``'s ``selective_scan_ref``: exp(dt A) and dt B u are formed for all
steps at once as (batch, dim, L, N) tensors, then the state is advanced one step at a time.
"""
from __future__ import annotations

from typing import Optional, Tuple

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
