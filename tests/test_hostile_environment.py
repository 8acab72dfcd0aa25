"""Bad scan settings in the environment: one line and exit status 2 from every command that runs a network,
before anything is built or written (MAMBACSR_SCAN_BACKEND, MAMBACSR_SCAN_THREADS)."""
from __future__ import annotations

import re

import pytest

from mambacsr_arch.cli import runtime
from mambacsr_arch.cli.main import main
from mambacsr_arch.errors import ConfigError
from mambacsr_arch.ops import check_environment

pytestmark = pytest.mark.hostile

FROM_ENV = '(from MAMBACSR_SCAN_BACKEND environment variable); choose one of '
BAD = [('MAMBACSR_SCAN_BACKEND', 'bogus', f"unknown selective-scan backend 'bogus' {FROM_ENV}"),
       ('MAMBACSR_SCAN_BACKEND', '  ', f"unknown selective-scan backend '' {FROM_ENV}"),
       ('MAMBACSR_SCAN_THREADS', '0', "MAMBACSR_SCAN_THREADS='0': expected a positive integer"),
       ('MAMBACSR_SCAN_THREADS', 'two', "MAMBACSR_SCAN_THREADS='two': expected a positive integer")]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('MAMBACSR_SCAN_BACKEND', raising=False)
    monkeypatch.delenv('MAMBACSR_SCAN_THREADS', raising=False)


def test_good_settings_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    check_environment()
    monkeypatch.setenv('MAMBACSR_SCAN_BACKEND', ' torch ')
    monkeypatch.setenv('MAMBACSR_SCAN_THREADS', '1')
    check_environment()


@pytest.mark.parametrize('var, value, said', BAD)
def test_infer_stops_before_writing(var: str, value: str, said: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=re.escape(said)):
        check_environment()
    out = tmp_path / 'out'
    rc = main(['infer', '-i', str(tmp_path / 'missing'), '-o', str(out), '--weights', str(tmp_path / 'w.pth')])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count('\n') == 0 and err.startswith('basicsr infer: error: ') and said in err
    assert not out.exists()  # checked before the output folder is made


@pytest.mark.parametrize('var, value, said', BAD[::2])
def test_train_and_test_stop_before_building(var: str, value: str, said: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(var, value)
    for command in ('train', 'test'):  # also `python -m mambacsr_arch.train|test`, which call run_pipeline
        rc = runtime.run_pipeline(command, ['-opt', str(tmp_path / 'missing.yml')])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and '\n' not in err and err.startswith(f'basicsr {command}: error: ') and said in err


def test_commands_without_a_network_ignore_them(tmp_path, monkeypatch, capsys) -> None:
    """eval never scans: a bad scan setting does not stop it (its own errors still do)."""
    monkeypatch.setenv('MAMBACSR_SCAN_THREADS', 'two')
    rc = main(['eval', '--restored', str(tmp_path / 'none'), '--gt', str(tmp_path / 'none')])
    assert rc == 2 and 'MAMBACSR_SCAN_THREADS' not in capsys.readouterr().err


def test_export_stops_too(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv('MAMBACSR_SCAN_BACKEND', 'bogus')
    rc = main(['export', '--weights', str(tmp_path / 'w.pth'), '-o', str(tmp_path / 'm.onnx')])
    err = capsys.readouterr().err
    assert rc == 2 and "'bogus' (from MAMBACSR_SCAN_BACKEND" in err and 'or unset MAMBACSR_SCAN_BACKEND' in err
