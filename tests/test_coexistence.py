"""The official ``hat`` package (or any package registering the same names) and mambacsr_arch in one process.

A fake ``hat`` package registers ``HAT`` (arch) and ``HATModel`` (model) with BasicSR's plain
``@REGISTRY.register()``, exactly as XPixelGroup/HAT does; both import orders must work and give the
bare names to it, ours staying reachable as ``mambacsr_arch.<Name>``.
"""
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.official

FAKE_HAT = '''
from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY
import torch.nn as nn


@ARCH_REGISTRY.register()
class HAT(nn.Module):
    official = True


@MODEL_REGISTRY.register()
class HATModel:
    official = True
'''

REPORT = '''
from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY
print(json.dumps({
    'arch': ARCH_REGISTRY.get('HAT').__module__, 'model': MODEL_REGISTRY.get('HATModel').__module__,
    'ours_arch': ARCH_REGISTRY.get('mambacsr_arch.HAT').__module__,
    'ours_model': MODEL_REGISTRY.get('mambacsr_arch.HATModel').__module__,
    'mambacsr': ARCH_REGISTRY.get('MambaCSR').__module__,
    'warnings': [str(w.message) for w in caught],
}))
'''


def _run(tmp_path, body: str, env_path: str = '') -> subprocess.CompletedProcess:
    package = tmp_path / 'hat'
    package.mkdir(exist_ok=True)
    (package / '__init__.py').write_text(FAKE_HAT)
    code = 'import json, sys, warnings\nsys.path.insert(0, %r)\n' % str(tmp_path) + textwrap.dedent(body)
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)


def _official_hat_only_in_hat_sys_path_module(report):
    assert report['arch'] == 'hat' and report['model'] == 'hat', report
    assert report['ours_arch'].startswith('mambacsr_arch.') and report['ours_model'].startswith('mambacsr_arch.')
    assert report['mambacsr'].startswith('mambacsr_arch.')


@pytest.mark.parametrize('first', ['mambacsr_arch', 'hat'])
def test_both_import_orders_work_and_the_bare_names_belong_to_hat(tmp_path, first):
    second = 'hat' if first == 'mambacsr_arch' else 'mambacsr_arch'
    if first == 'hat':  # basicsr 1.4.2 needs the torchvision alias before it imports at all
        prelude = ('import torchvision.transforms._functional_tensor as ft\n'
                   "sys.modules.setdefault('torchvision.transforms.functional_tensor', ft)\n")
    else:
        prelude = ''
    proc = _run(tmp_path, prelude + f'''
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import {first}
    import {second}
''' + REPORT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    _official_hat_only_in_hat_sys_path_module(report)
    said = [w for w in report['warnings'] if 'mambacsr_arch.HAT' in w]
    assert said and "type 'HAT' is hat's" in said[0], report['warnings']


def test_a_plugin_that_fails_to_import_is_reported_loudly(tmp_path):
    (tmp_path / 'broken_plugin.py').write_text("raise ImportError('needs libfoo 9')\n")
    dist = tmp_path / 'broken_plugin-1.0.dist-info'
    dist.mkdir()
    (dist / 'METADATA').write_text('Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n')
    (dist / 'entry_points.txt').write_text('[basicsr.plugins]\nbroken = broken_plugin\n')
    proc = _run(tmp_path, '''
from mambacsr_arch.cli.runtime import load_plugins
print(json.dumps(load_plugins()))
''')
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 'broken' not in loaded
    assert "basicsr plugin 'broken' (broken_plugin) failed to import: ImportError: needs libfoo 9" in proc.stderr
