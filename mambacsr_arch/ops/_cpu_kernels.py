"""Numba kernels of the ``cpu`` selective-scan backend (imported only when numba is present).

Everything of ``selective_scan_fn`` is fused: delta_bias and softplus, the recurrence, D and the
silu(z) gate, forward and backward, so no (batch, dim, L) temporaries are made besides the outputs.
Layout (all float32, C-contiguous): rows ``i = b * dim + d`` of u, delta, z, out (rows, L); A (dim, NP);
B and C transposed to (batch * groups, L, NP) so the NP states of one step are contiguous. NP is
N padded to a multiple of ``W`` = 16 (padded states have A = 0, B = C = 0 and stay exactly 0).

Speed (cycles are counted per 8-wide state update in ``benchmarks/bench_scan.py``):

* The recurrence ``h = exp(dt A) h + dt u B`` is latency-bound within one row, so ``R`` = 4 rows
  (channels of one group, which share B and C) advance together: every inner loop runs over
  compile-time widths R x W, which LLVM unrolls over the rows and turns into SIMD code over the states.
  A row block is a fixed unit of work (``block_rows``), so each row's arithmetic never depends on
  how the rows are split between threads (results are bitwise identical for any thread count).
* ``exp`` is a branch-free, vectorisable base-2 exp: y = dt * (A log2 e), 2^round(y) put straight
  into the exponent bits and a degree-5 near-minimax polynomial for 2^f, |f| <= 1/2 (relative error
  < 2e-7 over the whole range; LLVM has no vector ``exp`` without Intel SVML).
* All kernels use numba's ``error_model='numpy'``: with the default (Python) model every float
  division may raise ZeroDivisionError, and that branch stopped LLVM from vectorising softplus and
  sigmoid over the steps of a chunk.

Kernels are serial over a range of row blocks (or backward tasks) and release the GIL; the caller
runs ranges on a thread pool (lighter to compile than numba's parallel=True, follows torch's thread
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
R = 4  # rows advanced together (independent recurrences hide the latency of each other's chain)
_F = np.float32
_LOG2E = _F(1.4426950408889634)
_MAGIC = _F(12582912.0)  # 1.5 * 2^23: y + _MAGIC holds round(y) in its low mantissa bits
_Q1, _Q2, _Q3 = _F(0.6931470036506653), _F(0.24022242426872253), _F(0.05550733581185341)
_Q4, _Q5 = _F(0.009671512991189957), _F(0.001326472731307149)  # 2^f ~ 1 + Q1 f + ... + Q5 f^5
_LO2, _HI2 = _F(-125.0), _F(127.0)  # clamp of y: 2^-125 = 2.4e-38 stands for 0, 2^127 for overflow
_ONE, _HALF, _ZERO = _F(1.0), _F(0.5), _F(0.0)
# ``_pow2`` is compiled without 'reassoc' (it would fold (y + _MAGIC) - _MAGIC into y) and inlined by
# LLVM, which keeps its per-instruction flags; the kernels add 'reassoc' so LLVM can vectorise their
# sums over the N states.
_FM = {'nsz', 'arcp', 'contract', 'afn'}  # no 'nnan'/'ninf': NaN inputs must propagate
_FM_KERNEL = _FM | {'reassoc'}
_OPTS = dict(fastmath=_FM, error_model='numpy')
_KERNEL_OPTS = dict(nogil=True, fastmath=_FM_KERNEL, error_model='numpy', cache=True)


@intrinsic
def _scale_by_pow2(typingctx, p, kf):
    """p * 2^k for float32 p in [0.5, 2) and kf = k + _MAGIC (k in [-125, 127]): adds the low bits
    of kf, shifted into the exponent field, to p's bits (integer ops, vectorisable, no overflow)."""
    if not (p == types.float32 and kf == types.float32):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        p_bits = builder.bitcast(args[0], i32)
        k_bits = builder.shl(builder.bitcast(args[1], i32), ir.Constant(i32, 23))
        return builder.bitcast(builder.add(p_bits, k_bits), ir.FloatType())

    return types.float32(p, kf), codegen


@njit(**_OPTS)
def _pow2(y):
    """float32 2^y, relative error < 2e-7; y clamped to [-125, 127] (NaN stays NaN)."""
    y = min(max(y, _LO2), _HI2)
    kf = y + _MAGIC
    f = y - (kf - _MAGIC)  # in [-1/2, 1/2]
    p = ((((_Q5 * f + _Q4) * f + _Q3) * f + _Q2) * f + _Q1) * f + _ONE
    return _scale_by_pow2(p, kf)


@njit(**_OPTS)
def _exp(x):
    """float32 exp (relative error ~3e-7 from the rounding of x log2 e); 2.4e-38 below -86.6."""
    return _pow2(x * _LOG2E)


_TWO = _F(2.0)
_THIRD, _FIFTH, _SEVENTH = _F(1.0 / 3.0), _F(1.0 / 5.0), _F(1.0 / 7.0)
_NINTH, _ELEVENTH, _THIRTEENTH = _F(1.0 / 9.0), _F(1.0 / 11.0), _F(1.0 / 13.0)


@njit(**_OPTS)
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with
    log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3 (series to s^13: rel. error < 1e-8). Vectorisable."""
    e = _exp(-abs(x))
    s = e / (_TWO + e)
    s2 = s * s
    series = ((((((_THIRTEENTH * s2 + _ELEVENTH) * s2 + _NINTH) * s2 + _SEVENTH) * s2 + _FIFTH) * s2
               + _THIRD) * s2 + _ONE)
    return max(x, _ZERO) + _TWO * s * series


@njit(**_OPTS)
def _sigmoid(x):
    """1 / (1 + exp(-x)); vectorisable."""
    return _ONE / (_ONE + _exp(-x))


@njit(**_OPTS)
def _chunk_dt(delta, u, i, t0, t1, bias, softplus, dt_buf, du_buf):
    """dt_buf[j] = softplus?(delta[i, t0 + j] + bias), du_buf[j] = dt_buf[j] * u[i, t0 + j] over one
    chunk (vectorised over the steps)."""
    m = t1 - t0
    for j in range(m):
        dt_buf[j] = delta[i, t0 + j] + bias
    if softplus:
        for j in range(m):
            dt_buf[j] = _softplus(dt_buf[j])
    for j in range(m):
        du_buf[j] = dt_buf[j] * u[i, t0 + j]


@njit(**_OPTS)
def block_rows(block, dim, groups, row, chan):
    """Rows of row block ``block``: R consecutive channels of one group (blocks never straddle
    groups; a group's last block may be short). Fills row[r], chan[r] (a short block repeats its last
    row in the spare slots, whose results are identical or discarded); returns (bg, valid slots)."""
    per_group = dim // groups
    per_bg = (per_group + R - 1) // R
    bg = block // per_bg
    first = (bg % groups) * per_group + (block % per_bg) * R
    valid = min(R, (bg % groups + 1) * per_group - first)
    for r in range(R):
        chan[r] = first + min(r, valid - 1)
        row[r] = (bg // groups) * dim + chan[r]
    return bg, valid


@njit(**_OPTS)
def _load_block_A(A, chan, A2):
    """A2[k, r, j] = A[chan[r], k W + j] * log2(e)."""
    for k in range(A2.shape[0]):
        for r in range(R):
            for j in range(W):
                A2[k, r, j] = A[chan[r], k * W + j] * _LOG2E


@njit(**_KERNEL_OPTS)
def scan_forward(lo, hi, u, delta, A, Bt, Ct, D, z, delta_bias, softplus, has_z, dim, groups, chunk,
                 out, last, ckpt):
    """Fused forward of row blocks lo..hi-1 (see :func:`block_rows`; releases the GIL). u, delta,
    out: (rows, L); z: (rows, L) if ``has_z`` (else any 2-D array); A: (dim, NP); Bt, Ct:
    (batch*groups, L, NP); D, delta_bias: (dim,) (zeros when absent). Writes out = (<C, h> + D u) *
    silu(z), last (rows, NP) and ckpt (rows, n_chunks, NP), the state before each chunk of ``chunk``
    steps."""
    length = u.shape[1]
    nblk = A.shape[1] // W
    n_chunks = ckpt.shape[1]
    row = np.empty(R, dtype=np.int64)
    chan = np.empty(R, dtype=np.int64)
    h = np.empty((nblk, R, W), dtype=np.float32)
    A2 = np.empty((nblk, R, W), dtype=np.float32)
    dt_buf = np.empty((R, chunk), dtype=np.float32)
    du_buf = np.empty((R, chunk), dtype=np.float32)
    accs = np.empty(R, dtype=np.float32)
    for block in range(lo, hi):
        bg, valid = block_rows(block, dim, groups, row, chan)
        _load_block_A(A, chan, A2)
        h[:] = _ZERO
        for c in range(n_chunks):
            t0 = c * chunk
            t1 = min(t0 + chunk, length)
            for r in range(R):
                for k in range(nblk):
                    for j in range(W):
                        ckpt[row[r], c, k * W + j] = h[k, r, j]
                _chunk_dt(delta, u, row[r], t0, t1, delta_bias[chan[r]], softplus, dt_buf[r], du_buf[r])
            for t in range(t0, t1):
                j0 = t - t0
                for k in range(nblk):
                    for r in range(R):
                        dtt = dt_buf[r, j0]
                        dut = du_buf[r, j0]
                        acc = _ZERO
                        for j in range(W):
                            n = k * W + j
                            hn = _pow2(dtt * A2[k, r, j]) * h[k, r, j] + dut * Bt[bg, t, n]
                            h[k, r, j] = hn
                            acc += hn * Ct[bg, t, n]
                        accs[r] = acc if k == 0 else accs[r] + acc
                for r in range(R):  # a spare slot rewrites its row's value (identical arithmetic)
                    out[row[r], t] = accs[r] + D[chan[r]] * u[row[r], t]
            if has_z:
                for r in range(valid):
                    i = row[r]
                    for t in range(t0, t1):
                        zt = z[i, t]
                        out[i, t] *= zt * _sigmoid(zt)
        for r in range(R):
            for k in range(nblk):
                for j in range(W):
                    last[row[r], k * W + j] = h[k, r, j]


@njit(**_KERNEL_OPTS)
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
    n_chunks = ckpt.shape[1]
    hs = np.empty((chunk + 1, n_state), dtype=np.float32)  # hs[j] = state before step t0 + j
    es = np.empty((chunk, n_state), dtype=np.float32)  # decays exp(dt A) of the chunk
    dt_buf = np.empty(chunk, dtype=np.float32)
    du_buf = np.empty(chunk, dtype=np.float32)  # dt * u
    dy_buf = np.empty(chunk, dtype=np.float32)  # dL/d(<C, h> + D u)
    gs = np.empty(n_state, dtype=np.float32)  # dL/dh, carried backwards in time
    dA_acc = np.empty(n_state, dtype=np.float32)
    A2 = np.empty(n_state, dtype=np.float32)  # A * log2(e) of the row
    for task in range(lo, hi):
        bg = task // blocks_per_group
        part = task % blocks_per_group
        b = bg // groups
        g = bg % groups
        c0 = g * per_group + (part * per_group) // blocks_per_group
        c1 = g * per_group + ((part + 1) * per_group) // blocks_per_group
        dB_part[task] = _ZERO
        dC_part[task] = _ZERO
        for d in range(c0, c1):
            i = b * dim + d
            dd = D[d]
            bias = delta_bias[d]
            dD_acc = _ZERO
            dbias_acc = _ZERO
            for n in range(n_state):
                gs[n] = dlast[i, n]
                dA_acc[n] = _ZERO
                A2[n] = A[d, n] * _LOG2E
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                t1 = min(t0 + chunk, length)
                _chunk_dt(delta, u, i, t0, t1, bias, softplus, dt_buf, du_buf)
                for n in range(n_state):
                    hs[0, n] = ckpt[i, c, n]
                for t in range(t0, t1):  # recompute decays, states and (if gated) the pre-gate output
                    j0 = t - t0
                    dtt = dt_buf[j0]
                    du_t = du_buf[j0]
                    acc = _ZERO
                    for k in range(nblk):
                        for j in range(W):
                            n = k * W + j
                            e = _pow2(dtt * A2[n])
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
                    du_t = du_buf[j0]
                    acc_u = _ZERO
                    acc_a = _ZERO
                    for k in range(nblk):
                        for j in range(W):
                            n = k * W + j
                            gn = gs[n] + dyt * Ct[bg, t, n]  # dL/dh_t
                            bn = Bt[bg, t, n]
                            dC_part[task, t, n] += dyt * hs[j0 + 1, n]
                            dB_part[task, t, n] += gn * du_t
                            acc_u += gn * bn
                            ga = gn * es[j0, n] * hs[j0, n]  # dL/d(dt * A[n]) at step t
                            acc_a += ga * A[d, n]
                            dA_acc[n] += ga * dtt
                            gs[n] = gn * es[j0, n]
                    du[i, t] = acc_u * dtt + dd * dyt
                    dD_acc += dyt * ut
                    ddelta[i, t] = acc_a + acc_u * ut  # sum_n (ga A[n] + gn B[n] u)
                if softplus:
                    for t in range(t0, t1):
                        ddelta[i, t] *= _sigmoid(delta[i, t] + bias)
                for t in range(t0, t1):
                    dbias_acc += ddelta[i, t]
            for n in range(n_state):
                dA_rows[i, n] = dA_acc[n]
            dD_rows[i] = dD_acc
            dbias_rows[i] = dbias_acc
