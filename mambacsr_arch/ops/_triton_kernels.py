"""Triton kernels of the ``triton`` selective-scan backend (imported only when triton is present).

One program per (batch, group, block of ``BLOCK_D`` channels of that group). It walks the sequence
in chunks of ``CHUNK`` steps; a chunk is a (BLOCK_D, CHUNK, NP) tile (NP = N padded to a power of
two; padded states have A = 0, B = C = 0 and stay exactly 0). Within a chunk the recurrence
h_t = a_t h_{t-1} + x_t, a_t = exp(dt_t A) in [0, 1], x_t = dt_t u_t B_t, is a parallel
``tl.associative_scan`` over pairs (a, x) -> (a1 a2, a2 x1 + x2); the state is carried from chunk
to chunk sequentially. Only products of decays in [0, 1] are formed, never exp of a positive
number, so any dt >= 0, A <= 0 is safe.

Forward writes out, the last state and the state at the start of every chunk (``ckpt``). Backward
walks the chunks in reverse: it recomputes the chunk's states from its checkpoint, then solves
the adjoint recurrence g_t = a_{t+1} g_{t+1} + dy_t C_t with a reverse associative scan, carrying
a_{t0} g_{t0} to the previous chunk. a_t h_{t-1} is taken as h_t - x_t (no shifted tile needed).
dB and dC are summed over the program's channels in registers and added to the (batch, groups,
N, L) outputs with ``tl.atomic_add`` (float order across programs is not fixed: results may differ
in the last bits from run to run, as with ``mamba_ssm``); every other gradient has one writer.
All math is float32; the kernels use only long-stable ``tl`` APIs (triton >= 3.0).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine(a1, x1, a2, x2):
    """(a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), log1p by Goldberg's exact-rounding trick."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _load_dt(delta_ptr, offs, mask, bias, SOFTPLUS: tl.constexpr):
    """(pre-activation s = delta + bias, dt = softplus?(s)); dt is 0 where ``mask`` is off, so a
    masked step is the identity (a = 1, x = 0)."""
    s = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[:, None]
    dt = _softplus(s) if SOFTPLUS else s
    return s, tl.where(mask, dt, 0.0)


@triton.jit
def _load_channels(ptr, d, d_mask, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (dim,) vector at channels ``d`` as float32, zeros if the argument is absent."""
    if PRESENT:
        v = tl.load(ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros((BLOCK_D,), tl.float32)
    return v


@triton.jit
def _program(A_ptr, D_ptr, bias_ptr, dim, groups, n_state, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_D: tl.constexpr, NP: tl.constexpr):
    """This program's channels: (channel mask, rows b * dim + d, states n, state mask, (d, n) mask,
    A (BLOCK_D, NP), delta_bias, D (BLOCK_D,)). Program (b * groups + g, k) owns channels
    g * dim / groups + k * BLOCK_D + [0, BLOCK_D) of batch b."""
    pid_bg = tl.program_id(0)
    g = pid_bg % groups
    per_group = dim // groups
    d_loc = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_loc < per_group
    d = g * per_group + d_loc
    row = (pid_bg // groups) * dim + d
    n = tl.arange(0, NP)
    n_mask = n < n_state
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d[:, None] * n_state + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    bias = _load_channels(bias_ptr, d, d_mask, HAS_BIAS, BLOCK_D)
    Dv = _load_channels(D_ptr, d, d_mask, HAS_D, BLOCK_D)
    return d_mask, row, n, n_mask, dn_mask, A, bias, Dv


@triton.jit
def _chunk(u_ptr, delta_ptr, B_ptr, C_ptr, h0, c, row, d_mask, n, n_mask, A, bias, length, n_state,
           SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr):
    """Load chunk ``c`` and scan it from state h0 (BLOCK_D, NP). Returns (step mask (BLOCK_D, CHUNK),
    offsets into (batch, dim, L), (CHUNK, NP) mask and offsets into B/C, u, s = delta + bias, dt,
    B, C (CHUNK, NP), a = exp(dt A), x = dt u B and the states h (BLOCK_D, CHUNK, NP))."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    t_mask = t < length
    m2 = d_mask[:, None] & t_mask[None, :]
    offs = row[:, None] * length + t[None, :]
    u = tl.load(u_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    s, dt = _load_dt(delta_ptr, offs, m2, bias, SOFTPLUS)
    tn_mask = t_mask[:, None] & n_mask[None, :]
    bc_offs = tl.program_id(0) * n_state * length + n[None, :] * length + t[:, None]  # (CHUNK, NP) in B, C
    Bt = tl.load(B_ptr + bc_offs, mask=tn_mask, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc_offs, mask=tn_mask, other=0.0).to(tl.float32)
    a = tl.exp(dt[:, :, None] * A[:, None, :])  # (BLOCK_D, CHUNK, NP), in [0, 1]
    x = (dt * u)[:, :, None] * Bt[None, :, :]
    a_cum, x_cum = tl.associative_scan((a, x), axis=1, combine_fn=_combine)
    hs = a_cum * h0[:, None, :] + x_cum
    return m2, offs, tn_mask, bc_offs, u, s, dt, Bt, Ct, a, x, hs


@triton.jit
def scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                    out_ptr, last_ptr, ckpt_ptr,
                    dim, groups, length, n_state, n_chunks,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, NP: tl.constexpr):
    """u, delta, z, out: (batch, dim, L); A: (dim, N); B, C: (batch, groups, N, L); D, bias: (dim,);
    last: (batch, dim, N); ckpt: (batch, dim, n_chunks, NP). All float32, contiguous.
    Grid: (batch * groups, cdiv(dim / groups, BLOCK_D))."""
    d_mask, row, n, n_mask, dn_mask, A, bias, Dv = _program(A_ptr, D_ptr, bias_ptr, dim, groups, n_state, HAS_D,
                                                            HAS_BIAS, BLOCK_D, NP)
    j = tl.arange(0, CHUNK)
    h = tl.zeros((BLOCK_D, NP), tl.float32)
    for c in range(n_chunks):
        tl.store(ckpt_ptr + (row[:, None] * n_chunks + c) * NP + n[None, :], h, mask=d_mask[:, None])
        m2, offs, tn_mask, bc_offs, u, s, dt, Bt, Ct, a, x, hs = _chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, h, c, row, d_mask, n, n_mask, A, bias, length, n_state,
            SOFTPLUS, CHUNK)
        y = tl.sum(hs * Ct[None, :, :], axis=2)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            y = y * zv * _sigmoid(zv)
        tl.store(out_ptr + offs, y, mask=m2)
        # masked steps are identities, so the tile's last step holds the chunk's last state
        h = tl.sum(tl.where((j == CHUNK - 1)[None, :, None], hs, 0.0), axis=1)
    tl.store(last_ptr + row[:, None] * n_state + n[None, :], h, mask=dn_mask)


@triton.jit
def scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr,
                    dout_ptr, dlast_ptr,
                    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
                    dim, groups, length, n_state, n_chunks,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, NP: tl.constexpr):
    """Inputs as in :func:`scan_fwd_kernel` plus ckpt, dout (batch, dim, L), dlast (batch, dim, N).
    Writes du, ddelta, dz (batch, dim, L); per-row dA (batch, dim, N), dD, dbias (batch, dim) (the
    caller sums over batch); adds into dB, dC (batch, groups, N, L) (zeroed by the caller)."""
    d_mask, row, n, n_mask, dn_mask, A, bias, Dv = _program(A_ptr, D_ptr, bias_ptr, dim, groups, n_state, HAS_D,
                                                            HAS_BIAS, BLOCK_D, NP)
    j = tl.arange(0, CHUNK)
    carry = tl.load(dlast_ptr + row[:, None] * n_state + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    dA_acc = tl.zeros((BLOCK_D, NP), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        h0 = tl.load(ckpt_ptr + (row[:, None] * n_chunks + c) * NP + n[None, :], mask=d_mask[:, None], other=0.0)
        m2, offs, tn_mask, bc_offs, u, s, dt, Bt, Ct, a, x, hs = _chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, h0, c, row, d_mask, n, n_mask, A, bias, length, n_state,
            SOFTPLUS, CHUNK)
        dout = tl.load(dout_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            sg = _sigmoid(zv)
            y_pre = tl.sum(hs * Ct[None, :, :], axis=2) + Dv[:, None] * u
            tl.store(dz_ptr + offs, dout * y_pre * sg * (1.0 + zv * (1.0 - sg)), mask=m2)
            dy = dout * zv * sg
        else:
            dy = dout
        # adjoint: g_t = a_{t+1} g_{t+1} + dy_t C_t inside the chunk; the chunk's last step gets the carry
        t = c * CHUNK + j
        next_mask = d_mask[:, None] & ((t + 1 < length) & (j < CHUNK - 1))[None, :]
        _, dt_next = _load_dt(delta_ptr, offs + 1, next_mask, bias, SOFTPLUS)
        alpha = tl.exp(dt_next[:, :, None] * A[:, None, :])
        beta = dy[:, :, None] * Ct[None, :, :]
        alpha_cum, beta_cum = tl.associative_scan((alpha, beta), axis=1, combine_fn=_combine, reverse=True)
        gs = alpha_cum * carry[:, None, :] + beta_cum  # dL/dh_t
        gB = tl.sum(gs * Bt[None, :, :], axis=2)  # (BLOCK_D, CHUNK)
        ga = gs * (hs - x)  # dL/d(dt A) = g_t a_t h_{t-1}
        ddt = tl.sum(ga * A[:, None, :], axis=2) + u * gB
        if SOFTPLUS:
            ddt = ddt * _sigmoid(s)
        ddt = tl.where(m2, ddt, 0.0)
        tl.store(du_ptr + offs, dt * gB + Dv[:, None] * dy, mask=m2)
        tl.store(ddelta_ptr + offs, ddt, mask=m2)
        dA_acc += tl.sum(ga * dt[:, :, None], axis=1)
        dD_acc += tl.sum(dy * u, axis=1)
        dbias_acc += tl.sum(ddt, axis=1)
        dB_chunk = tl.sum(gs * (dt * u)[:, :, None], axis=0)  # (CHUNK, NP), summed over the block's channels
        dC_chunk = tl.sum(hs * dy[:, :, None], axis=0)
        tl.atomic_add(dB_ptr + bc_offs, dB_chunk, mask=tn_mask)
        tl.atomic_add(dC_ptr + bc_offs, dC_chunk, mask=tn_mask)
        carry = tl.sum(tl.where((j == 0)[None, :, None], a * gs, 0.0), axis=1)
    tl.store(dA_ptr + row[:, None] * n_state + n[None, :], dA_acc, mask=dn_mask)
    tl.store(dD_ptr + row, dD_acc, mask=d_mask)
    tl.store(dbias_ptr + row, dbias_acc, mask=d_mask)
