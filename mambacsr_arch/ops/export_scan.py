"""Selective scan as a small, size-independent graph of plain tensor ops: the ``export`` backend.

Meant for graph exporters (``torch.onnx.export``, ``torch.export``): no Python loop over the
sequence, no data-dependent control flow, and nothing that needs the sequence length as a Python
int, so the length may be a symbolic size (``basicsr export --dynamic``). Also correct (and
differentiable) in eager PyTorch, where the ``cpu`` / ``torch`` backends are faster.

The recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A) in [0, 1], b_t = dt_t B_t u_t) is solved
in two levels over chunks of :data:`CHUNK` steps (the sequence zero-padded to a multiple of it;
padded steps have dt = 0, i.e. a = 1, b = 0, and change no state):

1. every chunk, all at once, runs its CHUNK steps from a zero state (the steps unrolled: CHUNK small
   ops on (chunks, batch, dim, N) tensors) and keeps its end state and the product of its decays;
2. the chunk boundary states are the same recurrence over chunks (one step per chunk), solved by a
   Hillis-Steele scan whose shifted operands are padded slices of the same length: ceil(log2 chunks)
   levels for a plain-int length, :data:`MAX_LEVELS` (a no-op past the length) for a symbolic one;
3. every chunk runs its CHUNK steps again from its true start state and emits y_t = <C_t, h_t>.

Only products of decays in [0, 1] are formed (no exp of a positive number, no cumulative log-space
sums), so it is as stable as the sequential loop. The graph has O(CHUNK + MAX_LEVELS) ops whatever
the length. ``benchmarks/bench_export.py`` compares it with the ``torch`` backend's Hillis-Steele form.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

CHUNK = 32  # steps per chunk (unrolled twice in the graph): 16 ran 4.5x eager, 32 1.2x (benchmarks/bench_export.py)
MAX_LEVELS = 24  # Hillis-Steele levels over the chunks for a symbolic length: up to CHUNK * 2 ** 24 steps


def _pad_steps(x: torch.Tensor, before: int, after, value: float) -> torch.Tensor:
    """Pad dim 0 of ``x`` (steps first) with ``value``: ``before`` entries in front, ``after`` behind."""
    return F.pad(x, (0, 0) * (x.dim() - 1) + (before, after), value=value)


def _chunk_states(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive states H_c = a_c H_{c-1} + b_c (H_{-1} = 0) along dim 0 of (n, ...) ``a``, ``b``: a
    Hillis-Steele scan whose shifted operands are padded views of the same length (so a symbolic n
    creates no new size expressions); ceil(log2 n) levels, :data:`MAX_LEVELS` if n is symbolic."""
    n = a.shape[0]
    levels = MAX_LEVELS if not isinstance(n, int) else max(0, (n - 1).bit_length())
    for level in range(levels):
        shift = 1 << level
        keep = n - shift if isinstance(n, int) else torch.sym_max(n - shift, 0)  # entries with a predecessor
        b = torch.addcmul(b, a, _pad_steps(b[:keep], n - keep, 0, 0.))
        if level + 1 < levels:
            a = a * _pad_steps(a[:keep], n - keep, 0, 1.)
    return b


def scan_core(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              return_last_state: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as :func:`mambacsr_arch.ops.reference.scan_core`.

    u, dt (b, d, L) float32; A (d, N); B, C (b, g, N, L). Returns y (b, d, L) and, if asked, the last
    state (b, d, N).
    """
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    per_group = dim // groups
    pad = (-length) % CHUNK
    dt_t = _pad_steps(dt.permute(2, 0, 1), 0, pad, 0.)  # (L', b, d), steps first
    u_t = _pad_steps(u.permute(2, 0, 1), 0, pad, 0.)
    B_t = _pad_steps(B.permute(3, 0, 1, 2), 0, pad, 0.)  # (L', b, g, N)
    C_t = _pad_steps(C.permute(3, 0, 1, 2), 0, pad, 0.)
    # chunked: (chunks, CHUNK, b, g, d/g, N) decays and drives
    a = torch.exp(dt_t.unsqueeze(-1) * A).unflatten(2, (groups, per_group))  # in [0, 1]
    drive = (dt_t * u_t).unflatten(2, (groups, per_group)).unsqueeze(-1) * B_t.unsqueeze(3)
    a, drive = a.unflatten(0, (-1, CHUNK)), drive.unflatten(0, (-1, CHUNK))
    # 1. each chunk from a zero state: its end state and the product of its decays
    h, p = drive[:, 0], a[:, 0]
    for t in range(1, CHUNK):
        h = torch.addcmul(drive[:, t], a[:, t], h)
        p = p * a[:, t]
    # 2. the states at the chunk boundaries; 3. each chunk again from its true start state
    state = _pad_steps(_chunk_states(p, h), 1, 0, 0.)[:h.shape[0]]  # state entering each chunk
    C_c = C_t.unflatten(0, (-1, CHUNK)).unsqueeze(4)  # (chunks, CHUNK, b, g, 1, N)
    ys = []
    for t in range(CHUNK):
        state = torch.addcmul(drive[:, t], a[:, t], state)
        ys.append((state * C_c[:, t]).sum(-1))  # (chunks, b, g, d/g)
    y = torch.stack(ys, 1).flatten(0, 1)[:length]  # (L, b, g, d/g)
    y = y.reshape(length, batch, dim).permute(1, 2, 0)
    last = state[-1].reshape(batch, dim, n_state) if return_last_state else None
    return y, last
