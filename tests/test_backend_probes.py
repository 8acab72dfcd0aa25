"""The GPU backends (mamba_ssm, triton) are chosen only after a check scan of forward and every gradient.

No GPU is needed: stand-in ``mamba_ssm`` packages go into sys.modules, a stand-in scan replaces the Triton
kernels' entry point, and the check scan that would run on the GPU is pointed at the CPU by patching
``dispatch._check_device``. The stand-ins compute with this package's ``torch`` backend (right) or
break it on purpose (a raising call, a wrong gradient).
"""
from __future__ import annotations

import logging
import sys
import types
from typing import Any, Callable, List

import pytest
import torch

import mambacsr_arch  # noqa: F401
from mambacsr_arch.cli import env
from mambacsr_arch.ops import available_backends, dispatch, mamba_ssm_backend, reference, \
    resolve_backend, selective_scan, triton_scan

CUDA = torch.device('cuda')  # constructing a device needs no GPU
SHORT = 70  # mamba_ssm's check length in most tests here (its real one, 4133, takes seconds on a CPU)


@pytest.fixture(autouse=True)
def fresh_state(fresh_dispatch) -> None:
    """Probes and checks afresh, nothing logged yet, no backend from the environment (conftest)."""


@pytest.fixture
def check_on_cpu(monkeypatch: pytest.MonkeyPatch) -> List[torch.device]:
    """The check scan for CUDA tensors runs on the CPU; records each device type it was asked for."""
    asked: List[torch.device] = []

    def device(device_type: str) -> torch.device:
        asked.append(device_type)
        return torch.device('cpu')

    monkeypatch.setattr(dispatch, '_check_device', device)
    monkeypatch.setattr(mamba_ssm_backend, 'CHECK_LENGTH', SHORT)
    return asked


def right_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """mamba_ssm's selective_scan_fn, computed by this package's torch backend."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend='torch')


class _DoubleGrad(torch.autograd.Function):
    """Identity whose backward doubles the gradient: a kernel with a wrong backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


def install_mamba_ssm(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Any], **module_attrs: Any) -> List[int]:
    """A stand-in mamba_ssm package whose selective_scan_fn is ``fn``; returns its call log."""
    calls: List[int] = []

    def selective_scan_fn(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fn(*args, **kwargs)

    root, ops, iface = (types.ModuleType(n) for n in
                        ('mamba_ssm', 'mamba_ssm.ops', 'mamba_ssm.ops.selective_scan_interface'))
    iface.selective_scan_fn = selective_scan_fn
    for key, value in module_attrs.items():
        setattr(iface, key, value)
    root.ops, ops.selective_scan_interface = ops, iface
    for module in (root, ops, iface):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls


def no_triton_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_scan, 'unavailable_reason', lambda: 'no CUDA GPU visible (stand-in)')


def test_good_mamba_ssm_is_chosen_after_its_check(monkeypatch: pytest.MonkeyPatch, check_on_cpu) -> None:
    calls = install_mamba_ssm(monkeypatch, right_scan)
    assert resolve_backend(CUDA) == ('mamba_ssm', 'CUDA tensors and mamba_ssm passed its check scan')
    assert calls == [1] and check_on_cpu == ['cuda']
    assert resolve_backend(CUDA)[0] == 'mamba_ssm' and resolve_backend(CUDA, 'mamba_ssm')[0] == 'mamba_ssm'
    assert calls == [1] and check_on_cpu == ['cuda']  # once per process (and device type), then cached
    assert available_backends('cuda')['mamba_ssm'] is None


def test_check_is_not_run_for_cpu_tensors_or_at_import(monkeypatch: pytest.MonkeyPatch, check_on_cpu) -> None:
    calls = install_mamba_ssm(monkeypatch, right_scan)
    assert available_backends()['mamba_ssm'] is None  # the import probe runs no scan
    resolve_backend('cpu')
    assert calls == [] and check_on_cpu == []


def test_extension_missing_is_found_by_the_probe(monkeypatch: pytest.MonkeyPatch, check_on_cpu) -> None:
    """Newer mamba_ssm: the module imports with ``selective_scan_cuda = None``; named before any scan."""
    def raising(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError('selective_scan_cuda is not installed')

    calls = install_mamba_ssm(monkeypatch, raising, selective_scan_cuda=None)
    reason = available_backends()['mamba_ssm']
    assert reason is not None and 'selective_scan_cuda is not installed' in reason
    assert 'MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation' in reason
    name, why = resolve_backend(CUDA)
    assert name == 'torch' and 'MAMBA_FORCE_BUILD=TRUE' in why
    assert calls == [] and check_on_cpu == []


def test_call_raising_is_found_by_the_check(monkeypatch: pytest.MonkeyPatch, check_on_cpu,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The module imports and has selective_scan_fn, the call raises: skipped, said once, with the fix."""
    def raising(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError('selective_scan_cuda is not installed')

    calls = install_mamba_ssm(monkeypatch, raising)
    with caplog.at_level(logging.WARNING, logger='basicsr'):
        name, why = resolve_backend(CUDA)
        resolve_backend(CUDA)
    assert name == 'torch'
    assert 'mamba_ssm: its check scan on cpu failed (RuntimeError: selective_scan_cuda is not installed)' in why
    assert 'MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-cache-dir' in why
    warnings = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
    assert len(warnings) == 1 and 'mamba_ssm skipped for cuda tensors' in warnings[0]
    assert calls == [1]
    with pytest.raises(RuntimeError, match=r"'mamba_ssm' requested by backend= argument is unavailable: "
                                           r'its check scan.*selective_scan_cuda is not installed.*MAMBA_FORCE_BUILD'):
        resolve_backend(CUDA, 'mamba_ssm')


@pytest.mark.parametrize('wrong', ['B', 'delta_bias', 'z'])
def test_wrong_gradient_is_found_by_the_check(wrong: str, monkeypatch: pytest.MonkeyPatch, check_on_cpu) -> None:
    """Forward right, one gradient doubled: the check names that gradient and the backend is skipped."""
    def wrong_backward(*args: Any, **kwargs: Any) -> Any:
        names = list(reference.CHECK_NAMES)
        args = list(args)
        if wrong in kwargs:
            kwargs[wrong] = _DoubleGrad.apply(kwargs[wrong])
        else:
            args[names.index(wrong)] = _DoubleGrad.apply(args[names.index(wrong)])
        return right_scan(*args, **kwargs)

    install_mamba_ssm(monkeypatch, wrong_backward)
    name, why = resolve_backend(CUDA)
    assert name == 'torch' and f'mamba_ssm: its check scan on cpu is wrong: gradient of {wrong} differs' in why
    with pytest.raises(RuntimeError, match=f'gradient of {wrong} differs'):
        resolve_backend(CUDA, 'mamba_ssm')


def test_check_compares_every_gradient() -> None:
    """Each input's gradient, on its own, is compared: doubling any one of them fails the check."""
    cpu = torch.device('cpu')
    assert reference.check_scan(right_scan, cpu, SHORT) is None
    for index, name in enumerate(reference.CHECK_NAMES):
        def run(*args: Any, index: int = index) -> Any:
            args = list(args)
            args[index] = _DoubleGrad.apply(args[index])
            return right_scan(*args)

        problem = reference.check_scan(run, cpu, SHORT)
        assert problem is not None and problem.startswith(f'gradient of {name} differs'), (name, problem)


def test_check_catches_wrong_forward_and_missing_gradient() -> None:
    cpu = torch.device('cpu')

    def no_softplus(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        return right_scan(u, delta, A, B, C, D, z, delta_bias, False, return_last_state)

    assert reference.check_scan(no_softplus, cpu, SHORT).startswith('output differs')

    def detached_C(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        return right_scan(u, delta, A, B, C.detach(), D, z, delta_bias, delta_softplus, return_last_state)

    assert reference.check_scan(detached_C, cpu, SHORT) == 'no gradient for C'


def test_check_runs_inside_inference_mode(monkeypatch: pytest.MonkeyPatch, check_on_cpu) -> None:
    """The first scan of a run may come from inference: the check still gets its gradients."""
    install_mamba_ssm(monkeypatch, right_scan)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert resolve_backend(CUDA)[0] == 'mamba_ssm'


def test_without_gpu_cuda_check_is_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip('a GPU is visible here')
    calls = install_mamba_ssm(monkeypatch, right_scan)
    name, why = resolve_backend(CUDA)
    assert name == 'torch' and 'mamba_ssm: not checked: no CUDA GPU visible' in why and calls == []


@pytest.mark.slow
def test_real_check_length_crosses_mamba_ssm_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default check: 2 * 2048 + 37 steps (two of mamba_ssm's chunk boundaries), all gradients."""
    assert mamba_ssm_backend.CHECK_LENGTH > 2 * mamba_ssm_backend.KERNEL_CHUNK
    seen: List[int] = []

    def recording(u, *args: Any, **kwargs: Any) -> Any:
        seen.append(u.shape[-1])
        return right_scan(u, *args, **kwargs)

    install_mamba_ssm(monkeypatch, recording)
    assert mamba_ssm_backend.check(torch.device('cpu')) is None
    assert seen == [mamba_ssm_backend.CHECK_LENGTH]


def stand_in_triton(monkeypatch: pytest.MonkeyPatch, scan: Callable[..., Any]) -> List[int]:
    """triton's probe passes and its kernels' entry point is ``scan`` (the real check calls it)."""
    lengths: List[int] = []

    def recording(u, *args: Any) -> Any:
        lengths.append(u.shape[-1])
        return scan(u, *args)

    monkeypatch.setattr(triton_scan, 'unavailable_reason', lambda: None)
    monkeypatch.setattr(triton_scan, 'scan', recording)
    monkeypatch.setitem(sys.modules, 'mamba_ssm', None)  # mamba_ssm missing: triton is next
    return lengths


def test_triton_chosen_after_its_check(monkeypatch: pytest.MonkeyPatch, check_on_cpu) -> None:
    assert triton_scan.CHECK_LENGTH > 2 * triton_scan.CHUNK  # crosses two chunk boundaries of the kernel
    lengths = stand_in_triton(monkeypatch, lambda *args: right_scan(*args))
    name, why = resolve_backend(CUDA)
    assert name == 'triton' and why.startswith('CUDA tensors and the Triton kernels passed their check scan')
    assert lengths == [triton_scan.CHECK_LENGTH]
    resolve_backend(CUDA)
    assert lengths == [triton_scan.CHECK_LENGTH]  # cached


def test_triton_wrong_gradient_skipped(monkeypatch: pytest.MonkeyPatch, check_on_cpu) -> None:
    def wrong(u, delta, A, B, C, D, z, delta_bias, softplus, last):
        return right_scan(u, _DoubleGrad.apply(delta), A, B, C, D, z, delta_bias, softplus, last)

    stand_in_triton(monkeypatch, wrong)
    name, why = resolve_backend(CUDA)
    assert name == 'torch' and 'triton: its check scan on cpu is wrong: gradient of delta differs' in why


def test_env_shows_why_a_backend_is_skipped(monkeypatch: pytest.MonkeyPatch, check_on_cpu) -> None:
    def raising(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError('selective_scan_cuda is not installed')

    install_mamba_ssm(monkeypatch, raising)
    no_triton_gpu(monkeypatch)
    report = env.collect()
    text = env.format_report(report)
    line = next(line for line in text.splitlines() if line.strip().startswith('mamba_ssm'))
    assert 'skipped for CUDA tensors: its check scan on cpu failed' in line and 'MAMBA_FORCE_BUILD' in line
    assert report['scan_backend_cuda'][0] == 'torch'

