"""torch.compile of MambaCSR on CPU: no graph break in the scan, compiled == eager (outputs and gradients),
the cpu backend's custom operators pass torch.library.opcheck, errors and logging as in eager mode."""
from __future__ import annotations

import logging
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F

import mambacsr_arch  # noqa: F401  (shims before anything else)
from mambacsr_arch.archs.mambacsr.arch import MambaCSR
from mambacsr_arch.ops import ENV_VAR, available_backends, cpu_scan, dispatch, selective_scan

HAS_NUMBA = available_backends()['cpu'] is None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason='numba missing here')
TINY = dict(img_size=16, embed_dim=24, depths=[1], depths2=[1], d_state=4, mlp_ratio=1., upscale=2, scan_size=8)


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch):
    """Nothing compiled by another test, no backend from the environment."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(cross_scale: bool = False, train: bool = True) -> MambaCSR:
    torch.manual_seed(0)
    return MambaCSR(**TINY, cross_scale_scan=cross_scale).train(train)


def breaks_in(explained, part: str) -> List[str]:
    """Graph-break reasons whose user stack passes through a file path containing ``part``."""
    return [r.reason.splitlines()[0] for r in explained.break_reasons
            if any(part in frame.filename.replace('\\', '/') for frame in r.user_stack)]


@pytest.mark.parametrize('backend', [pytest.param('cpu', marks=needs_numba), 'torch'])
def test_no_graph_break_in_mambacsr(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Training-mode forward of one image: the whole network, scans included, is one graph."""
    monkeypatch.setenv(ENV_VAR, backend)
    explained = torch._dynamo.explain(tiny_model())(torch.rand(1, 3, 12, 10))
    assert explained.graph_break_count == 0, [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1


@needs_numba
def test_no_graph_break_in_cross_scale_inference() -> None:
    with torch.no_grad():
        explained = torch._dynamo.explain(tiny_model(cross_scale=True, train=False))(torch.rand(1, 3, 12, 12))
    assert explained.graph_break_count == 0, [r.reason.splitlines()[0] for r in explained.break_reasons]


@needs_numba
@pytest.mark.slow
@pytest.mark.parametrize('cross_scale', [False, True], ids=['window', 'cross_scale'])
def test_no_graph_break_in_the_scan_of_a_training_batch(cross_scale: bool) -> None:
    """Batch 2 in training mode: Dynamo also traces SS2D's hand-written backwards; none of its graph
    breaks may come from the selective scan (mambacsr_arch/ops)."""
    explained = torch._dynamo.explain(tiny_model(cross_scale))(torch.rand(2, 3, 12, 10))
    assert breaks_in(explained, 'mambacsr_arch/ops/') == []


def scan_inputs(seed: int, length: int, full: bool, dtype=torch.float32):
    """selective_scan arguments (u, delta, A, B, C, D, z, delta_bias): 2 groups of 3 channels, N=5."""
    g = torch.Generator().manual_seed(seed)
    batch, dim, groups, n = 2, 6, 2, 5
    tensors = [torch.randn(batch, dim, length, generator=g).to(dtype), torch.randn(batch, dim, length, generator=g),
               -torch.rand(dim, n, generator=g) - 0.1, torch.randn(batch, groups, n, length, generator=g),
               torch.randn(batch, groups, n, length, generator=g)]
    extra = [torch.randn(dim, generator=g), torch.randn(batch, dim, length, generator=g),
             torch.randn(dim, generator=g)] if full else [None, None, None]
    return [t if t is None else t.requires_grad_() for t in tensors + extra]


def scan_loss_and_grads(fn, inputs: List[Optional[torch.Tensor]]):
    out, last = fn(*inputs)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum() + last.square().sum()
    present = [t for t in inputs if t is not None]
    return (out.detach(), last.detach()), torch.autograd.grad(loss, present)


@needs_numba
@pytest.mark.parametrize('full', [True, False], ids=['D_z_bias', 'bare'])
def test_compiled_scan_matches_eager_at_two_lengths(full: bool) -> None:
    """aot_eager runs AOTAutograd over the custom ops' fake shapes and autograd formula; dynamic=True
    checks the fake shapes with symbolic lengths (one graph for 70 and 130 steps, 2 and 3 chunks)."""
    def run(u, delta, A, B, C, D, z, bias):
        return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True,
                              backend='cpu')

    compiled = torch.compile(run, backend='aot_eager', dynamic=True, fullgraph=True)
    for seed, length in ((0, 70), (1, 130)):
        inputs = scan_inputs(seed, length, full)
        (out, last), grads = scan_loss_and_grads(run, inputs)
        (cout, clast), cgrads = scan_loss_and_grads(compiled, inputs)
        torch.testing.assert_close(cout, out, rtol=0, atol=1e-5)
        torch.testing.assert_close(clast, last, rtol=0, atol=1e-5)
        for got, want in zip(cgrads, grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def model_grads(model: torch.nn.Module, forward, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = forward(x)
    (out - x.mean()).square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_compiled_training_matches(backend: str, batch: int) -> None:
    model = tiny_model()
    x = torch.rand(batch, 3, 12, 10)
    out, grads = model_grads(model, model, x)
    cout, cgrads = model_grads(model, torch.compile(model, backend=backend), x)
    torch.testing.assert_close(cout, out, rtol=0, atol=1e-5)
    assert cgrads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(cgrads[name], grad, rtol=0, atol=1e-5, msg=lambda m: f'{name}: {m}')


@needs_numba
def test_compiled_training_step_matches_eager_aot() -> None:
    """One image (one graph; batch 2 in the scan-level test above and the inductor test)."""
    assert_compiled_training_matches('aot_eager', batch=1)


@needs_numba
@pytest.mark.slow
def test_compiled_training_step_matches_eager_inductor() -> None:
    """The real compiler (C++ kernels around the numba custom ops); 50-80 s cold, about 10 s with its on-disk cache."""
    assert_compiled_training_matches('inductor', batch=2)


@needs_numba
@pytest.mark.parametrize('full, low_rank', [(True, False), (False, False), (True, True)],
                         ids=['D_z_bias', 'bare', 'low_rank_delta'])
def test_custom_ops_pass_opcheck(full: bool, low_rank: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema, fake shapes, autograd registration and AOT dispatch of both custom ops (with a dense delta
    and with a low-rank delta projected in the kernel), with several state checkpoints (chunks of 32 steps)."""
    monkeypatch.setattr(cpu_scan, 'CHUNK', 32)
    g = torch.Generator().manual_seed(0)
    batch, dim, groups, length, padded, rank = 2, 4, 2, 70, cpu_scan._kernels().W, 3

    def states(*shape):
        return F.pad(torch.randn(*shape, 3, generator=g), (0, padded - 3)).requires_grad_()

    delta = (torch.randn(batch * groups, rank, length, generator=g) if low_rank else
             torch.rand(batch * dim, length, generator=g)).requires_grad_()
    fwd_args = (torch.randn(batch * dim, length, generator=g).requires_grad_(), delta,
                (-F.pad(torch.rand(dim, 3, generator=g), (0, padded - 3))).requires_grad_(),
                states(batch * groups, length), states(batch * groups, length),
                torch.randn(dim, generator=g).requires_grad_() if full else None,
                torch.randn(batch * dim, length, generator=g).requires_grad_() if full else None,
                torch.randn(dim, generator=g).requires_grad_() if full else None, full,
                (0.3 * torch.randn(dim, rank, generator=g)).requires_grad_() if low_rank else None)
    torch.library.opcheck(cpu_scan._scan_fwd, fwd_args)
    out, last, ckpt = cpu_scan._scan_fwd(*fwd_args)
    assert ckpt.shape == (batch * dim, 3, padded)
    bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args) + \
        (ckpt.detach(), torch.randn_like(out), torch.randn_like(last))
    torch.library.opcheck(cpu_scan._scan_bwd, bwd_args)


@needs_numba
def test_double_backward_says_what_to_use() -> None:
    u, delta, A, B, C, *_ = scan_inputs(0, 9, full=False)
    out = selective_scan(u, delta, A, B, C, delta_softplus=True, backend='cpu')
    grad_u, = torch.autograd.grad(out.square().sum(), u, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once .*backend='torch'"):
        grad_u.sum().backward()


@pytest.mark.parametrize('backend, error, message', [
    ('mamba_ssm', RuntimeError, "'mamba_ssm' \\(from backend= argument\\) needs CUDA tensors, got cpu"),
    ('nope', ValueError, "unknown selective-scan backend 'nope'.*choose one of"),
])
def test_impossible_request_raises_the_eager_error_under_compile(backend, error, message) -> None:
    """Not Dynamo's InternalTorchDynamoError wrapper: the same exception type and message as eager mode."""
    u, delta, A, B, C, *_ = scan_inputs(0, 9, full=False)
    compiled = torch.compile(lambda *t: selective_scan(*t, backend=backend), backend='eager')
    with pytest.raises(error, match=message) as raised:
        compiled(u, delta, A, B, C)
    assert type(raised.value) is error


def test_choice_logged_once_under_compile(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(dispatch, '_LOGGED', set())
    u, delta, A, B, C, *_ = scan_inputs(0, 9, full=False)
    compiled = torch.compile(lambda *t: selective_scan(*t), backend='eager', fullgraph=True)
    with caplog.at_level(logging.INFO, logger='basicsr'):
        for fn in (compiled, compiled, lambda *t: selective_scan(*t)):
            fn(u, delta, A, B, C)
    records = [r.getMessage() for r in caplog.records if 'selective_scan backend' in r.getMessage()]
    assert len(records) == 1, records
    assert records[0].startswith(f"selective_scan backend for cpu tensors: {'cpu' if HAS_NUMBA else 'torch'} (")
