"""Backend selection, error messages and the mamba_ssm call convention, all on CPU with faked modules."""
from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import types
from typing import Any, Dict, List

import pytest
import torch

import mambacsr_arch  # noqa: F401
from mambacsr_arch.ops import ENV_VAR, available_backends, dispatch, mamba_ssm_backend, resolve_backend, \
    selective_scan
from mambacsr_arch.ops import cpu_scan

CUDA = torch.device('cuda')  # constructing a device needs no GPU


@pytest.fixture(autouse=True)
def fresh_state(fresh_dispatch) -> None:
    """Empty availability cache and log memory; no backend from the environment (conftest)."""


@pytest.fixture
def fake_mamba_ssm(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    """Install a fake mamba_ssm whose selective_scan_fn has the documented signature and records calls."""
    calls: List[Dict[str, Any]] = []

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        calls.append(dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus, return_last_state=return_last_state))
        out = torch.full_like(u, 2.0)
        return (out, u.new_zeros(u.shape[0], u.shape[1], A.shape[1])) if return_last_state else out

    root, ops, iface = (types.ModuleType(n) for n in
                        ('mamba_ssm', 'mamba_ssm.ops', 'mamba_ssm.ops.selective_scan_interface'))
    iface.selective_scan_fn = selective_scan_fn
    root.ops, ops.selective_scan_interface = ops, iface
    for module in (root, ops, iface):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls


@pytest.fixture
def no_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import numba`` fail as if it were not installed."""
    monkeypatch.setitem(sys.modules, 'numba', None)
    monkeypatch.delitem(sys.modules, 'mambacsr_arch.ops._cpu_kernels', raising=False)
    monkeypatch.setattr(cpu_scan, '_KERNELS', None)


def small_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 4, 9, generator=g).to(dtype)
    return (u, torch.rand(1, 4, 9, generator=g).to(dtype), -torch.rand(4, 3, generator=g),
            torch.randn(1, 2, 3, 9, generator=g).to(dtype), torch.randn(1, 2, 3, 9, generator=g).to(dtype))


def test_auto_cpu_uses_numba_kernel() -> None:
    if available_backends()['cpu'] is not None:
        pytest.skip('numba missing here')
    assert resolve_backend('cpu')[0] == 'cpu'
    assert resolve_backend(None)[0] == 'cpu'


def test_auto_cuda_without_mamba_ssm_uses_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)  # import fails
    name, reason = resolve_backend(CUDA)
    assert name == 'torch'
    assert 'mamba_ssm not importable' in reason and 'pip install --no-build-isolation mamba-ssm' in reason


def test_auto_cuda_with_mamba_ssm_needs_its_check(fake_mamba_ssm, monkeypatch: pytest.MonkeyPatch) -> None:
    """An importable mamba_ssm is not enough: this fake's scan (all 2.0) fails the check scan, so CUDA
    tensors get torch; tests/test_backend_probes.py has the passing and failing stand-ins."""
    assert available_backends()['mamba_ssm'] is None  # the import probe alone passes
    monkeypatch.setattr(dispatch, '_check_device', lambda device_type: torch.device('cpu'))
    name, reason = resolve_backend(CUDA)
    assert name == 'torch' and 'mamba_ssm: its check scan on cpu is wrong: output differs' in reason


def test_other_devices_use_torch() -> None:
    assert resolve_backend(torch.device('mps'))[0] == 'torch'


def test_env_var_and_argument_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, 'reference')
    name, reason = resolve_backend('cpu')
    assert name == 'reference' and ENV_VAR in reason
    name, reason = resolve_backend('cpu', 'torch')
    assert name == 'torch' and 'argument' in reason


def test_env_var_is_used_by_selective_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = dispatch.reference.scan_core

    def recording(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dispatch.reference, 'scan_core', recording)
    monkeypatch.setenv(ENV_VAR, 'reference')
    selective_scan(*small_inputs())
    assert calls == [1]


def test_unknown_backend_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown selective-scan backend 'cuda'.*mamba_ssm, cpu, torch"):
        resolve_backend('cpu', 'cuda')
    monkeypatch.setenv(ENV_VAR, 'fast')
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend('cpu')


def test_explicit_mamba_ssm_missing_names_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)
    with pytest.raises(RuntimeError, match=r'mamba_ssm.*pip install --no-build-isolation mamba-ssm'):
        resolve_backend(CUDA, 'mamba_ssm')
    monkeypatch.setenv(ENV_VAR, 'mamba_ssm')
    with pytest.raises(RuntimeError, match=ENV_VAR):
        resolve_backend(CUDA)


def test_wrong_device_for_explicit_backend(fake_mamba_ssm) -> None:
    with pytest.raises(RuntimeError, match='needs CUDA tensors'):
        resolve_backend('cpu', 'mamba_ssm')
    with pytest.raises(RuntimeError, match='needs CPU tensors'):
        resolve_backend(CUDA, 'cpu')


def test_missing_numba_falls_back_to_torch(no_numba) -> None:
    reason = available_backends()['cpu']
    assert reason is not None and 'numba not importable' in reason and 'pip install' in reason
    name, why = resolve_backend('cpu')
    assert name == 'torch' and 'numba' in why
    with pytest.raises(RuntimeError, match='numba.*pip install'):
        resolve_backend('cpu', 'cpu')
    out = selective_scan(*small_inputs())  # still works, on the torch backend
    assert out.shape == (1, 4, 9) and out.isfinite().all()


def test_choice_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger='basicsr'):
        selective_scan(*small_inputs(), backend='torch')
        selective_scan(*small_inputs(), backend='torch')
    records = [r for r in caplog.records if 'selective_scan backend' in r.getMessage()]
    assert len(records) == 1 and 'torch' in records[0].getMessage()


def test_mamba_ssm_call_convention(fake_mamba_ssm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arguments reach selective_scan_fn by their documented names, in float32; output gets u's dtype."""
    fake = sys.modules['mamba_ssm.ops.selective_scan_interface'].selective_scan_fn
    expected = ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias', 'delta_softplus', 'return_last_state']
    assert list(inspect.signature(fake).parameters) == expected
    monkeypatch.setattr(dispatch, 'resolve_backend', lambda device, backend=None: ('mamba_ssm', 'faked'))
    u, delta, A, B, C = small_inputs(torch.bfloat16)
    D, z, bias = torch.ones(4), torch.randn(1, 4, 9).bfloat16(), torch.zeros(4)
    out, last = selective_scan(u, delta, A, B[:, 0], C[:, 0], D, z, bias, True, True)
    assert out.dtype == torch.bfloat16 and last.shape == (1, 4, 3)
    assert len(fake_mamba_ssm) == 1
    call = fake_mamba_ssm[0]
    assert call['delta_softplus'] is True and call['return_last_state'] is True
    assert call['B'].shape == (1, 1, 3, 9)  # (batch, N, L) becomes one group, as mamba_ssm does
    for key in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias'):
        assert call[key].dtype == torch.float32, key
    torch.testing.assert_close(call['z'], z.float())
    out = selective_scan(*small_inputs())
    assert torch.equal(out, torch.full_like(out, 2.0)) and fake_mamba_ssm[-1]['D'] is None


def test_broken_mamba_ssm_extension_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """mamba_ssm installed but its CUDA extension fails to load: reported, not raised."""
    broken = types.ModuleType('mamba_ssm.ops.selective_scan_interface')

    def __getattr__(name):  # noqa: N807
        raise OSError('libcudart.so.12: cannot open shared object file')

    monkeypatch.setitem(sys.modules, 'mamba_ssm', types.ModuleType('mamba_ssm'))
    monkeypatch.setitem(sys.modules, 'mamba_ssm.ops', types.ModuleType('mamba_ssm.ops'))
    monkeypatch.setitem(sys.modules, broken.__name__, broken)
    broken.__getattr__ = __getattr__
    reason = mamba_ssm_backend.unavailable_reason()
    assert reason is not None and 'libcudart' in reason and 'pip install' in reason
    assert resolve_backend(CUDA)[0] == 'torch'


@pytest.mark.slow
def test_import_does_not_load_mamba_ssm_or_numba() -> None:
    code = ('import sys, mambacsr_arch, mambacsr_arch.ops; '
            "print(sorted(m for m in ('mamba_ssm', 'numba') if m in sys.modules))")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == '[]'


def test_cpu_kernel_failure_names_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    if available_backends()['cpu'] is not None:
        pytest.skip('numba missing here')

    def broken(lo, hi, *args):
        raise ValueError('LLVM ERROR: unsupported CPU')

    monkeypatch.setattr(cpu_scan._kernels(), 'scan_forward', broken)
    with pytest.raises(RuntimeError, match='unsupported CPU.*MAMBACSR_SCAN_BACKEND=torch'):
        selective_scan(*small_inputs(), backend='cpu')


@pytest.mark.skipif(available_backends()['cpu'] is not None, reason='numba missing')
@pytest.mark.parametrize('spinning', [True, False])
def test_cpu_scan_says_once_when_openmp_threads_spin(spinning: bool, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """torch imported before mambacsr_arch without OMP_WAIT_POLICY: idle OpenMP threads spin beside the
    scan's pool; its first multi-threaded call says so, with the fix, once per process."""
    monkeypatch.setattr(mambacsr_arch._threads, 'OMP_THREADS_SPIN', spinning)
    monkeypatch.setattr(cpu_scan, '_SPIN_NOTED', False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        u = torch.randn(1, 16, 40)
        with caplog.at_level(logging.WARNING, logger='basicsr'):
            for _ in range(2):
                selective_scan(u, torch.rand(1, 16, 40), -torch.rand(16, 4), torch.randn(1, 4, 40),
                               torch.randn(1, 4, 40), backend='cpu')
    finally:
        torch.set_num_threads(previous)
    records = [r for r in caplog.records if 'OMP_WAIT_POLICY' in r.getMessage()]
    assert len(records) == (1 if spinning else 0)
    if spinning:
        assert 'OMP_WAIT_POLICY=PASSIVE' in records[0].getMessage() and 'before torch' in records[0].getMessage()


def test_package_import_sets_the_thread_policy_only_before_torch() -> None:
    """A fresh interpreter: importing mambacsr_arch first sets PASSIVE (no spin flag); importing torch first
    leaves the environment alone and raises the flag the cpu scan reports."""
    code = ('import os, sys; os.environ.pop("OMP_WAIT_POLICY", None); first = sys.argv[1]\n'
            'import importlib; importlib.import_module(first)\n'
            'import mambacsr_arch\n'
            'print(os.environ.get("OMP_WAIT_POLICY"), mambacsr_arch.OMP_THREADS_SPIN)')
    env = {k: v for k, v in __import__('os').environ.items() if k != 'OMP_WAIT_POLICY'}
    outputs = [subprocess.run([sys.executable, '-c', code, first], capture_output=True, text=True, env=env,
                              check=True).stdout.split() for first in ('mambacsr_arch', 'torch')]
    assert outputs == [['PASSIVE', 'False'], ['None', 'True']]
