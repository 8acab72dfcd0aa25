"""Import-time behaviour of the plugin: shims, registration, no CUDA/mamba_ssm side effects."""
import json
import subprocess
import sys
import textwrap

import pytest

import mambacsr_arch  # noqa: F401  (shims before basicsr is imported below)

EXPECTED = {
    'ARCH_REGISTRY': ['MambaCSR', 'HAT', 'DISBlock', 'CrossScaleBlock'],
    'DATASET_REGISTRY': ['JPEGDegradedPairedDataset'],
    'MODEL_REGISTRY': ['MambaCSRModel', 'HATModel'],
}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_fresh_import_registers_everything_without_cuda_or_mamba_ssm():
    proc = run_python("""
        import json, sys
        import mambacsr_arch
        import torch
        from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY
        regs = {'ARCH_REGISTRY': ARCH_REGISTRY, 'DATASET_REGISTRY': DATASET_REGISTRY,
                'MODEL_REGISTRY': MODEL_REGISTRY}
        print(json.dumps({
            'names': {k: sorted(r._obj_map) for k, r in regs.items()},
            'mamba_ssm': any(m.split('.')[0] in ('mamba_ssm', 'selective_scan_cuda') for m in sys.modules),
            'cuda_initialized': torch.cuda.is_initialized(),
        }))
    """)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for registry, names in EXPECTED.items():
        for name in names:
            assert name in report['names'][registry], (registry, name)
            assert f'mambacsr_arch.{name}' in report['names'][registry], (registry, name)
    assert report['mamba_ssm'] is False
    assert report['cuda_initialized'] is False


def test_foreign_registration_is_kept_and_ours_gets_an_alias():
    proc = run_python("""
        import warnings
        warnings.simplefilter('always')
        # a BasicSR fork's HAT is registered before the plugin loads; basicsr 1.4.2 needs the
        # torchvision alias to import at all, so apply it by hand (not through our package)
        import sys
        import torchvision.transforms._functional_tensor as functional_tensor
        sys.modules.setdefault('torchvision.transforms.functional_tensor', functional_tensor)
        from basicsr.utils.registry import ARCH_REGISTRY
        import torch.nn as nn

        class HAT(nn.Module):  # a fork's HAT, registered before the plugin loads
            pass

        ARCH_REGISTRY.register()(HAT)
        import importlib, sys
        with warnings.catch_warnings(record=True) as caught:
            import mambacsr_arch
            ours = ARCH_REGISTRY.get('mambacsr_arch.HAT')
            importlib.reload(sys.modules[ours.__module__])  # a second import of our module
            ours = ARCH_REGISTRY.get('mambacsr_arch.HAT')
        messages = [str(w.message) for w in caught if 'another package' in str(w.message)]
        assert ARCH_REGISTRY.get('HAT') is HAT, 'the foreign HAT must be kept'
        assert ours is not HAT and ours.__module__.startswith('mambacsr_arch'), ours
        assert len(messages) == 1, messages
        assert "mambacsr_arch.HAT" in messages[0]
        print('ok')
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith('ok')


def test_register_is_idempotent_for_our_own_classes():
    from basicsr.utils.registry import Registry

    from mambacsr_arch.registry import register

    registry = Registry('test')

    class Thing:
        pass

    Thing.__module__ = 'mambacsr_arch.fake'
    register(registry, Thing)
    register(registry, Thing)  # importing twice must not raise

    class Thing2:  # a reloaded module gives a new class object of ours: replaces, no warning
        pass

    Thing2.__module__ = 'mambacsr_arch.fake'
    with _no_warnings():
        register(registry, Thing2, name='Thing')
    assert registry.get('Thing') is Thing2
    assert registry.get('mambacsr_arch.Thing') is Thing2


class _no_warnings:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter('always')
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        assert not [w for w in self.caught if 'another package' in str(w.message)]
        return False


def test_compat_shims_are_idempotent_and_make_basicsr_importable():
    from mambacsr_arch import _compat

    assert _compat.apply() == []  # already applied at package import
    import torchvision.transforms.functional_tensor as ft  # noqa: F401
    import basicsr.data.degradations  # noqa: F401  (the module that needs the alias in 1.4.2)


def test_training_state_with_counter_loads_weights_only(tmp_path):
    import collections

    import torch

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 5])
    state = {'epoch': 1, 'iter': 2, 'optimizers': [optimizer.state_dict()],
             'schedulers': [scheduler.state_dict()]}
    assert isinstance(state['schedulers'][0]['milestones'], collections.Counter)
    path = tmp_path / '2.state'
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded['schedulers'][0]['milestones'] == collections.Counter([3, 5])


@pytest.mark.parametrize('preset, expected', [(None, 'PASSIVE'), ('ACTIVE', 'ACTIVE')])
def test_import_sets_a_passive_omp_wait_policy_unless_the_user_chose_one(preset, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    if preset:
        env['OMP_WAIT_POLICY'] = preset
    proc = subprocess.run([sys.executable, '-c', 'import os, mambacsr_arch; print(os.environ["OMP_WAIT_POLICY"])'],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == expected
