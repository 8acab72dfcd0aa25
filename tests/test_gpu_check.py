"""benchmarks/gpu_check.py stays runnable: its --dry-run (tiny sizes, CPU) in CI, and its dependency guard."""
from __future__ import annotations

import json
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
import gpu_check  # noqa: E402


def _rows(out_dir):
    with open(osp.join(out_dir, 'gpu_check.json'), encoding='utf-8') as f:
        return json.load(f)


def test_dry_run_sections_pass_and_write_json(tmp_path) -> None:
    rc = gpu_check.main([str(tmp_path), '--dry-run', '--sections', 'golden', 'agree', 'scan', 'models'])
    report = _rows(tmp_path)
    assert report['errors'] == {}, report['errors']
    assert rc == 0
    sections = {r['section'] for r in report['rows']}
    assert sections == {'golden', 'agree', 'scan', 'models'}
    golden = [r for r in report['rows'] if r['section'] == 'golden']
    assert golden and all(r['ok'] and r['value'] <= 1e-4 for r in golden)
    assert all(r['ok'] for r in report['rows'] if r['section'] == 'agree')
    assert report['meta']['dry_run'] is True and 'section_seconds' in report['meta']


@pytest.mark.slow
def test_dry_run_cli_section(tmp_path) -> None:
    """20 iterations of basicsr train (bf16 autocast) and a tiled basicsr infer, as subprocesses."""
    rc = gpu_check.main([str(tmp_path), '--dry-run', '--sections', 'cli'])
    report = _rows(tmp_path)
    assert rc == 0 and report['errors'] == {}, report['errors']
    assert len(report['rows']) == 2 and all(r['ok'] for r in report['rows'])


def test_missing_dependency_without_wheels_names_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(gpu_check, 'NEEDED', {'basicsr': 'basicsr', 'mambacsr_no_such_module': 'no-such-dist'})
    with pytest.raises(SystemExit, match=r'missing no-such-dist and no wheels in .*make gpu-wheels'):
        gpu_check.ensure_dependencies(str(tmp_path / 'wheels'), str(tmp_path / 'site'))


def test_needed_names_every_third_party_import() -> None:
    """What basicsr and this package import at run time (beyond torch/triton) has a wheel in NEEDED, and the
    Makefile's gpu-wheels downloads each (basicsr: built)."""
    for module in ('basicsr', 'addict', 'yapf', 'future', 'lmdb', 'yaml', 'cv2', 'numba', 'llvmlite', 'skimage',
                   'scipy', 'numpy', 'safetensors', 'tqdm'):
        assert module in gpu_check.NEEDED, module
    with open(osp.join(ROOT, 'Makefile'), encoding='utf-8') as f:
        makefile = f.read()
    listed = makefile.split('GPU_WHEELS ?=')[1].split('\ngpu-wheels:')[0].replace('\\', ' ').split()
    assert sorted(set(gpu_check.NEEDED.values()) - {'basicsr'}) == sorted(listed)


def test_only_missing_packages_installed_from_wheels(tmp_path, monkeypatch) -> None:
    """A real offline pip install (--no-index --find-links --target) of the one missing package."""
    project = tmp_path / 'project'
    (project / 'mambacsr_wheel_probe').mkdir(parents=True)
    (project / 'mambacsr_wheel_probe' / '__init__.py').write_text('VALUE = 7\n')
    (project / 'setup.py').write_text("from setuptools import setup\nsetup(name='mambacsr-wheel-probe', version='1.0', "
                                      "packages=['mambacsr_wheel_probe'])\n")
    wheels = tmp_path / 'wheels'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation', '--no-index',
                    '-w', str(wheels), str(project)], check=True, capture_output=True, timeout=300)
    monkeypatch.setattr(gpu_check, 'NEEDED', {'torch': 'torch', 'mambacsr_wheel_probe': 'mambacsr-wheel-probe'})
    monkeypatch.setattr(sys, 'path', list(sys.path))
    monkeypatch.setenv('PYTHONPATH', os.environ.get('PYTHONPATH', ''))
    target = tmp_path / 'site'
    assert gpu_check.ensure_dependencies(str(wheels), str(target)) == ['mambacsr-wheel-probe']
    assert (target / 'mambacsr_wheel_probe' / '__init__.py').is_file() and not (target / 'torch').exists()
    assert os.environ['PYTHONPATH'].startswith(str(target))
    assert gpu_check.ensure_dependencies(str(wheels), str(target)) == []  # now present: nothing to do
    sys.modules.pop('mambacsr_wheel_probe', None)


@pytest.mark.slow
def test_dry_run_under_triton_interpreter_runs_triton_rows(tmp_path) -> None:
    """CI's TRITON_INTERPRET=1 dry run: the triton backend is in the agree and scan rows, and passes."""
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_WAIT_POLICY=os.environ.get('OMP_WAIT_POLICY', 'PASSIVE'))
    result = subprocess.run([sys.executable, osp.join(ROOT, 'benchmarks', 'gpu_check.py'), str(tmp_path), '--dry-run',
                             '--sections', 'golden', 'agree', 'scan'], env=env, capture_output=True, text=True,
                            timeout=600)
    report = _rows(tmp_path)
    assert result.returncode == 0 and report['errors'] == {}, (result.stdout + result.stderr)[-4000:]
    triton_rows = [r for r in report['rows'] if 'triton' in r['item']]
    assert {r['section'] for r in triton_rows} == {'agree', 'scan'}, triton_rows
    assert any(r['section'] == 'agree' and r['ok'] for r in triton_rows)
    assert all(r['ok'] is not False for r in triton_rows)
    assert report['meta']['triton_interpret'] == '1' and report['meta']['scan_backends']['triton'] is None
