"""The ``triton`` selective-scan backend on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1).

The same kernels run compiled on CUDA; here every output and gradient is checked against the float64
sequential recurrence of tests/test_selective_scan.py with the tolerances used for the other backends.

Triton reads TRITON_INTERPRET when it is imported, and importing torch._dynamo (which this project's
imports do) imports triton, so the interpreter tests cannot run in a pytest process started without
it: ``test_interpreter_suite`` runs this file again in a subprocess with TRITON_INTERPRET=1, where the
``@interpreted`` tests run (run this file directly with TRITON_INTERPRET=1 to see them one by one).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before anything else)
from mambacsr_arch.ops import ENV_VAR, available_backends, dispatch, resolve_backend, selective_scan, triton_scan
from test_selective_scan import CASES, NAMES, compare, make_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='triton not installed')
HAS_TRITON = importlib.util.find_spec('triton') is not None
CUDA = torch.device('cuda')
INTERPRETED = triton_scan.interpreting()  # this process was started with TRITON_INTERPRET=1
interpreted = pytest.mark.skipif(not INTERPRETED, reason='runs in the TRITON_INTERPRET=1 subprocess of '
                                                         'test_interpreter_suite')


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """No backend from the environment, availability probed afresh, choices logged afresh."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, '_AVAILABILITY', {})
    monkeypatch.setattr(dispatch, '_LOGGED', set())


@pytest.mark.skipif(INTERPRETED, reason='this is the subprocess')
def test_interpreter_suite() -> None:
    """Every @interpreted test of this file, in a process started with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_WAIT_POLICY=os.environ.get('OMP_WAIT_POLICY', 'PASSIVE'))
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-W',
                             'ignore::pytest.PytestUnraisableExceptionWarning', str(Path(__file__).resolve())],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    # in the subprocess only the three tests that need a process without the interpreter are skipped
    assert ' passed, 3 skipped' in tail, tail


@pytest.mark.skipif(INTERPRETED, reason='needs a process started without TRITON_INTERPRET')
def test_interpreter_requested_too_late_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton  # noqa: F401  (already imported by torch._dynamo; made sure here)

    monkeypatch.setenv('TRITON_INTERPRET', '1')
    reason = available_backends()['triton']
    assert reason is not None and 'set after triton had been imported' in reason
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1 in the environment before starting Python'):
        resolve_backend('cpu', 'triton')


@interpreted
@pytest.mark.parametrize('case', CASES, ids=lambda c: 'b{}d{}n{}L{}g{}'.format(*c[:5]))
def test_matches_float64_reference(case: tuple) -> None:
    """L 1, 7, 64, 65, 130, 200 (one and several chunks); N 1, 4, 16; groups 1, 2, 4; D, z, delta_bias,
    softplus, return_last_state and 3-D B/C on and off: output, last state and every gradient."""
    batch, dim, n, length, groups, D, z, bias, softplus, last, three_d = case
    inputs = make_inputs(batch, dim, n, length, groups, D, z, bias, three_d, seed=hash(case) % 1000)
    compare('triton', inputs, softplus, last)


@interpreted
def test_channels_not_filling_a_block() -> None:
    """dim / groups = 3 channels per group (a partial channel block) and N = 5 (padded states)."""
    inputs = make_inputs(2, 6, 5, 9, 2, True, True, True, seed=4)
    compare('triton', inputs, softplus=True, last=True)


@interpreted
@pytest.mark.parametrize('scale', [50.0, 1000.0])
def test_large_steps_stay_finite(scale: float) -> None:
    """delta * |A| up to ``scale`` per step: decays underflow to 0, nothing overflows (forward and backward)."""
    g = torch.Generator().manual_seed(7)
    inputs = make_inputs(1, 4, 16, 70, 1, True, True, False, seed=7)
    inputs['A'] = -torch.rand(4, 16, generator=g) - 0.01
    inputs['delta'] = torch.rand(1, 4, 70, generator=g) * scale
    compare('triton', inputs, softplus=False, last=True)


@interpreted
def test_large_softplus_arguments() -> None:
    """delta + bias from -30 to 30 through the kernel's softplus (both tails, no overflow)."""
    inputs = make_inputs(1, 4, 4, 20, 1, True, False, True, seed=8)
    inputs['delta'] = torch.linspace(-30, 30, 80).view(1, 4, 20)
    compare('triton', inputs, softplus=True, last=False)


@interpreted
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    inputs = make_inputs(2, 8, 16, 70, 2, True, True, True, seed=5)
    compare('triton', inputs, softplus=True, last=True, dtype=dtype, rtol_fwd=2e-2, rtol_grad=3e-2)


@interpreted
@pytest.mark.slow
def test_long_sequence() -> None:
    """Many chunks: the state carried forward and the adjoint carried backward across 9 chunks."""
    inputs = make_inputs(1, 4, 16, 519, 2, True, True, True, seed=16)
    compare('triton', inputs, softplus=True, last=True)


@interpreted
def test_nan_propagates() -> None:
    inputs = make_inputs(1, 4, 16, 20, 1, True, False, True, seed=2)
    inputs['u'][0, 1, 5] = float('nan')
    out = selective_scan(*(inputs[k] for k in NAMES), delta_softplus=True, backend='triton')
    assert out[0, 1, 5:].isnan().all()
    assert out[0, 1, :5].isfinite().all() and out[0, [0, 2, 3]].isfinite().all()


@interpreted
def test_autocast_keeps_float32() -> None:
    inputs = make_inputs(1, 4, 8, 20, 1, True, True, True, seed=3)
    args = [inputs[k] for k in NAMES]
    expected = selective_scan(*args, delta_softplus=True, backend='triton')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = selective_scan(*args, delta_softplus=True, backend='triton')
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@interpreted
def test_backward_memory_is_bounded() -> None:
    """Autograd keeps O(batch * dim * L) plus one state per chunk, never the (batch, dim, L, N) states."""
    batch, dim, n, length = 1, 8, 16, 256
    inputs = make_inputs(batch, dim, n, length, 2, True, True, True, seed=11)
    leaves = [v.requires_grad_() for v in (inputs[k] for k in NAMES)]
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan(*leaves, delta_softplus=True, backend='triton')
    out.sum().backward()
    states = batch * dim * length * n
    assert saved and max(saved) <= states / 4, f'largest saved tensor {max(saved)} vs states {states}'
    assert all(v.grad is not None and v.grad.isfinite().all() for v in leaves)


@interpreted
def test_empty_inputs() -> None:
    inputs = make_inputs(1, 4, 4, 0, 1, True, True, True)
    out, last = selective_scan(*(inputs[k] for k in NAMES), return_last_state=True, backend='triton')
    assert out.shape == (1, 4, 0) and last.shape == (1, 4, 4) and not last.any()


@interpreted
def test_cpu_tensors_keep_the_numba_kernel_when_interpreting() -> None:
    """The interpreter makes triton *able* to run on CPU tensors; the automatic choice stays 'cpu'/'torch'."""
    assert available_backends()['triton'] is None
    assert resolve_backend('cpu')[0] in ('cpu', 'torch')


@interpreted
def test_auto_cuda_order_prefers_triton_over_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real kernels pass their check scan (forward and every gradient, three chunks), here run on
    the CPU in place of the GPU, and are then chosen for CUDA tensors."""
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)  # mamba_ssm import fails
    monkeypatch.setattr(dispatch, '_check_device', lambda device_type: torch.device('cpu'))
    name, reason = resolve_backend(CUDA)
    assert name == 'triton' and 'mamba_ssm not importable' in reason and 'passed their check scan' in reason


@pytest.mark.skipif(INTERPRETED, reason='needs a process started without TRITON_INTERPRET')
def test_without_interpreter_cpu_tensors_are_refused() -> None:
    with pytest.raises(RuntimeError, match=r"'triton'.*needs CUDA tensors, got cpu.*TRITON_INTERPRET=1"):
        resolve_backend('cpu', 'triton')
    if not torch.cuda.is_available():
        reason = available_backends()['triton']
        assert reason is not None and 'no CUDA GPU' in reason
        name, why = resolve_backend(CUDA)
        assert name in ('mamba_ssm', 'torch')
        if name == 'torch':
            assert 'triton: no CUDA GPU' in why


@interpreted
def test_choice_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    inputs = make_inputs(1, 2, 2, 3, 1, False, False, False)
    with caplog.at_level(logging.INFO, logger='basicsr'):
        for _ in range(2):
            selective_scan(*(inputs[k] for k in NAMES[:5]), backend='triton')
    records = [r.getMessage() for r in caplog.records if 'selective_scan backend' in r.getMessage()]
    assert len(records) == 1 and 'triton' in records[0]


if HAS_TRITON:
    import triton
    import triton.language as tl

    from mambacsr_arch.ops._triton_kernels import _combine as _kernels_combine

    @triton.jit
    def _scan_tile_kernel(a_ptr, x_ptr, a_out_ptr, x_out_ptr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr,
                          CHUNK: tl.constexpr, NP: tl.constexpr):
        """One (BLOCK_D, CHUNK, NP) tile scanned along axis 1 with the kernels' own combine function, as
        ``_chunk`` (forward) and the backward's adjoint (``reverse=True``) do."""
        offs = (tl.arange(0, BLOCK_D)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, :, None]) * NP \
            + tl.arange(0, NP)[None, None, :]
        a = tl.load(a_ptr + offs)
        x = tl.load(x_ptr + offs)
        a_cum, x_cum = tl.associative_scan((a, x), axis=1, combine_fn=_kernels_combine, reverse=REVERSE)
        tl.store(a_out_ptr + offs, a_cum)
        tl.store(x_out_ptr + offs, x_cum)


def _scan_tile(a: torch.Tensor, x: torch.Tensor, reverse: bool) -> tuple:
    a_out, x_out = torch.empty_like(a), torch.empty_like(x)
    block_d, chunk, np_ = a.shape
    _scan_tile_kernel[(1,)](a, x, a_out, x_out, REVERSE=reverse, BLOCK_D=block_d, CHUNK=chunk, NP=np_)
    return a_out, x_out


def _sequential_tile(a: torch.Tensor, x: torch.Tensor, reverse: bool) -> tuple:
    """h_t = a_t h_{t-1} + x_t along axis 1 (from the far end if ``reverse``), float64, one step at a time."""
    a, x = a.double(), x.double()
    steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
    a_cum, x_cum = torch.empty_like(a), torch.empty_like(x)
    prev = None
    for t in steps:
        if prev is None:
            a_cum[:, t], x_cum[:, t] = a[:, t], x[:, t]
        else:
            a_cum[:, t], x_cum[:, t] = a_cum[:, prev] * a[:, t], a[:, t] * x_cum[:, prev] + x[:, t]
        prev = t
    return a_cum, x_cum


@pytest.fixture
def tritons_own_scan(monkeypatch: pytest.MonkeyPatch):
    """Triton's own interpreter ``tl.associative_scan`` (one combine call per element) in place of the
    project's Hillis-Steele replacement for the duration of a test."""
    from triton.runtime.interpreter import ScanOps

    triton_scan._kernels()  # applies the replacement (this process interprets)
    original = getattr(ScanOps, 'triton_generic_scan', None)
    assert original is not None, 'the replacement did not keep triton\'s own generic_scan'
    assert ScanOps.generic_scan is not original
    monkeypatch.setattr(ScanOps, 'generic_scan', original)
    return ScanOps


@interpreted
@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
def test_tritons_own_associative_scan_matches_the_replacement(reverse: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's real interpreter scan and the replacement, on the same tiles, agree with each other and
    with the sequential recurrence; the real one calls the combine function once per element."""
    from triton.runtime.interpreter import ScanOps

    g = torch.Generator().manual_seed(21)
    shape = (2, 16, 4)  # BLOCK_D, CHUNK, NP: small, the real scan is one Python call per element
    a, x = torch.rand(shape, generator=g), torch.randn(shape, generator=g)
    expected = _sequential_tile(a, x, reverse)
    triton_scan._kernels()
    replaced = _scan_tile(a, x, reverse)
    calls, combines = [], []
    own = ScanOps.triton_generic_scan

    def counting(self, inputs):
        real = self.combine_fn
        calls.append(real.fn.__name__)
        self.combine_fn = types.SimpleNamespace(fn=lambda *args: combines.append(1) or real.fn(*args))
        try:
            return own(self, inputs)
        finally:
            self.combine_fn = real

    monkeypatch.setattr(ScanOps, 'generic_scan', counting)
    tritons = _scan_tile(a, x, reverse)
    assert calls == ['_combine']  # Triton's own generic_scan ran, once, on the kernels' combine, ...
    assert len(combines) == shape[0] * (shape[1] - 1) * shape[2]  # ... element by element
    for got_own, got_replaced, want in zip(tritons, replaced, expected):
        torch.testing.assert_close(got_own.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_replaced, got_own, rtol=1e-5, atol=1e-6)


@interpreted
def test_kernels_with_tritons_own_associative_scan(tritons_own_scan) -> None:
    """The real forward and backward kernels (a forward scan per chunk, a reverse one in backward) with
    Triton's own interpreter scan: output, last state and every gradient against the float64
    recurrence, across two chunks (the second partial)."""
    length = triton_scan.CHUNK + 6
    inputs = make_inputs(1, 2, 2, length, 1, True, True, True, seed=12)
    assert triton_scan._tiling(2, 1, length, 2) == (2, triton_scan.CHUNK, 2, 2)  # BLOCK_D 2, NP 2, two chunks
    assert tritons_own_scan.generic_scan is tritons_own_scan.triton_generic_scan
    compare('triton', inputs, softplus=True, last=True)
