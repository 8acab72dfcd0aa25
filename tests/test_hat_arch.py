"""HAT architecture: official parity (golden fixture), any input size, batching, checkpointing,
strict-loading diagnostics and safe registration."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import mambacsr_arch  # noqa: F401  (shims + registration before basicsr)
import pytest
import torch
import torch.nn.functional as F
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY, Registry

from mambacsr_arch.archs.hat.arch import HAT, relative_position_index_oca, relative_position_index_sa
from mambacsr_arch.archs.hat.checkpoint import infer_hat_options
from mambacsr_arch.registry import register

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'data' / 'golden' / 'hat_small.pt'
TINY = dict(embed_dim=12, depths=[2], num_heads=[2], window_size=4, img_size=16, compress_ratio=3,
            squeeze_factor=4, mlp_ratio=2., upscale=2, upsampler='pixelshuffle')


@pytest.fixture(scope='module')
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope='module')
def golden_net(golden):
    net = HAT(**golden['network_g']).eval()
    net.load_state_dict(golden['state_dict'], strict=True)
    return net


def _tiny(seed: int = 0, **overrides) -> HAT:
    torch.manual_seed(seed)
    return HAT(**{**TINY, **overrides})


def test_golden_output_matches_official(golden, golden_net):
    with torch.no_grad():
        out = golden_net(golden['input'])
    assert out.shape == golden['output'].shape
    assert (out - golden['output']).abs().max().item() <= 1e-4


def test_relative_position_indices_match_official(golden):
    cfg = golden['network_g']
    assert torch.equal(relative_position_index_sa(cfg['window_size']),
                       golden['state_dict']['relative_position_index_SA'])
    assert torch.equal(relative_position_index_oca(cfg['window_size'], cfg['overlap_ratio']),
                       golden['state_dict']['relative_position_index_OCA'])


def test_state_dict_keys_and_shapes_identical_to_official(golden):
    ours = HAT(**golden['network_g']).state_dict()
    assert list(ours) == list(golden['state_dict'])
    assert all(ours[k].shape == v.shape for k, v in golden['state_dict'].items())


def test_checkpoint_without_index_buffers_loads(golden, golden_net):
    """Older official checkpoints have no relative_position_index_* keys."""
    sd = {k: v for k, v in golden['state_dict'].items() if not k.startswith('relative_position_index')}
    net = HAT(**golden['network_g']).eval()
    net.load_state_dict(sd, strict=True)
    x = golden['input'][..., :16, :16]
    with torch.no_grad():
        assert torch.equal(net(x), golden_net(x))


@pytest.mark.parametrize('size', [(1, 1), (5, 7), (13, 9)])
def test_any_input_size_gives_upscale_times_input(golden_net, size):
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = golden_net(x)
    assert out.shape == (1, 3, 4 * size[0], 4 * size[1])
    assert torch.isfinite(out).all()


def test_padding_is_reflect_then_crop(golden_net):
    x = torch.rand(1, 3, 13, 9, generator=torch.Generator().manual_seed(3))
    padded = F.pad(x, (0, 16 - 9, 0, 16 - 13), mode='reflect')
    with torch.no_grad():
        expected = golden_net(padded)[..., :52, :36]
        assert torch.allclose(golden_net(x), expected, atol=1e-6)


def test_batch_equals_per_sample(golden_net):
    x = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(1))  # 2x3 windows: shifted mask used
    with torch.no_grad():
        batched = golden_net(x)
        single = torch.cat([golden_net(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_attention_mask_cached_per_size(golden):
    net = HAT(**golden['network_g']).eval()
    with torch.no_grad():
        net(torch.rand(1, 3, 16, 16))
        first = net.attention_mask(16, 16, torch.device('cpu'), torch.float32)
        net(torch.rand(2, 3, 16, 16))
        assert len(net._mask_cache) == 1
        assert net.attention_mask(16, 16, torch.device('cpu'), torch.float32) is first
        net(torch.rand(1, 3, 8, 24))
    assert len(net._mask_cache) == 2


def test_use_checkpoint_gives_same_gradients(monkeypatch):
    from mambacsr_arch.archs.hat import blocks as hat_blocks

    calls = []
    real_checkpoint = hat_blocks.torch_checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get('use_reentrant'))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(hat_blocks.torch_checkpoint, 'checkpoint', counting_checkpoint)
    plain = _tiny(drop_path_rate=0.1).train()
    ckpt = _tiny(drop_path_rate=0.1, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    grads = []
    for net in (plain, ckpt):
        torch.manual_seed(7)  # same drop-path draws
        net(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    assert calls == [False] * 3  # 2 HABs + 1 OCAB, checkpointed only in the second net
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_released_config_parameter_count():
    net = HAT(upscale=4, in_chans=3, img_size=64, window_size=16, compress_ratio=3, squeeze_factor=30,
              conv_scale=0.01, overlap_ratio=0.5, img_range=1., depths=[6] * 6, embed_dim=180, num_heads=[6] * 6,
              mlp_ratio=2, upsampler='pixelshuffle', resi_connection='1conv')
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == 20.77


def test_strict_mismatch_names_the_wrong_options(golden):
    cfg = {**golden['network_g'], 'embed_dim': 36, 'window_size': 16, 'depths': [2, 3], 'upscale': 2}
    with pytest.raises(RuntimeError) as err:
        HAT(**cfg).load_state_dict(golden['state_dict'], strict=True)
    msg = str(err.value)
    assert 'missing keys' in msg and 'shape mismatches' in msg
    assert 'embed_dim: model has 36, checkpoint has 24' in msg
    assert 'window_size: model has 16, checkpoint has 8' in msg
    assert 'depths: model has [2, 3], checkpoint has [2, 2]' in msg
    assert 'upscale: model has 2, checkpoint has 4' in msg


@pytest.mark.parametrize('overrides', [
    {},
    {'upsampler': 'pixelshuffledirect', 'upscale': 3, 'resi_connection': '3conv', 'num_heads': [3]},
    {'upsampler': 'nearest+conv', 'upscale': 4, 'resi_connection': 'identity', 'overlap_ratio': 1.0},
    {'upsampler': '', 'ape': True, 'patch_norm': False, 'depths': [2, 1], 'num_heads': [2, 4]},
])
def test_options_round_trip_through_state_dict(overrides):
    net = _tiny(**overrides)
    found = {name: value for name, (value, _) in infer_hat_options(net.state_dict()).items()}
    for name, value in net.options.items():
        assert name in found, name
        assert found[name] == pytest.approx(value), name
    scale = net.options['upscale']
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, 6, 10)).shape == (1, 3, 6 * scale, 10 * scale)


def test_bad_options_raise_actionable_errors():
    with pytest.raises(ValueError, match='upsampler'):
        _tiny(upsampler='bilinear')
    with pytest.raises(ValueError, match='resi_connection'):
        _tiny(resi_connection='2conv')
    with pytest.raises(ValueError, match='img_size'):
        _tiny(img_size=2)
    with pytest.raises(ValueError, match='overlap_ratio'):
        _tiny(overlap_ratio=0.25)


def test_unknown_option_warns_and_nominal_size_rule():
    with pytest.warns(UserWarning, match='window_sizes'):
        _tiny(window_sizes=8)
    # official rule: no shifted windows when img_size // patch_size fits in one window
    assert [blk.shift_size for blk in _tiny(img_size=4).layers[0].residual_group.blocks] == [0, 0]
    assert [blk.shift_size for blk in _tiny().layers[0].residual_group.blocks] == [0, 2]


def test_registered_and_buildable():
    assert ARCH_REGISTRY.get('mambacsr_arch.HAT') is HAT
    net = build_network({'type': 'mambacsr_arch.HAT', **TINY})
    assert isinstance(net, HAT)


def test_foreign_hat_is_kept_with_warning_and_alias():
    registry = Registry('arch_hat_test')
    foreign = type('HAT', (torch.nn.Module, ), {'__module__': 'hat.archs.hat_arch'})
    registry.register(foreign)
    with pytest.warns(UserWarning, match="another package registered it.*mambacsr_arch.HAT"):
        register(registry, HAT)
    assert registry.get('HAT') is foreign
    assert registry.get('mambacsr_arch.HAT') is HAT
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        register(registry, HAT)  # warned once only


@pytest.mark.slow
def test_foreign_hat_registered_before_import_subprocess(tmp_path):
    """A real `hat` package registering HAT first: importing mambacsr_arch must not fail."""
    pkg = tmp_path / 'hat'
    pkg.mkdir()
    (pkg / '__init__.py').write_text(textwrap.dedent("""
        import sys
        import torchvision.transforms._functional_tensor as ft  # what mambacsr_arch's shim does
        sys.modules.setdefault('torchvision.transforms.functional_tensor', ft)
        import torch
        from basicsr.utils.registry import ARCH_REGISTRY

        @ARCH_REGISTRY.register()
        class HAT(torch.nn.Module):
            pass
        """))
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter('always')
        with warnings.catch_warnings(record=True) as caught:
            import hat
            import mambacsr_arch
        from basicsr.utils.registry import ARCH_REGISTRY
        from mambacsr_arch.archs.hat.arch import HAT
        assert ARCH_REGISTRY.get('HAT') is hat.HAT
        assert ARCH_REGISTRY.get('mambacsr_arch.HAT') is HAT
        assert any('mambacsr_arch.HAT' in str(w.message) for w in caught), [str(w.message) for w in caught]
        print('OK')
        """)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith('OK')
