"""``mambacsr_arch.ops.use_backend``: the scan backend as one scoped setting (models store none).

Selection rule: ``backend=`` argument > innermost ``use_backend`` block > MAMBACSR_SCAN_BACKEND > automatic.
"""
from __future__ import annotations

from typing import List

import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from mambacsr_arch.archs.mambacsr.arch import MambaCSR
from mambacsr_arch.archs.mambacsr.ss2d import SS2D
from mambacsr_arch.ops import ENV_VAR, dispatch, reference, resolve_backend, selective_scan, torch_scan, use_backend

TINY = dict(img_size=16, embed_dim=24, depths=[1], depths2=[1], d_state=4, mlp_ratio=1., upscale=2)


@pytest.fixture(autouse=True)
def no_env_backend(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield
    assert dispatch._SCOPED == [], 'a use_backend block leaked out of its test'


def _automatic() -> str:
    return resolve_backend('cpu')[0]


def test_nested_blocks_innermost_wins_and_each_exit_restores():
    automatic = _automatic()
    assert automatic in ('cpu', 'torch')
    with use_backend('torch'):
        assert resolve_backend('cpu') == ('torch', 'requested by use_backend()')
        with use_backend('reference'):
            assert resolve_backend('cpu')[0] == 'reference'
            assert resolve_backend('cpu', backend='torch')[0] == 'torch'  # the argument beats the block
        assert resolve_backend('cpu')[0] == 'torch'
    assert _automatic() == automatic


def test_an_exception_leaves_the_block():
    with pytest.raises(KeyError):
        with use_backend('reference'):
            raise KeyError('boom')
    assert dispatch._SCOPED == []


def test_the_block_beats_the_environment_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV_VAR, 'torch')
    assert resolve_backend('cpu')[0] == 'torch'
    with use_backend('reference'):
        assert resolve_backend('cpu')[0] == 'reference'


def test_none_inside_a_block_is_automatic_even_with_the_environment_variable(monkeypatch: pytest.MonkeyPatch):
    automatic = _automatic()
    monkeypatch.setenv(ENV_VAR, 'reference')
    assert resolve_backend('cpu')[0] == 'reference'
    with use_backend(None):
        name, why = resolve_backend('cpu')
        assert name == automatic and ENV_VAR not in why
    with use_backend('torch'), use_backend(None):  # an inner "automatic" block overrides an outer one too
        assert resolve_backend('cpu')[0] == automatic


def test_unknown_name_is_refused_on_entry():
    with pytest.raises(ValueError, match=r"unknown selective-scan backend 'nope'; choose one of .*reference"):
        with use_backend('nope'):
            pytest.fail('the block ran')  # pragma: no cover


def _count_reference_calls(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    calls = []
    original = reference.scan_core

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, 'scan_core', counted)
    return calls


@pytest.mark.parametrize('cross_scale', [False, True], ids=['window', 'cross_scale'])
def test_a_whole_mambacsr_forward_in_a_block_uses_that_backend(monkeypatch: pytest.MonkeyPatch, cross_scale: bool):
    calls = _count_reference_calls(monkeypatch)
    torch_calls = []
    original_torch = torch_scan.scan_core
    monkeypatch.setattr(torch_scan, 'scan_core', lambda *a, **k: torch_calls.append(1) or original_torch(*a, **k))
    torch.manual_seed(0)
    net = MambaCSR(**TINY, cross_scale_scan=cross_scale).eval()
    mixers = sum(isinstance(m, SS2D) for m in net.modules())
    assert mixers == (2 + 1 if cross_scale else 1)  # layers, layers2 and the fusion block
    x = torch.rand(1, 3, 8, 6)
    with torch.no_grad():
        automatic = net(x)
        assert calls == []
        with use_backend('reference'):
            pinned = net(x)
        assert len(calls) == mixers and torch_calls == []  # every mixer, and only the reference backend
        with use_backend('torch'):
            portable = net(x)
        assert len(calls) == mixers and len(torch_calls) == mixers
    torch.testing.assert_close(pinned, automatic, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(portable, automatic, rtol=1e-4, atol=1e-5)


def test_a_graph_compiled_inside_a_block_keeps_its_choice(monkeypatch: pytest.MonkeyPatch):
    """Dynamo reads the backend while tracing: compiled inside ``use_backend('reference')``, the graph
    keeps the reference scan after the block (a recognisable fake core makes the choice visible)."""
    monkeypatch.setattr(reference, 'scan_core', lambda u, *args: (torch.full_like(u, 7.), None))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    a, b, c = -torch.rand(4, 3, generator=g), torch.randn(1, 3, 6, generator=g), torch.randn(1, 3, 6, generator=g)

    def scan(u, delta, a, b, c):
        return selective_scan(u, delta, a, b, c)

    try:
        compiled = torch.compile(scan, backend='eager', fullgraph=True)
        with use_backend('reference'):
            assert torch.equal(compiled(u, delta, a, b, c), torch.full_like(u, 7.))
        assert not torch.equal(scan(u, delta, a, b, c), torch.full_like(u, 7.))  # eager: automatic again
        assert torch.equal(compiled(u, delta, a, b, c), torch.full_like(u, 7.))  # compiled: the traced choice
    finally:
        torch._dynamo.reset()
