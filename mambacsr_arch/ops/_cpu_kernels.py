"""Numba kernels of the ``cpu`` selective-scan backend (imported only when numba is present).

Everything of ``selective_scan_fn`` is fused: delta_bias and softplus, the recurrence, D and the
silu(z) gate, forward and backward, so no (batch, dim, L) temporaries are made besides the outputs;
so is a low-rank delta's projection (``delta_weight``: dt = w_d . delta_in[:, t], one multiply-add per
rank and step, vectorised over the steps of a chunk), so that a model's (batch, dim, L) dt tensor is never
stored either (the backward still returns the gradient of the projected delta; its caller applies
the projection's backward as two matrix products).
Layout (all float32, C-contiguous): rows ``i = b * dim + d`` of u, delta, z, out (rows, L); A (dim, NP);
B and C transposed to (batch * groups, L, NP) so the NP states of one step are contiguous. NP is
N padded to a multiple of ``W`` = 16 (padded states have A = 0, B = C = 0 and stay exactly 0).

Speed (cycles are counted per 8-wide state update in ``benchmarks/bench_scan.py``):

* The recurrence ``h = exp(dt A) h + dt u B`` is latency-bound within one row, so ``R`` = 8 rows
  (channels of one group, which share B and C) advance together: every inner loop runs over
  compile-time widths R x W, which LLVM unrolls over the rows and turns into SIMD code over the states.
  A row block is a fixed unit of work (``block_rows``), so each row's arithmetic never depends on
  how the rows are split between threads (results are bitwise identical for any thread count).
* ``exp`` is a branch-free, vectorisable base-2 exp: y = dt * (A log2 e), 2^rint(y) put straight
  into the exponent bits and a degree-5 near-minimax polynomial for 2^f, |f| <= 1/2 (relative error
  < 2e-7 over the whole range; LLVM has no vector ``exp`` without Intel SVML). It and the other small
  helpers are inlined by numba (``inline='always'``): a call per element keeps a loop scalar.
* All kernels use numba's ``error_model='numpy'``: with the default (Python) model every float
  division may raise ZeroDivisionError, and that branch stopped LLVM from vectorising softplus and
  sigmoid over the steps of a chunk.
* What keeps LLVM from vectorising, and the cure used here: (1) a computed index such as
  ``x[i, t0 + j]`` may be negative for all numba knows, so every access wraps around and becomes a
  gather: loops over steps index a view ``x[i, t0:t1]`` from 0 instead; (2) a loop writing several
  arrays needs proof that they do not overlap: the hot loops live in functions compiled with numba's
  ``noalias`` flag (``_HOT_OPTS``), whose array arguments are distinct buffers.

Kernels are serial over a range of row blocks (or backward tasks) and release the GIL; the caller
runs ranges on a thread pool (lighter to compile than numba's parallel=True, follows torch's thread
count, and no second OpenMP runtime). Forward writes the state at the start of every chunk of
``T`` steps; backward recomputes the states and decays of one chunk at a time from those
checkpoints (two (T + 1, R, NP) buffers per thread), so memory stays O(rows * L) and no (rows, L, N)
tensor ever exists.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.extending import intrinsic

W = 16  # SIMD width of the inner loops (states per block); 8 defeats LLVM's vectoriser
R = 8  # rows advanced together (independent recurrences hide the latency of each other's chain; measured
# with the scan benchmark's MambaCSR case: 8 rows take 0.98x the forward and 0.90x the forward+backward
# CPU time of 4; 16 rows 1.01x and 0.86x, but a group of few channels wastes more of a 16-row block)
_F = np.float32
_LOG2E = _F(1.4426950408889634)
_Q1, _Q2, _Q3 = _F(0.6931470036506653), _F(0.24022242426872253), _F(0.05550733581185341)
_Q4, _Q5 = _F(0.009671512991189957), _F(0.001326472731307149)  # 2^f ~ 1 + Q1 f + ... + Q5 f^5
_LO2, _HI2 = _F(-125.0), _F(127.0)  # clamp of y: 2^-125 = 2.4e-38 stands for 0, 2^127 for overflow
_ONE, _ZERO = _F(1.0), _F(0.0)
# the kernels add 'reassoc' so LLVM can vectorise their sums over the N states (``_pow2`` rounds with
# llvm.rint, which no fast-math rewrite folds)
_FM = {'nsz', 'arcp', 'contract', 'afn'}  # no 'nnan'/'ninf': NaN inputs must propagate
_FM_KERNEL = _FM | {'reassoc'}
_OPTS = dict(fastmath=_FM, error_model='numpy')
_KERNEL_OPTS = dict(nogil=True, fastmath=_FM_KERNEL, error_model='numpy', cache=True)


class _NoAliasCompiler(CompilerBase):
    """numba's nopython pipeline with its ``noalias`` flag on: array arguments are marked ``noalias``,
    so LLVM vectorises loops that write several arrays (without it, it cannot prove that two writes do
    not overlap and falls back to scalar code). Only for functions whose written array arguments never
    overlap any other argument (fresh outputs and scratch buffers)."""

    def define_pipelines(self):
        self.state.flags.noalias = True
        return [DefaultPassBuilder.define_nopython_pipeline(self.state)]


_HOT_OPTS = dict(_KERNEL_OPTS, pipeline_class=_NoAliasCompiler)


@intrinsic
def _rint(typingctx, y):
    """float32 y rounded to the nearest integer (ties to even): one vectorisable instruction (llvm.rint),
    opaque to fast-math rewrites, so y - rint(y) is never folded to 0."""
    if y != types.float32:
        return None

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic('llvm.rint', [ir.FloatType()])
        return builder.call(fn, [args[0]])

    return types.float32(y), codegen


@intrinsic
def _scale_by_pow2(typingctx, p, k):
    """p * 2^k for float32 p in [0.5, 2) and an integral float32 k in [-125, 127]: adds k, shifted into
    the exponent field, to p's bits (integer ops, vectorisable, no overflow)."""
    if not (p == types.float32 and k == types.float32):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        p_bits = builder.bitcast(args[0], i32)
        k_bits = builder.shl(builder.fptosi(args[1], i32), ir.Constant(i32, 23))
        return builder.bitcast(builder.add(p_bits, k_bits), ir.FloatType())

    return types.float32(p, k), codegen


@njit(inline='always', **_OPTS)
def _pow2(y):
    """float32 2^y, relative error < 2e-7; y clamped to [-125, 127] (NaN stays NaN)."""
    y = min(max(y, _LO2), _HI2)
    k = _rint(y)
    f = y - k  # in [-1/2, 1/2]
    p = ((((_Q5 * f + _Q4) * f + _Q3) * f + _Q2) * f + _Q1) * f + _ONE
    return _scale_by_pow2(p, k)


@njit(inline='always', **_OPTS)
def _exp(x):
    """float32 exp (relative error ~3e-7 from the rounding of x log2 e); 2.4e-38 below -86.6."""
    return _pow2(x * _LOG2E)


_TWO = _F(2.0)
_THIRD, _FIFTH, _SEVENTH = _F(1.0 / 3.0), _F(1.0 / 5.0), _F(1.0 / 7.0)
_NINTH, _ELEVENTH, _THIRTEENTH = _F(1.0 / 9.0), _F(1.0 / 11.0), _F(1.0 / 13.0)


@njit(inline='always', **_OPTS)
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with
    log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3 (series to s^13: rel. error < 1e-8). Vectorisable."""
    e = _exp(-abs(x))
    s = e / (_TWO + e)
    s2 = s * s
    series = ((((((_THIRTEENTH * s2 + _ELEVENTH) * s2 + _NINTH) * s2 + _SEVENTH) * s2 + _FIFTH) * s2
               + _THIRD) * s2 + _ONE)
    return max(x, _ZERO) + _TWO * s * series


@njit(inline='always', **_OPTS)
def _sigmoid(x):
    """1 / (1 + exp(-x)); vectorisable."""
    return _ONE / (_ONE + _exp(-x))


@njit(**_OPTS)
def _chunk_dt(delta, dt_in, w, lowrank, u, i, t0, t1, bias, softplus, dt_buf, du_buf, raw_buf, keep_raw):
    """dt_buf[j] = softplus?(delta[i, t0 + j] + bias), du_buf[j] = dt_buf[j] * u[i, t0 + j] over one
    chunk (vectorised over the steps). ``lowrank``: delta[i] is not stored but projected here,
    sum_k w[k] dt_in[k, t0 + j] (w: row i's weights (rank,), dt_in: its batch and group's (rank, L)).
    ``keep_raw``: raw_buf[j] also gets the argument of the softplus (the backward's sigmoid)."""
    m = t1 - t0
    u_row = u[i, t0:t1]  # views indexed from 0: no negative-index wrap-around (which defeats SIMD loads)
    if lowrank:
        for j in range(m):
            dt_buf[j] = bias
        for k in range(w.shape[0]):
            wk = w[k]
            x_row = dt_in[k, t0:t1]
            for j in range(m):
                dt_buf[j] += wk * x_row[j]
    else:
        d_row = delta[i, t0:t1]
        for j in range(m):
            dt_buf[j] = d_row[j] + bias
    if keep_raw:
        for j in range(m):
            raw_buf[j] = dt_buf[j]
    if softplus:
        for j in range(m):
            dt_buf[j] = _softplus(dt_buf[j])
    for j in range(m):
        du_buf[j] = dt_buf[j] * u_row[j]


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


@njit(**_HOT_OPTS)
def _advance(t0, m, Btg, Ctg, dt_buf, du_buf, A2, hs, es, ys, keep, want_y):
    """The recurrence of a block's R rows over ``m`` steps from t0 (forward and backward share it):
    h = exp(dt A) h + dt u B and, if ``want_y``, the outputs ys (R, m) = <C, h> without the D term
    (the backward needs them only for the gradient of z). Btg, Ctg: (L, NP) of the rows' batch and
    group; A2 = A log2(e) (nblk, R, W).

    ``keep=False`` (forward): hs is (1, nblk, R, W), the running state, updated in place; es unused.
    ``keep=True`` (the backward's recomputation): hs (m + 1, nblk, R, W) gets every state from hs[0]
    on and es (m, nblk, R, W) every decay."""
    nblk = A2.shape[0]
    for j0 in range(m):
        t = t0 + j0
        src = j0 if keep else 0
        dst = j0 + 1 if keep else 0
        h_in = hs[src]
        h_out = hs[dst]
        for k in range(nblk):
            for r in range(R):
                dtt = dt_buf[r, j0]
                dut = du_buf[r, j0]
                acc = _ZERO
                for j in range(W):
                    n = k * W + j
                    e = _pow2(dtt * A2[k, r, j])
                    if keep:
                        es[j0, k, r, j] = e
                    hn = e * h_in[k, r, j] + dut * Btg[t, n]
                    h_out[k, r, j] = hn
                    if want_y:
                        acc += hn * Ctg[t, n]
                if want_y:
                    ys[r, j0] = acc if k == 0 else ys[r, j0] + acc


@njit(**_KERNEL_OPTS)
def scan_forward(lo, hi, u, delta, delta_in, delta_w, lowrank, A, Bt, Ct, D, z, delta_bias, softplus, has_z,
                 dim, groups, chunk, out, last, ckpt):
    """Fused forward of row blocks lo..hi-1 (see :func:`block_rows`; releases the GIL). u, out:
    (rows, L); delta: (rows, L), or with ``lowrank`` (then delta is any 2-D array) projected here from
    delta_in (batch*groups, rank, L) by delta_w (dim, rank) (else any 3-D and 2-D arrays); z: (rows, L)
    if ``has_z`` (else any 2-D array); A: (dim, NP); Bt, Ct: (batch*groups, L, NP); D, delta_bias:
    (dim,) (zeros when absent). Writes out = (<C, h> + D u) * silu(z), last (rows, NP) and ckpt (rows,
    n_chunks, NP), the state before each chunk of ``chunk`` steps."""
    length = u.shape[1]
    nblk = A.shape[1] // W
    n_chunks = ckpt.shape[1]
    row = np.empty(R, dtype=np.int64)
    chan = np.empty(R, dtype=np.int64)
    hs = np.empty((1, nblk, R, W), dtype=np.float32)  # the running state
    h = hs[0]
    A2 = np.empty((nblk, R, W), dtype=np.float32)
    dt_buf = np.empty((R, chunk), dtype=np.float32)
    du_buf = np.empty((R, chunk), dtype=np.float32)
    ys = np.empty((R, chunk), dtype=np.float32)
    for block in range(lo, hi):
        bg, valid = block_rows(block, dim, groups, row, chan)
        dt_in = delta_in[bg] if lowrank else delta_in[0]
        _load_block_A(A, chan, A2)
        h[:] = _ZERO
        for c in range(n_chunks):
            t0 = c * chunk
            t1 = min(t0 + chunk, length)
            m = t1 - t0
            for r in range(R):
                for k in range(nblk):
                    for j in range(W):
                        ckpt[row[r], c, k * W + j] = h[k, r, j]
                _chunk_dt(delta, dt_in, delta_w[chan[r] if lowrank else 0], lowrank, u, row[r], t0, t1,
                          delta_bias[chan[r]], softplus, dt_buf[r], du_buf[r], ys[r], False)  # raw: unused
            _advance(t0, m, Bt[bg], Ct[bg], dt_buf, du_buf, A2, hs, hs, ys, False, True)  # es: not touched
            for r in range(valid):  # a spare slot repeats its block's last row: nothing to write
                dd = D[chan[r]]
                y_r = ys[r]
                u_row = u[row[r], t0:t1]
                out_row = out[row[r], t0:t1]
                if has_z:
                    z_row = z[row[r], t0:t1]
                    for j0 in range(m):
                        zt = z_row[j0]
                        out_row[j0] = (y_r[j0] + dd * u_row[j0]) * (zt * _sigmoid(zt))
                else:
                    for j0 in range(m):
                        out_row[j0] = y_r[j0] + dd * u_row[j0]
        for r in range(valid):
            for k in range(nblk):
                for j in range(W):
                    last[row[r], k * W + j] = h[k, r, j]


@njit(**_HOT_OPTS)
def _bwd_reverse(t0, m, Btg, Ctg, dt_buf, du_buf, dy_buf, A1, hs, es, gs, dA_acc, dBp, dCp, gu_buf, ga_buf):
    """Reverse sweep over ``m`` steps from t0 + m - 1 down to t0 for the R rows of a block: carries
    gs = dL/dh backwards, accumulates dA_acc, adds the rows' dB, dC terms into dBp, dCp (L, NP) (whole
    vectors: no partial-width stores that a vector load would have to wait for) and writes
    gu_buf = sum_n dL/dh_n B_n and ga_buf = sum_n dL/d(dt A_n) A_n (R, m)."""
    nblk = A1.shape[0]
    for jj in range(m):
        j0 = m - 1 - jj
        t = t0 + j0
        for k in range(nblk):
            for r in range(R):
                dtt = dt_buf[r, j0]
                dyt = dy_buf[r, j0]
                du_t = du_buf[r, j0]
                acc_u = _ZERO
                acc_a = _ZERO
                for j in range(W):
                    n = k * W + j
                    gn = gs[k, r, j] + dyt * Ctg[t, n]  # dL/dh_t
                    e = es[j0, k, r, j]
                    dCp[t, n] += dyt * hs[j0 + 1, k, r, j]
                    dBp[t, n] += gn * du_t
                    acc_u += gn * Btg[t, n]
                    ga = gn * e * hs[j0, k, r, j]  # dL/d(dt * A[n]) at step t
                    acc_a += ga * A1[k, r, j]
                    dA_acc[k, r, j] += ga * dtt
                    gs[k, r, j] = gn * e
                gu_buf[r, j0] = acc_u if k == 0 else gu_buf[r, j0] + acc_u
                ga_buf[r, j0] = acc_a if k == 0 else ga_buf[r, j0] + acc_a


@njit(**_KERNEL_OPTS)
def scan_backward(lo, hi, u, delta, delta_in, delta_w, lowrank, A, Bt, Ct, D, z, delta_bias, softplus, has_z,
                  dim, groups, chunk, ckpt, dout, dlast, blocks_per_group, du, ddelta, dz, dA_rows, dD_rows,
                  dbias_rows, dB_part, dC_part):
    """Fused reverse sweep of tasks lo..hi-1 (releases the GIL); inputs as in :func:`scan_forward`
    plus dout (rows, L), dlast (rows, NP).

    Outputs: du, ddelta, dz (rows, L) (dz only if ``has_z``; with ``lowrank`` ddelta is the gradient of
    the projected delta, the caller applies the projection's backward); per-row dA_rows (rows, NP), dD_rows,
    dbias_rows (rows,) (caller sums over batch); dB_part, dC_part (batch*groups*blocks_per_group, L,
    NP), one partial sum per block of channels of a group (caller sums the blocks); task = (batch *
    groups + group) * blocks_per_group + block. Each task owns its block, so there are no write
    races. The states of a chunk are recomputed from ckpt.

    As in the forward, ``R`` rows of the block advance together (:func:`_advance`,
    :func:`_bwd_reverse`): their recurrences hide each other's latency and share the loads of B and C
    and the task's dB, dC partial sums of a step (in L1 cache). A short last
    group of rows repeats its last row with zero output gradients (so it adds exactly 0 to dB, dC) and
    writes nothing.
    """
    length = u.shape[1]
    n_state = A.shape[1]
    nblk = n_state // W
    per_group = dim // groups
    row_blocks = (per_group + R - 1) // R
    n_chunks = ckpt.shape[1]
    hs = np.empty((chunk + 1, nblk, R, W), dtype=np.float32)  # hs[j] = states before step t0 + j
    es = np.empty((chunk, nblk, R, W), dtype=np.float32)  # decays exp(dt A) of the chunk
    dt_buf = np.empty((R, chunk), dtype=np.float32)
    du_buf = np.empty((R, chunk), dtype=np.float32)  # dt * u
    dy_buf = np.empty((R, chunk), dtype=np.float32)  # dL/d(<C, h> + D u)
    gu_buf = np.empty((R, chunk), dtype=np.float32)  # sum_n dL/dh_n B_n
    ga_buf = np.empty((R, chunk), dtype=np.float32)  # sum_n dL/d(dt A_n) A_n
    raw_buf = np.empty((R, chunk), dtype=np.float32)  # delta + bias (the softplus argument)
    gs = np.empty((nblk, R, W), dtype=np.float32)  # dL/dh, carried backwards in time
    dA_acc = np.empty((nblk, R, W), dtype=np.float32)
    A1 = np.empty((nblk, R, W), dtype=np.float32)  # A of the rows
    A2 = np.empty((nblk, R, W), dtype=np.float32)  # A * log2(e)
    dD_acc = np.empty(R, dtype=np.float32)
    dbias_acc = np.empty(R, dtype=np.float32)
    row = np.empty(R, dtype=np.int64)
    chan = np.empty(R, dtype=np.int64)
    for task in range(lo, hi):
        bg = task // blocks_per_group
        part = task % blocks_per_group
        b = bg // groups
        g = bg % groups
        dt_in = delta_in[bg] if lowrank else delta_in[0]
        # a task's channels are whole R-row blocks (only a group's last block may be short): a task of 45
        # channels would leave 3 of its last block's 8 rows idle
        c0 = g * per_group + min(per_group, R * ((part * row_blocks) // blocks_per_group))
        c1 = g * per_group + min(per_group, R * (((part + 1) * row_blocks) // blocks_per_group))
        dB_part[task] = _ZERO
        dC_part[task] = _ZERO
        for first in range(c0, c1, R):
            valid = min(R, c1 - first)
            for r in range(R):
                chan[r] = first + min(r, valid - 1)
                row[r] = b * dim + chan[r]
                dD_acc[r] = _ZERO
                dbias_acc[r] = _ZERO
            _load_block_A(A, chan, A2)
            for k in range(nblk):
                for r in range(R):
                    for j in range(W):
                        n = k * W + j
                        A1[k, r, j] = A[chan[r], n]
                        gs[k, r, j] = dlast[row[r], n] if r < valid else _ZERO
                        dA_acc[k, r, j] = _ZERO
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                t1 = min(t0 + chunk, length)
                m = t1 - t0
                for r in range(R):
                    _chunk_dt(delta, dt_in, delta_w[chan[r] if lowrank else 0], lowrank, u, row[r], t0, t1,
                              delta_bias[chan[r]], softplus, dt_buf[r], du_buf[r], raw_buf[r], True)
                    for k in range(nblk):
                        for j in range(W):
                            hs[0, k, r, j] = ckpt[row[r], c, k * W + j]
                _advance(t0, m, Bt[bg], Ct[bg], dt_buf, du_buf, A2, hs, es, dy_buf, True, has_z)
                for r in range(R):
                    dy_r = dy_buf[r]
                    dout_row = dout[row[r], t0:t1]
                    if r >= valid:
                        for j0 in range(m):
                            dy_r[j0] = _ZERO
                    elif has_z:
                        dd = D[chan[r]]
                        z_row = z[row[r], t0:t1]
                        u_row = u[row[r], t0:t1]
                        dz_row = dz[row[r], t0:t1]
                        for j0 in range(m):
                            zt = z_row[j0]
                            sg = _sigmoid(zt)
                            y_pre = dy_r[j0] + dd * u_row[j0]
                            dz_row[j0] = dout_row[j0] * y_pre * sg * (_ONE + zt * (_ONE - sg))
                            dy_r[j0] = dout_row[j0] * zt * sg
                    else:
                        for j0 in range(m):
                            dy_r[j0] = dout_row[j0]
                _bwd_reverse(t0, m, Bt[bg], Ct[bg], dt_buf, du_buf, dy_buf, A1, hs, es, gs, dA_acc,
                             dB_part[task], dC_part[task], gu_buf, ga_buf)
                for r in range(valid):
                    dd = D[chan[r]]
                    u_row = u[row[r], t0:t1]
                    du_row = du[row[r], t0:t1]
                    dd_row = ddelta[row[r], t0:t1]
                    gu_r, ga_r, dy_r, dt_r = gu_buf[r], ga_buf[r], dy_buf[r], dt_buf[r]
                    acc = _ZERO
                    for j0 in range(m):
                        du_row[j0] = gu_r[j0] * dt_r[j0] + dd * dy_r[j0]
                        acc += dy_r[j0] * u_row[j0]
                        dd_row[j0] = ga_r[j0] + gu_r[j0] * u_row[j0]  # sum_n (ga A[n] + gn B[n] u)
                    dD_acc[r] += acc
                    if softplus:
                        raw_r = raw_buf[r]
                        for j0 in range(m):
                            dd_row[j0] *= _sigmoid(raw_r[j0])
                    acc = _ZERO
                    for j0 in range(m):
                        acc += dd_row[j0]
                    dbias_acc[r] += acc
            for r in range(valid):
                i = row[r]
                for k in range(nblk):
                    for j in range(W):
                        dA_rows[i, k * W + j] = dA_acc[k, r, j]
                dD_rows[i] = dD_acc[r]
                dbias_rows[i] = dbias_acc[r]
