"""Portable pure-PyTorch selective scan: chunked, numerically stable, bounded memory.

Within a chunk of ``T`` steps the linear recurrence h_t = a_t h_{t-1} + b_t is solved with a
Hillis-Steele associative scan over pairs (a, b) -> (a2 a1, a2 b1 + b2). Only products of decays
a = exp(dt A) in [0, 1] are formed, never exp of a positive number, so any dt >= 0, A <= 0 is safe.
Chunks are chained through their carried state. Each chunk runs under activation checkpointing,
so autograd keeps only the chunk inputs and one (batch, dim, N) state per chunk, and recomputes
the (batch, dim, T, N) intermediates of one chunk at a time during backward.
Works on any device (CPU, CUDA without ``mamba_ssm``, MPS).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

CHUNK = 128  # time steps per chunk: log2(CHUNK) scan levels over (batch, dim, CHUNK, N) tensors


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim 2 of h_t = a_t h_{t-1} + b_t from h = 0.

    a, b: (batch, dim, T, N). Returns (prod_{s<=t} a_s, h_t), both (batch, dim, T, N).
    """
    length = a.shape[2]
    shift = 1
    while shift < length:
        a_prev = a[:, :, :-shift]
        b_prev = b[:, :, :-shift]
        a_tail = a[:, :, shift:]
        b = torch.cat([b[:, :, :shift], torch.addcmul(b[:, :, shift:], a_tail, b_prev)], dim=2)
        a = torch.cat([a[:, :, :shift], a_tail * a_prev], dim=2)
        shift *= 2
    return a, b


def _chunk(h0: torch.Tensor, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
           C: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One chunk. h0 (b, d, N); u, dt (b, d, T); A (d, N); B, C (b, g, N, T).

    Returns y (b, d, T) and the chunk's last state (b, d, N).
    """
    batch, dim, _ = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    dt4 = dt.unsqueeze(-1)  # (b, d, T, 1)
    a = torch.exp(dt4 * A[:, None, :])  # (b, d, T, N), in [0, 1] for dt >= 0, A <= 0
    Bg = B.transpose(2, 3).unsqueeze(2)  # (b, g, 1, T, N)
    bu = (dt * u).view(batch, groups, dim // groups, -1, 1) * Bg  # (b, g, d/g, T, N)
    a_cum, h = _linear_scan(a, bu.reshape(batch, dim, -1, n_state))
    h = torch.addcmul(h, a_cum, h0.unsqueeze(2))
    Cg = C.transpose(2, 3).unsqueeze(2)  # (b, g, 1, T, N)
    y = (h.view(batch, groups, dim // groups, -1, n_state) * Cg).sum(-1).reshape(batch, dim, -1)
    return y, h[:, :, -1]


def scan_core(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              return_last_state: bool = False,
              chunk: int = CHUNK) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as :func:`mambacsr_arch.ops.reference.scan_core` (float32 in, float32 out)."""
    batch, dim, length = u.shape
    h = u.new_zeros((batch, dim, A.shape[1]))
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (u, dt, A, B, C))
    ys = []
    for start in range(0, length, chunk):
        sl = slice(start, min(start + chunk, length))
        args = (h, u[:, :, sl], dt[:, :, sl], A, B[..., sl], C[..., sl])
        if need_grad:
            y, h = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            y, h = _chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=2) if ys else u.new_zeros(u.shape)
    return y, (h if return_last_state else None)
