"""Every available selective-scan backend against a float64 sequential recurrence written here."""
from __future__ import annotations

from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

import mambacsr_arch  # noqa: F401  (shims before anything else)
from mambacsr_arch.ops import available_backends, cpu_scan, selective_scan, torch_scan

# 'torch:parallel' is the torch backend with the strategy used off-CPU (Hillis-Steele within chunks)
BACKENDS = [name for name in ('cpu', 'torch', 'export', 'reference') if available_backends()[name] is None]
BACKENDS.insert(BACKENDS.index('torch') + 1, 'torch:parallel')


@pytest.fixture(autouse=True)
def torch_strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route 'torch:<strategy>' to the torch backend with that strategy."""
    backend = getattr(request.node, 'callspec', None) and request.node.callspec.params.get('backend')
    if backend and backend.startswith('torch:'):
        monkeypatch.setattr(torch_scan, 'DEFAULT_STRATEGY', backend.split(':')[1])


def backend_name(backend: str) -> str:
    return backend.split(':')[0]
NAMES = ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias']


def scan64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Float64 recurrence of mamba_ssm's selective_scan_ref, one step at a time. Returns (out, last)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    batch, dim, length = u.shape
    rep = dim // B.shape[1]
    B = B.repeat_interleave(rep, dim=1)  # channel d reads group d // (dim / groups)
    C = C.repeat_interleave(rep, dim=1)
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def make_inputs(batch: int, dim: int, n: int, length: int, groups: int, with_D: bool, with_z: bool,
                with_bias: bool, three_d_bc: bool = False, seed: int = 0,
                delta_scale: float = 1.0) -> Dict[str, Optional[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, n, length) if three_d_bc else (batch, groups, n, length)
    return {
        'u': torch.randn(batch, dim, length, generator=g),
        'delta': torch.rand(batch, dim, length, generator=g) * delta_scale - 0.2,
        'A': -torch.rand(dim, n, generator=g) * 3 - 0.05,
        'B': torch.randn(shape_bc, generator=g),
        'C': torch.randn(shape_bc, generator=g),
        'D': torch.randn(dim, generator=g) if with_D else None,
        'z': torch.randn(batch, dim, length, generator=g) if with_z else None,
        'delta_bias': torch.rand(dim, generator=g) * 0.5 if with_bias else None,
    }


def run(fn, inputs, softplus: bool, last: bool, weights, dtype=None):
    """Forward and gradients of sum(out * w) (+ sum(last * w_last))."""
    leaves = {k: (None if v is None else (v.to(dtype) if dtype else v).detach().requires_grad_())
              for k, v in inputs.items()}
    res = fn(leaves['u'], leaves['delta'], leaves['A'], leaves['B'], leaves['C'], leaves['D'], leaves['z'],
             leaves['delta_bias'], softplus)
    out, last_state = res if isinstance(res, tuple) else (res, None)
    loss = (out.double() * weights[0]).sum()
    if last:
        loss = loss + (last_state.double() * weights[1]).sum()
    present = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present])
    return out, last_state, dict(zip(present, grads))


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    expected = expected.double()
    atol = rtol * max(expected.abs().max().item(), 1e-6)
    assert actual.isfinite().all(), f'{what}: non-finite values'
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f'{what}: {m}')


def compare(backend: str, inputs, softplus: bool, last: bool, dtype=None, rtol_fwd=1e-4, rtol_grad=1e-3):
    batch, dim, length = inputs['u'].shape
    g = torch.Generator().manual_seed(123)
    weights = (torch.randn(batch, dim, length, generator=g, dtype=torch.float64),
               torch.randn(batch, dim, inputs['A'].shape[1], generator=g, dtype=torch.float64))
    ref_inputs = {k: None if v is None else (v.to(dtype) if dtype else v).double() for k, v in inputs.items()}

    def ours(u, delta, A, B, C, D, z, delta_bias, sp):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, sp, return_last_state=last,
                              backend=backend_name(backend))

    def ref(u, delta, A, B, C, D, z, delta_bias, sp):
        out, h = scan64(u, delta, A, B, C, D, z, delta_bias, sp)
        return (out, h) if last else out

    out, last_state, grads = run(ours, inputs, softplus, last, weights, dtype)
    ref_out, ref_last, ref_grads = run(ref, ref_inputs, softplus, last, weights)
    assert out.dtype == (dtype or torch.float32) and out.shape == (batch, dim, length)
    close(out, ref_out, rtol_fwd, f'{backend} output')
    if last:
        assert last_state.dtype == torch.float32 and last_state.shape == ref_last.shape
        close(last_state, ref_last, rtol_fwd, f'{backend} last_state')
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k].shape == ref_grads[k].shape and grads[k].dtype == (dtype or torch.float32)
        close(grads[k], ref_grads[k], rtol_grad, f'{backend} d{k}')


# (batch, dim, N, L, groups, D, z, delta_bias, softplus, return_last_state, 3-D B/C)
CASES: List[tuple] = [
    (2, 4, 1, 1, 1, False, False, False, False, True, False),
    (2, 8, 4, 7, 2, True, True, True, True, True, False),
    (1, 8, 16, 64, 4, True, False, True, False, False, False),
    (3, 8, 16, 65, 2, False, True, False, True, True, False),
    (2, 6, 4, 130, 1, True, True, True, True, False, True),
    (1, 4, 16, 200, 4, False, False, False, True, True, False),
    (1, 160, 16, 70, 1, True, True, True, True, True, False),  # cpu backward: 10 channels a task (R = 8, then 2)
]


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('case', CASES, ids=lambda c: 'b{}d{}n{}L{}g{}'.format(*c[:5]))
def test_matches_float64_reference(backend: str, case: tuple) -> None:
    batch, dim, n, length, groups, D, z, bias, softplus, last, three_d = case
    inputs = make_inputs(batch, dim, n, length, groups, D, z, bias, three_d, seed=hash(case) % 1000)
    compare(backend, inputs, softplus, last)


@pytest.mark.slow
@pytest.mark.parametrize('backend', [b for b in BACKENDS if b != 'reference'])
@pytest.mark.parametrize('n', [1, 16])
def test_long_sequence(backend: str, n: int) -> None:
    """L not a multiple of any chunk size, both chunk boundaries and carry-over exercised."""
    inputs = make_inputs(1, 4, n, 1031, 2, True, True, True, seed=n)
    compare(backend, inputs, softplus=True, last=True)


@pytest.mark.parametrize('backend', BACKENDS)
def test_bfloat16_inputs(backend: str) -> None:
    inputs = make_inputs(2, 8, 16, 70, 2, True, True, True, seed=5)
    compare(backend, inputs, softplus=True, last=True, dtype=torch.bfloat16, rtol_fwd=2e-2, rtol_grad=3e-2)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('scale', [50.0, 1000.0])
def test_large_steps_stay_finite(backend: str, scale: float) -> None:
    """delta * |A| up to ``scale`` per step: decays underflow to 0, nothing overflows."""
    g = torch.Generator().manual_seed(7)
    inputs = make_inputs(1, 4, 16, 150, 1, True, True, False, seed=7)
    inputs['A'] = -torch.rand(4, 16, generator=g) - 0.01
    inputs['delta'] = torch.rand(1, 4, 150, generator=g) * scale
    compare(backend, inputs, softplus=False, last=True)


@pytest.mark.parametrize('backend', BACKENDS)
def test_autocast_keeps_float32(backend: str) -> None:
    inputs = make_inputs(1, 4, 8, 20, 1, True, True, True, seed=3)
    args = [inputs[k] for k in NAMES]
    expected = selective_scan(*args, delta_softplus=True, backend=backend_name(backend))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = selective_scan(*args, delta_softplus=True, backend=backend_name(backend))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('backend', [b for b in BACKENDS if b not in ('reference', 'export')])  # export: inference
def test_backward_memory_is_bounded(backend: str) -> None:
    """Autograd keeps O(batch * dim * L) per call, never the (batch, dim, L, N) states."""
    batch, dim, n, length = 2, 32, 16, 512  # B, C (batch, 2, N, L) are inputs: 1/16 of the states
    inputs = make_inputs(batch, dim, n, length, 2, True, True, True, seed=11)
    leaves = [v.requires_grad_() for v in (inputs[k] for k in NAMES)]
    saved: List[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.untyped_storage().nbytes() // t.element_size())  # a small view can pin a big storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan(*leaves, delta_softplus=True, backend=backend_name(backend))
    out.sum().backward()
    states = batch * dim * length * n
    assert saved and max(saved) < states / 4, f'largest saved tensor {max(saved)} vs states {states}'
    assert all(v.grad is not None and v.grad.isfinite().all() for v in leaves)


def test_rejects_bad_shapes() -> None:
    inputs = make_inputs(1, 6, 4, 10, 1, False, False, False)
    u, delta, A, B, C = (inputs[k] for k in NAMES[:5])
    with pytest.raises(ValueError, match='divisible by groups'):
        selective_scan(u, delta, A, B.expand(1, 4, 4, 10), C.expand(1, 4, 4, 10))
    with pytest.raises(ValueError, match='A must be'):
        selective_scan(u, delta, A[:3], B, C)
    with pytest.raises(ValueError, match='D must be'):
        selective_scan(u, delta, A, B, C, D=torch.ones(5))


@pytest.mark.parametrize('backend', BACKENDS)
def test_nan_propagates(backend: str) -> None:
    """A NaN input poisons its channel from that step on (so training divergence is visible)."""
    inputs = make_inputs(1, 4, 16, 20, 1, True, False, True, seed=2)
    inputs['u'][0, 1, 5] = float('nan')
    out = selective_scan(*(inputs[k] for k in NAMES), delta_softplus=True, backend=backend_name(backend))
    assert out[0, 1, 5:].isnan().all()
    assert out[0, 1, :5].isfinite().all() and out[0, [0, 2, 3]].isfinite().all()


@pytest.mark.skipif('cpu' not in BACKENDS, reason='numba missing')
def test_cpu_results_do_not_depend_on_thread_count() -> None:
    """Rows (forward) and channel blocks (backward) are spread over torch's thread count, but the
    blocks themselves are fixed, so every result is bitwise identical (reproducible training)."""
    inputs = make_inputs(2, 16, 16, 100, 2, True, True, True, seed=9)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            leaves = [inputs[k].clone().requires_grad_() for k in NAMES]
            out = selective_scan(*leaves, delta_softplus=True, backend='cpu')
            out.backward(torch.ones_like(out))
            results.append([out.detach()] + [v.grad for v in leaves])
    finally:
        torch.set_num_threads(previous)
    for name, one, three in zip(['out'] + NAMES, results[0], results[1]):
        assert torch.equal(one, three), name


# (batch, dim, N, L, groups, rank, D, z, delta_bias, softplus, return_last_state)
LOW_RANK_CASES: List[tuple] = [
    (2, 8, 4, 70, 2, 3, True, True, True, True, True),
    (1, 160, 16, 130, 1, 5, True, False, True, True, False),  # cpu backward: several tasks and row blocks
    (3, 6, 16, 65, 3, 2, False, True, False, False, True),
]


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('case', LOW_RANK_CASES, ids=lambda c: 'b{}d{}n{}L{}g{}r{}'.format(*c[:6]))
def test_low_rank_delta_matches_the_projected_reference(backend: str, case: tuple) -> None:
    """``delta_weight``: delta is (batch, groups, R, L), projected per group (inside the cpu kernel, by the
    dispatcher for the others); outputs and every gradient, the weight's included, against float64."""
    compare_low_rank(backend, case)


def compare_low_rank(backend: str, case: tuple) -> None:
    batch, dim, n, length, groups, rank, D, z, bias, softplus, last = case
    inputs = make_inputs(batch, dim, n, length, groups, D, z, bias, seed=sum(case))
    g = torch.Generator().manual_seed(7)
    low = torch.randn(batch, groups, rank, length, generator=g) * 0.5
    weight = torch.randn(dim, rank, generator=g) * 0.5
    out_w = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    last_w = torch.randn(batch, dim, n, generator=g, dtype=torch.float64)
    present = [k for k in NAMES if k != 'delta' and inputs[k] is not None]
    results = []
    for ours in (True, False):
        leaves = {k: inputs[k].detach().clone().requires_grad_() for k in present}
        if not ours:
            leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
        lw = weight.clone().requires_grad_() if ours else weight.double().requires_grad_()
        ll = low.clone().requires_grad_() if ours else low.double().requires_grad_()
        args = [leaves.get(k) for k in NAMES if k != 'delta']
        if ours:
            res = selective_scan(args[0], ll, *args[1:], delta_softplus=softplus, return_last_state=last,
                                 backend=backend_name(backend), delta_weight=lw)
        else:
            dense = torch.einsum('gdr,bgrl->bgdl', lw.view(groups, dim // groups, rank), ll).reshape(batch, dim, length)
            res = scan64(args[0], dense, *args[1:], delta_softplus=softplus)
            res = res if last else res[0]
        out, state = res if isinstance(res, tuple) else (res, None)
        loss = (out.double() * out_w).sum() + ((state.double() * last_w).sum() if last else 0)
        tensors = [leaves[k] for k in present] + [ll, lw]
        grads = torch.autograd.grad(loss, tensors)
        results.append((out, state, grads))
    (out, state, grads), (ref, ref_state, ref_grads) = results
    close(out, ref, 1e-4, f'{backend} output')
    if last:
        close(state, ref_state, 1e-4, f'{backend} last_state')
    for name, got, want in zip(present + ['delta (low rank)', 'delta_weight'], grads, ref_grads):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        close(got, want, 1e-3, f'{backend} d{name}')


def test_low_rank_delta_rejects_bad_shapes() -> None:
    inputs = make_inputs(1, 6, 4, 10, 2, False, False, False)
    u, _, A, B, C = (inputs[k] for k in NAMES[:5])
    with pytest.raises(ValueError, match='delta_weight must be'):
        selective_scan(u, torch.randn(1, 2, 3, 10), A, B, C, delta_weight=torch.randn(5, 3))
    with pytest.raises(ValueError, match=r'delta must be \(batch, groups, R, L\)'):
        selective_scan(u, torch.randn(1, 1, 3, 10), A, B, C, delta_weight=torch.randn(6, 3))


@pytest.mark.skipif('cpu' not in BACKENDS, reason='numba missing')
@pytest.mark.parametrize('chunk', [1, 16])
def test_cpu_state_checkpoints_across_many_chunks(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cpu kernels checkpoint the state every ``CHUNK`` steps and the backward recomputes one chunk at a
    time from them; the default chunk (512 steps) is longer than most test sequences, so here it is made
    small: many chunks, a partial last one, a sequence shorter than one chunk (L 5 at chunk 16)."""
    monkeypatch.setattr(cpu_scan, 'CHUNK', chunk)
    assert cpu_scan._chunks(70) == -(-70 // chunk)
    for length in (5, 70):
        compare('cpu', make_inputs(2, 12, 16, length, 2, True, True, True, seed=length), softplus=True, last=True)
    for case in LOW_RANK_CASES[:2]:  # the projection inside the kernel, per chunk
        compare_low_rank('cpu', case)


@pytest.mark.skipif('cpu' not in BACKENDS, reason='numba missing')
def test_cpu_scan_threads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MAMBACSR_SCAN_THREADS`` sets the scan's threads (results identical); a bad value is one clear error."""
    inputs = make_inputs(1, 16, 16, 40, 2, True, False, True, seed=4)
    monkeypatch.delenv(cpu_scan.THREADS_ENV, raising=False)
    assert cpu_scan.scan_threads() == torch.get_num_threads()
    base = selective_scan(**inputs, delta_softplus=True, backend='cpu')
    for value in ('1', ' 3 '):
        monkeypatch.setenv(cpu_scan.THREADS_ENV, value)
        assert cpu_scan.scan_threads() == int(value)
        assert torch.equal(selective_scan(**inputs, delta_softplus=True, backend='cpu'), base)
    for bad in ('0', '-2', 'two', '1.5'):
        monkeypatch.setenv(cpu_scan.THREADS_ENV, bad)
        with pytest.raises(ValueError, match='MAMBACSR_SCAN_THREADS.*positive integer'):
            selective_scan(**inputs, delta_softplus=True, backend='cpu')
