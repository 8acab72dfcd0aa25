"""benchmarks/gpu_check.py stays runnable: its --dry-run (tiny sizes, CPU) in CI, and its dependency guard."""
from __future__ import annotations

import json
import os.path as osp
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
    monkeypatch.setattr(gpu_check, 'NEEDED', ('basicsr', 'mambacsr_no_such_module'))
    with pytest.raises(SystemExit, match=r'missing mambacsr_no_such_module and no wheels in .*make gpu-wheels'):
        gpu_check.ensure_dependencies(str(tmp_path / 'wheels'))
