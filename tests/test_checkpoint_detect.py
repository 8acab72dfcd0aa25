"""Checkpoints as users find them: arch + options detected from the state dict, wrappers, prefixes, safetensors."""
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (first: its torchvision shim lets basicsr import; registers the archs)
from basicsr.archs import build_network
from mambacsr_arch.archs.detect import DetectionError, detect_arch
from mambacsr_arch.models.weights import load_weights, read_checkpoint, save_safetensors, select_params
from mambacsr_arch.ops import use_backend

pytestmark = pytest.mark.hostile

GOLDEN = Path(__file__).resolve().parent / 'data' / 'golden'
MAMBA = dict(type='MambaCSR', img_size=16, cross_scale_scan=False, embed_dim=24, depths=[1], depths2=[1], d_state=4,
             mlp_ratio=1.)
HAT = dict(type='HAT', img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, compress_ratio=3,
           squeeze_factor=4, mlp_ratio=1., upscale=2, upsampler='pixelshuffle')
CONFIGS = [
    dict(MAMBA, upscale=2),
    dict(MAMBA, upscale=3, depths=[1, 2], d_state=6, mlp_ratio=1.5, resi_connection='3conv',
         dual_interleaved_scan=False),
    dict(MAMBA, upscale=1, in_chans=1, patch_norm=False, cross_scale_scan=True, depths=[2, 1]),
    dict(MAMBA, upscale=4, embed_dim=40, cross_scale_scan=True, depths=[1, 1], depths2=[1, 1]),
    HAT,
    dict(HAT, upsampler='pixelshuffledirect', upscale=3, resi_connection='3conv', num_heads=[3], overlap_ratio=1.),
    dict(HAT, upsampler='nearest+conv', upscale=4, resi_connection='identity', depths=[1, 2], num_heads=[2, 4]),
    dict(HAT, upsampler='', upscale=1, ape=True, patch_norm=False, qkv_bias=False, window_size=8, img_size=24),
]


@pytest.fixture(autouse=True)
def _portable_scan():
    """The portable scan: these tests are about weights, not about the (separately tested) CPU kernel."""
    with use_backend('torch'):
        yield


def _net(opt, seed=0):
    torch.manual_seed(seed)
    return build_network(dict(opt)).eval()


def _same_outputs(a, b, size=(1, 3, 8, 12)):
    x = torch.rand(size[0], a.conv_first.weight.shape[1], *size[2:])
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize('opt', CONFIGS, ids=lambda o: f"{o['type']}-x{o['upscale']}-{o.get('upsampler', 'ps')}")
def test_detect_round_trip(opt):
    net = _net(opt)
    arch, kwargs, assumed = detect_arch(net.state_dict())
    assert arch == opt['type'] == kwargs['type']  # a HAT is never taken for a MambaCSR, nor the reverse
    for name, value in opt.items():
        invisible = (name == 'img_size' and not opt.get('ape')) or (name == 'depths2' and not opt['cross_scale_scan'])
        if not invisible:
            assert kwargs[name] == pytest.approx(value), name
    assert assumed and all('not visible' in line or 'nominal' in line for line in assumed)
    rebuilt = _net(kwargs, seed=1)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert _same_outputs(net, rebuilt)


@pytest.mark.parametrize('name', ['mambacsr_dis', 'mambacsr_dis_crossscale', 'hat_small'])
def test_detect_golden_fixture_configs(name):
    golden = torch.load(GOLDEN / f'{name}.pt', weights_only=True)
    arch, kwargs, _ = detect_arch(golden['state_dict'])
    assert arch == golden['type']
    expected = dict(golden['network_g'])
    if not expected.get('cross_scale_scan', True):
        expected.pop('depths2', None)  # unused without cross-scale scanning, so not in the weights
    for key in ('img_size', 'drop_path_rate', 'type'):
        expected.pop(key, None)
    for key, value in expected.items():
        assert kwargs[key] == pytest.approx(value), key
    build_network(kwargs).load_state_dict(golden['state_dict'], strict=True)


def test_unrelated_state_dict_is_a_clear_error():
    msr = build_network(dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, upscale=4))
    with pytest.raises(DetectionError, match=r'not one key pattern.*MambaCSR.*HAT.*--arch.*conv_first'):
        detect_arch(msr.state_dict())
    swinir_like = {'layers.0.residual_group.blocks.0.attn.relative_position_bias_table': torch.zeros(49, 2)}
    with pytest.raises(DetectionError, match="a SwinIR checkpoint .*relative_position_bias_table"):
        detect_arch(swinir_like)
    with pytest.raises(DetectionError, match='no state dict'):
        detect_arch({})


def test_truncated_and_modified_mambacsr_are_named():
    state = _net(dict(MAMBA, upscale=2)).state_dict()
    with pytest.raises(DetectionError, match=r"lacks the tensors that show \['upscale'\]"):
        detect_arch({k: v for k, v in state.items() if not k.startswith(('upsample', 'conv_before_upsample'))})
    key = 'layers.0.residual_group.blocks.0.self_attention.dt_projs_weight'
    with pytest.raises(DetectionError, match='ssm_ratio 3 and dt_rank 2'):
        detect_arch(dict(state, **{key: torch.zeros(2, 72, 2)}))


def _layouts(state):
    other = OrderedDict((k, torch.zeros_like(v)) for k, v in state.items())
    prefixed = OrderedDict(('module.' + k, v) for k, v in state.items())
    gan = OrderedDict([*(('netG.' + k, v) for k, v in state.items()), ('netD.conv.weight', torch.ones(2))])
    return {
        'params_ema>params': {'params': other, 'params_ema': state, 'optimizer': {'lr': 1}},
        'params': {'params': prefixed},
        'state_dict': {'state_dict': state, 'epoch': 3},
        'model': {'model': prefixed, 'net': other},
        'net': {'net': state},
        'nested': {'state_dict': {'params_ema': state}},
        'bare-module': prefixed,
        'bare-netG': gan,
        'module.netG': OrderedDict(('module.' + k, v) for k, v in gan.items()),
    }


# safetensors files hold one flat dict of tensors: the bare layouts only
@pytest.mark.parametrize('layout,fmt', [(name, 'pth') for name in _layouts({'w': torch.zeros(1)})] +
                         [(name, 'safetensors') for name in ('bare-module', 'bare-netG', 'module.netG')])
def test_wrappers_prefixes_and_safetensors_round_trip(tmp_path, layout, fmt):
    net = _net(HAT)
    state = net.state_dict()
    content = _layouts(state)[layout]
    path = tmp_path / f'w.{fmt}'
    if fmt == 'safetensors':
        save_safetensors(content, path)
    else:
        torch.save(content, path)
    loaded, _ = select_params(read_checkpoint(path), 'auto')
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    arch, kwargs, _ = detect_arch(loaded)
    assert arch == 'HAT'
    fresh = _net(kwargs, seed=3)
    load_weights(fresh, path, param_key='auto')
    assert _same_outputs(net, fresh)


def test_safetensors_by_content_and_bad_files(tmp_path):
    state = _net(dict(MAMBA, upscale=2)).state_dict()
    disguised = tmp_path / 'release.pth'  # a safetensors file under a .pth name
    save_safetensors(state, disguised)
    loaded, key = select_params(read_checkpoint(disguised), 'params_ema')
    assert key is None and detect_arch(loaded)[0] == 'MambaCSR'
    broken = tmp_path / 'broken.safetensors'
    broken.write_bytes(disguised.read_bytes()[:200])
    with pytest.raises(RuntimeError, match="cannot read checkpoint '.*broken.safetensors'"):
        read_checkpoint(broken)
    with pytest.raises(ValueError, match='dict of tensors'):
        save_safetensors({'params': {}}, tmp_path / 'x.safetensors')
    mixed = {'netG.a': torch.zeros(1), 'module.netG.a': torch.ones(1)}
    with pytest.raises(RuntimeError, match="two tensors are named 'a'"):
        select_params(mixed, None)


@pytest.mark.parametrize('opt', [dict(MAMBA, upscale=2, cross_scale_scan=True), dict(HAT, upscale=3)],
                         ids=['MambaCSR', 'HAT'])
def test_infer_with_weights_only_equals_the_configured_network(tmp_path, capsys, monkeypatch, opt):
    import json

    import cv2

    from helpers_images import photo_bgr
    from mambacsr_arch.cli.main import main

    monkeypatch.setenv('MAMBACSR_SCAN_BACKEND', 'torch')  # portable scan: not a test of the CPU kernel
    net = _net(opt)
    save_safetensors({'netG.' + k: v for k, v in net.state_dict().items()}, tmp_path / 'w.safetensors')
    cv2.imwrite(str(tmp_path / 'lr.png'), photo_bgr(size=(10, 14)))
    common = ['infer', '-i', str(tmp_path / 'lr.png'), '--weights', str(tmp_path / 'w.safetensors'), '--device',
              'cpu', '--no-progress']
    assert main(common + ['-o', str(tmp_path / 'detected')]) == 0
    err = capsys.readouterr().err
    assert err.count(f"detected {opt['type']} x{opt['upscale']}") == 1 and 'assumed' in err
    configured = {k: v for k, v in opt.items() if k != 'type'}
    assert main(common + ['-o', str(tmp_path / 'configured'), '--arch', opt['type'], '--scale', str(opt['upscale']),
                          '--network-opt', json.dumps(configured)]) == 0
    detected = cv2.imread(str(tmp_path / 'detected' / 'lr.png'))
    assert detected.shape == (10 * opt['upscale'], 14 * opt['upscale'], 3)
    assert np.array_equal(detected, cv2.imread(str(tmp_path / 'configured' / 'lr.png')))
    # --arch-opt overrides a detected value (here to one the weights do not fit: strict loading says so)
    assert main(common + ['-o', str(tmp_path / 'wrong'), '--arch-opt', 'embed_dim=48']) == 2
    assert 'embed_dim' in capsys.readouterr().err


def test_infer_with_foreign_weights_names_them(tmp_path, capsys):
    import cv2

    from helpers_images import photo_bgr
    from mambacsr_arch.cli.main import main

    msr = build_network(dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, upscale=4))
    torch.save({'params': msr.state_dict()}, tmp_path / 'msr.pth')
    cv2.imwrite(str(tmp_path / 'lr.png'), photo_bgr(size=(8, 8)))
    assert main(['infer', '-i', str(tmp_path / 'lr.png'), '-o', str(tmp_path / 'o'), '--weights',
                 str(tmp_path / 'msr.pth')]) == 2
    err = capsys.readouterr().err
    assert 'no network' in err and 'cannot detect the architecture' in err and '--arch' in err
