"""``basicsr env``: what this installation can run, and how to fix what it cannot.

Prints versions (python, torch, torchvision, basicsr, numba, triton, opencv, this plugin), CUDA and
the GPU list, the selective-scan backends with the result of each GPU backend's check scan (forward
and gradients against the float64 reference, run here on the GPU; "not checked" without one) and the
reason a backend is skipped, the backend chosen for CPU and CUDA tensors and why (for CUDA tensors
also without a GPU: what a GPU run here would use), the cpu scan's thread count and its source, the optional
packages that are missing with the command that installs them, and the loaded plugins.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
from typing import Dict, List, Tuple

# optional package (import name) -> (what it enables, how to install)
OPTIONAL_PACKAGES: Dict[str, Tuple[str, str]] = {
    'mamba_ssm': ('CUDA selective-scan kernel', 'pip install --no-build-isolation mamba-ssm (the [cuda] extra)'),
    'numba': ('fast CPU selective-scan kernel', 'pip install numba'),
    'triton': ('CUDA selective-scan kernels without mamba_ssm', 'a CUDA build of PyTorch ships it'),
    'lmdb': ('LMDB datasets', 'pip install lmdb'),
    'tensorboard': ('use_tb_logger: true', 'pip install tensorboard'),
}


def _version(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - reported, e.g. torchvision/torch mismatch
        return f'not importable ({type(err).__name__}: {err})'
    return str(getattr(module, '__version__', 'unknown'))


def _installed(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ValueError:  # already in sys.modules without a spec (a module built at run time): present
        return module_name in sys.modules and sys.modules[module_name] is not None


def _gpus() -> List[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [f'cuda:{i} {torch.cuda.get_device_name(i)}' for i in range(torch.cuda.device_count())]


def _resolve(device_type: str) -> Tuple[str, str]:
    """(backend, reason) for a device; a misconfigured request is reported, not raised."""
    import torch

    from mambacsr_arch import ops

    try:
        return ops.resolve_backend(torch.device(device_type))
    except (ValueError, RuntimeError) as err:
        return 'error', str(err)


def _scan_threads() -> Tuple[object, str]:
    """(threads, where the number comes from) of the cpu scan's kernels; a bad setting is reported."""
    from mambacsr_arch.ops import cpu_scan

    try:
        threads = cpu_scan.scan_threads()
    except ValueError as err:
        return 'error', str(err)
    if os.environ.get(cpu_scan.THREADS_ENV, '').strip():
        return threads, f'{cpu_scan.THREADS_ENV} environment variable'
    return threads, f'torch.get_num_threads(); {cpu_scan.THREADS_ENV}=N sets it'


def collect() -> Dict[str, object]:
    """Gather the report as a dict (used by tests and by ``run``)."""
    import torch

    from mambacsr_arch import ops
    from mambacsr_arch.cli.runtime import load_plugins

    plugins = load_plugins()
    report: Dict[str, object] = {
        'python': platform.python_version(),
        'platform': platform.platform(),
        'versions': {name: _version(name) for name in
                     ('mambacsr_arch', 'torch', 'torchvision', 'basicsr', 'numba', 'triton', 'cv2', 'numpy')},
        'cuda': torch.version.cuda if torch.cuda.is_available() else None,
        'torch_cuda_build': torch.version.cuda,
        'gpus': _gpus(),
        'scan_backends': ops.available_backends(),
        'scan_backends_cuda': ops.available_backends('cuda'),  # runs the GPU backends' check scans
        'scan_backend_cpu': _resolve('cpu'),
        'scan_backend_cuda': _resolve('cuda'),
        'scan_threads_cpu': _scan_threads(),
        'plugins': plugins,
    }
    missing = {}
    for name, (purpose, install) in OPTIONAL_PACKAGES.items():
        if not _installed(name):
            missing[name] = f'{purpose}; install with: {install}'
    report['missing_optional'] = missing
    return report


def format_report(report: Dict[str, object]) -> str:
    lines = [f"python        {report['python']} ({report['platform']})"]
    for name, version in report['versions'].items():  # type: ignore[union-attr]
        lines.append(f'{name:<13} {version}')
    lines.append(f"cuda          {report['cuda'] or 'not available'}"
                 f" (torch built with CUDA {report['torch_cuda_build'] or 'none'})")
    gpus = report['gpus'] or ['none']
    lines.append('gpus          ' + ', '.join(gpus))  # type: ignore[arg-type]
    lines.append('selective-scan backends:')
    cuda = report.get('scan_backends_cuda') or {}
    for name, reason in report['scan_backends'].items():  # type: ignore[union-attr]
        checked = cuda.get(name) if reason is None else None  # type: ignore[union-attr]
        if reason is not None:
            status = 'unavailable: ' + str(reason)
        elif checked is not None:
            status = 'skipped for CUDA tensors: ' + str(checked)
        else:
            status = 'available'
        lines.append(f'  {name:<10} {status}')
    name, why = report['scan_backend_cpu']  # type: ignore[misc]
    lines.append(f'active backend for CPU tensors:  {name} ({why})')
    threads, why = report['scan_threads_cpu']  # type: ignore[misc]
    lines.append(f'cpu scan threads:                {threads} ({why})')
    name, why = report['scan_backend_cuda']  # type: ignore[misc]
    label = 'active backend for CUDA tensors:' if report['gpus'] else 'CUDA tensors would use:        '
    lines.append(f'{label} {name} ({why})')
    missing = report['missing_optional'] or {}
    lines.append('missing optional packages:' + ('' if missing else ' none'))
    for name, text in missing.items():  # type: ignore[union-attr]
        lines.append(f'  {name:<13} {text}')
    plugins = report['plugins'] or ['none']
    lines.append('basicsr.plugins loaded: ' + ', '.join(plugins))  # type: ignore[arg-type]
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--json', action='store_true', help='print the report as JSON')


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    report = collect()
    if args.json:
        import json

        print(json.dumps(report, indent=2, default=str), file=out)
    else:
        print(format_report(report), file=out)
    return 0
