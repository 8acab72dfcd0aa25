"""Numba kernels of the ``cpu`` selective-scan backend (imported only when numba is present).

Everything of ``selective_scan_fn`` is fused: delta_bias and softplus, the recurrence, D and the
silu(z) gate, forward and backward, so no (batch, dim, L) temporaries are made besides the outputs.
Layout (all float32, C-contiguous): rows ``i = b * dim + d`` of u, delta, z, out (rows, L); A (dim, NP);
B and C transposed to (batch * groups, L, NP) so the NP states of one step are contiguous. NP is
N padded to a multiple of ``W`` = 16 (padded states have A = 0, B = C = 0 and stay exactly 0), and
every inner loop runs over a compile-time width of 16, which LLVM turns into SIMD code; ``exp`` is a
branch-free, vectorisable float32 Cody-Waite + degree-6 polynomial (max error 1.4 ulp), because
LLVM has no vector ``exp`` without Intel SVML.

Kernels are serial over a range of rows (or backward tasks) and release the GIL; the caller runs
ranges on a thread pool (lighter to compile than numba's parallel=True, follows torch's thread
count, and no second OpenMP runtime). Forward writes the state at the start of every chunk of
``T`` steps; backward recomputes the states and decays of one chunk at a time from those
checkpoints (two (T + 1, NP) buffers per task), so memory stays O(rows * L) and no (rows, L, N)
tensor ever exists.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

W = 16  # SIMD width of the inner loops (states per block); 8 defeats LLVM's vectoriser
_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_LO, _HI = _F(-87.0), _F(88.0)
_ONE, _HALF, _ZERO = _F(1.0), _F(0.5), _F(0.0)
# ``_exp`` is compiled without 'reassoc' (it would fold the two-constant Cody-Waite reduction into
# one) and inlined by LLVM, which keeps its per-instruction flags; the kernels add 'reassoc' so
# LLVM can vectorise their sums over the N states.
_FM = {'nsz', 'arcp', 'contract', 'afn'}  # no 'nnan'/'ninf': NaN inputs must propagate
_FM_KERNEL = _FM | {'reassoc'}


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (an LLVM bitcast, vectorisable)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@njit(fastmath=_FM)
def _exp(x):
    """float32 exp, exact to 1.4 ulp on [-87, 88] (clamped outside: exp(-87) = 1.6e-38)."""
    x = min(max(x, _LO), _HI)
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI - k * _LN2_LO
    p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + _ONE
    return p * _bits_to_f32((np.int32(k) + 127) << 23)


_TWO = _F(2.0)
_THIRD, _FIFTH, _SEVENTH = _F(1.0 / 3.0), _F(1.0 / 5.0), _F(1.0 / 7.0)
_NINTH, _ELEVENTH, _THIRTEENTH = _F(1.0 / 9.0), _F(1.0 / 11.0), _F(1.0 / 13.0)


@njit(fastmath=_FM)
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with
    log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3 (series to s^13: rel. error < 1e-8). Vectorisable."""
    e = _exp(-abs(x))
    s = e / (_TWO + e)
    s2 = s * s
    series = ((((((_THIRTEENTH * s2 + _ELEVENTH) * s2 + _NINTH) * s2 + _SEVENTH) * s2 + _FIFTH) * s2
               + _THIRD) * s2 + _ONE)
    return max(x, _ZERO) + _TWO * s * series


@njit(fastmath=_FM)
def _sigmoid(x):
    """1 / (1 + exp(-x)); vectorisable."""
    return _ONE / (_ONE + _exp(-x))


@njit(fastmath=_FM_KERNEL)
def _chunk_dt(delta, i, t0, t1, bias, softplus, dt_buf):
    """dt_buf[j] = softplus?(delta[i, t0 + j] + bias) for the steps of one chunk."""
    if softplus:
        for t in range(t0, t1):
            dt_buf[t - t0] = _softplus(delta[i, t] + bias)
    else:
        for t in range(t0, t1):
            dt_buf[t - t0] = delta[i, t] + bias


@njit(nogil=True, fastmath=_FM_KERNEL, cache=True)
def scan_forward(lo, hi, u, delta, A, Bt, Ct, D, z, delta_bias, softplus, has_z, dim, groups, chunk,
                 out, last, ckpt):
    """Fused forward of rows lo..hi-1 (releases the GIL). u, delta, out: (rows, L); z: (rows, L) if
    ``has_z`` (else any 2-D array); A: (dim, NP); Bt, Ct: (batch*groups, L, NP); D, delta_bias:
    (dim,) (zeros when absent). Writes out = (<C, h> + D u) * silu(z), last (rows, NP) and ckpt
    (rows, n_chunks, NP), the state before each chunk of ``chunk`` steps."""
    rows, length = u.shape
    n_state = A.shape[1]
    nblk = n_state // W
    per_group = dim // groups
    n_chunks = ckpt.shape[1]
    for i in range(lo, hi):
        d = i % dim
        bg = (i // dim) * groups + d // per_group
        h = np.zeros(n_state, dtype=np.float32)
        dt_buf = np.empty(chunk, dtype=np.float32)
        dd = D[d]
        for c in range(n_chunks):
            t0 = c * chunk
            t1 = min(t0 + chunk, length)
            for n in range(n_state):
                ckpt[i, c, n] = h[n]
            _chunk_dt(delta, i, t0, t1, delta_bias[d], softplus, dt_buf)
            for t in range(t0, t1):
                dtt = dt_buf[t - t0]
                du = dtt * u[i, t]
                acc = _ZERO
                for k in range(nblk):
                    for j in range(W):
                        n = k * W + j
                        hn = _exp(dtt * A[d, n]) * h[n] + du * Bt[bg, t, n]
                        h[n] = hn
                        acc += hn * Ct[bg, t, n]
                out[i, t] = acc + dd * u[i, t]
            if has_z:
                for t in range(t0, t1):
                    zt = z[i, t]
                    out[i, t] *= zt * _sigmoid(zt)
        for n in range(n_state):
            last[i, n] = h[n]


@njit(nogil=True, fastmath=_FM_KERNEL, cache=True)
def scan_backward(lo, hi, u, delta, A, Bt, Ct, D, z, delta_bias, softplus, has_z, dim, groups, chunk, ckpt,
                  dout, dlast, blocks_per_group, du, ddelta, dz, dA_rows, dD_rows, dbias_rows,
                  dB_part, dC_part):
    """Fused reverse sweep of tasks lo..hi-1 (releases the GIL); inputs as in :func:`scan_forward`
    plus dout (rows, L), dlast (rows, NP).

    Outputs: du, ddelta, dz (rows, L) (dz only if ``has_z``); per-row dA_rows (rows, NP), dD_rows,
    dbias_rows (rows,) (caller sums over batch); dB_part, dC_part (batch*groups*blocks_per_group, L,
    NP), one partial sum per block of channels of a group (caller sums the blocks); task = (batch *
    groups + group) * blocks_per_group + block. Each task owns its block, so there are no write
    races. The states of a chunk are recomputed from ckpt.
    """
    rows, length = u.shape
    n_state = A.shape[1]
    nblk = n_state // W
    per_group = dim // groups
    batch = rows // dim
    n_chunks = ckpt.shape[1]
    for task in range(lo, hi):
        bg = task // blocks_per_group
        part = task % blocks_per_group
        b = bg // groups
        g = bg % groups
        c0 = g * per_group + (part * per_group) // blocks_per_group
        c1 = g * per_group + ((part + 1) * per_group) // blocks_per_group
        hs = np.empty((chunk + 1, n_state), dtype=np.float32)  # hs[j] = state before step t0 + j
        es = np.empty((chunk, n_state), dtype=np.float32)  # decays exp(dt A) of the chunk
        dt_buf = np.empty(chunk, dtype=np.float32)
        dy_buf = np.empty(chunk, dtype=np.float32)  # dL/d(<C, h> + D u)
        gs = np.empty(n_state, dtype=np.float32)  # dL/dh, carried backwards in time
        dA_acc = np.empty(n_state, dtype=np.float32)
        for t in range(length):
            for n in range(n_state):
                dB_part[task, t, n] = _ZERO
                dC_part[task, t, n] = _ZERO
        for d in range(c0, c1):
            i = b * dim + d
            dd = D[d]
            bias = delta_bias[d]
            dD_acc = _ZERO
            dbias_acc = _ZERO
            for n in range(n_state):
                gs[n] = dlast[i, n]
                dA_acc[n] = _ZERO
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                t1 = min(t0 + chunk, length)
                _chunk_dt(delta, i, t0, t1, bias, softplus, dt_buf)
                for n in range(n_state):
                    hs[0, n] = ckpt[i, c, n]
                for t in range(t0, t1):  # recompute decays, states and (if gated) the pre-gate output
                    j0 = t - t0
                    dtt = dt_buf[j0]
                    du_t = dtt * u[i, t]
                    acc = _ZERO
                    for k in range(nblk):
                        for j in range(W):
                            n = k * W + j
                            e = _exp(dtt * A[d, n])
                            es[j0, n] = e
                            hn = e * hs[j0, n] + du_t * Bt[bg, t, n]
                            hs[j0 + 1, n] = hn
                            acc += hn * Ct[bg, t, n]
                    dy_buf[j0] = acc + dd * u[i, t]  # pre-gate output, replaced below by its gradient
                if has_z:
                    for t in range(t0, t1):
                        j0 = t - t0
                        zt = z[i, t]
                        sg = _sigmoid(zt)
                        dz[i, t] = dout[i, t] * dy_buf[j0] * sg * (_ONE + zt * (_ONE - sg))
                        dy_buf[j0] = dout[i, t] * zt * sg
                else:
                    for t in range(t0, t1):
                        dy_buf[t - t0] = dout[i, t]
                for t in range(t1 - 1, t0 - 1, -1):
                    j0 = t - t0
                    dtt = dt_buf[j0]
                    ut = u[i, t]
                    dyt = dy_buf[j0]
                    du_t = dtt * ut
                    acc_u = _ZERO
                    acc_dt = _ZERO
                    for k in range(nblk):
                        for j in range(W):
                            n = k * W + j
                            gn = gs[n] + dyt * Ct[bg, t, n]  # dL/dh_t
                            bn = Bt[bg, t, n]
                            dC_part[task, t, n] += dyt * hs[j0 + 1, n]
                            dB_part[task, t, n] += gn * du_t
                            acc_u += gn * bn
                            ga = gn * es[j0, n] * hs[j0, n]  # dL/d(dt * A[n]) at step t
                            acc_dt += ga * A[d, n] + gn * bn * ut
                            dA_acc[n] += ga * dtt
                            gs[n] = gn * es[j0, n]
                    du[i, t] = acc_u * dtt + dd * dyt
                    dD_acc += dyt * ut
                    ddelta[i, t] = acc_dt
                if softplus:
                    for t in range(t0, t1):
                        ddelta[i, t] *= _sigmoid(delta[i, t] + bias)
                for t in range(t0, t1):
                    dbias_acc += ddelta[i, t]
            for n in range(n_state):
                dA_rows[i, n] = dA_acc[n]
            dD_rows[i] = dD_acc
            dbias_rows[i] = dbias_acc

