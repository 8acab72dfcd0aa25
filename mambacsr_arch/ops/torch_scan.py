"""Portable pure-PyTorch selective scan: chunked, numerically stable, bounded memory.

The sequence is cut into chunks; each chunk maps (carried state, chunk inputs) to (chunk outputs,
state) and runs under activation checkpointing, so autograd keeps only the chunk inputs and one
(batch, dim, N) state per chunk and recomputes one chunk's (batch, dim, T, N) intermediates at a
time during backward. Within a chunk the recurrence h_t = a_t h_{t-1} + b_t, a_t = exp(dt_t A), is
solved by one of two strategies, both forming only products of decays in [0, 1] (never exp of a
positive number), so any dt >= 0, A <= 0 is safe:

* ``'loop'`` (CPU default): a step loop over contiguous (batch, dim, N) slices; cheapest in
  arithmetic, one small op per step.
* ``'parallel'`` (other devices): a Hillis-Steele scan over pairs (a, b) -> (a2 a1, a2 b1 + b2),
  log2(T) levels of large ops, few kernel launches.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

CHUNK = {'loop': 64, 'parallel': 128}  # time steps per checkpointed chunk
STRATEGIES = ('loop', 'parallel')
DEFAULT_STRATEGY: Optional[str] = None  # None: 'loop' for CPU tensors, 'parallel' otherwise


def _parallel_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states of h_t = a_t h_{t-1} + b_t along dim 0. a, b: (T, batch, dim, N); h0 (batch, dim, N)."""
    length = a.shape[0]
    shift = 1
    while shift < length:
        a_tail = a[shift:]
        b = torch.cat([b[:shift], torch.addcmul(b[shift:], a_tail, b[:-shift])])
        a = torch.cat([a[:shift], a_tail * a[:-shift]])
        shift *= 2
    return torch.addcmul(b, a, h0)


def _loop_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Same as :func:`_parallel_scan`, one step at a time."""
    h = h0
    states = []
    for t in range(a.shape[0]):
        h = torch.addcmul(b[t], a[t], h)
        states.append(h)
    return torch.stack(states)


def _chunk(h0: torch.Tensor, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
           C: torch.Tensor, parallel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One chunk. h0 (b, d, N); u, dt (b, d, T); A (d, N); B, C (b, g, N, T).

    Returns y (b, d, T) and the chunk's last state (b, d, N).
    """
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    per_group = dim // groups
    dt_t = dt.permute(2, 0, 1)  # (T, b, d)
    a = torch.exp(dt_t.unsqueeze(-1) * A)  # (T, b, d, N), in [0, 1] for dt >= 0, A <= 0
    Bt = B.permute(3, 0, 1, 2).unsqueeze(3)  # (T, b, g, 1, N)
    drive = ((dt_t * u.permute(2, 0, 1)).reshape(length, batch, groups, per_group, 1) * Bt)
    drive = drive.reshape(length, batch, dim, n_state)
    h = (_parallel_scan if parallel else _loop_scan)(a, drive, h0)  # (T, b, d, N)
    Ct = C.permute(3, 0, 1, 2).unsqueeze(3)  # (T, b, g, 1, N)
    y = (h.view(length, batch, groups, per_group, n_state) * Ct).sum(-1)  # (T, b, g, d/g)
    # clone: a view h[-1] would keep this chunk's (T, b, d, N) states alive as the next chunk's input
    return y.reshape(length, batch, dim).permute(1, 2, 0), h[-1].clone()


def scan_core(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              return_last_state: bool = False,
              strategy: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as :func:`mambacsr_arch.ops.reference.scan_core`.

    ``strategy``: 'loop' or 'parallel'; default :data:`DEFAULT_STRATEGY`, else 'loop' for CPU tensors
    and 'parallel' otherwise.
    """
    strategy = strategy or DEFAULT_STRATEGY
    if strategy is None:
        strategy = 'loop' if u.device.type == 'cpu' else 'parallel'
    if strategy not in STRATEGIES:
        raise ValueError(f"torch_scan strategy must be one of {STRATEGIES}, got '{strategy}'")
    chunk = CHUNK[strategy]
    batch, dim, length = u.shape
    h = u.new_zeros((batch, dim, A.shape[1]))
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, dt, A, B, C))
    ys = []
    for start in range(0, length, chunk):
        sl = slice(start, min(start + chunk, length))
        args = (h, u[:, :, sl], dt[:, :, sl], A, B[..., sl], C[..., sl], strategy == 'parallel')
        if need_grad:
            y, h = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            y, h = _chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=2) if ys else u.new_zeros(u.shape)
    return y, (h if return_last_state else None)
