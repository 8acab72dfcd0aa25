"""Hostile weights through the CLI: every bad checkpoint or network option is one line on stderr, exit 2, no
traceback, nothing written; weights that cannot be right never give a black image with exit 0."""
import os
import stat
import zipfile

import cv2
import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (first: its torchvision shim lets basicsr import; registers the archs)
from basicsr.archs import build_network
from mambacsr_arch.archs.detect import detect_network
from mambacsr_arch.cli.main import main

pytestmark = pytest.mark.hostile

HAT = dict(type='HAT', img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, compress_ratio=3,
           squeeze_factor=4, mlp_ratio=1., upscale=2, upsampler='pixelshuffle')
MAMBA = dict(type='MambaCSR', img_size=16, embed_dim=24, depths=[1], d_state=4, mlp_ratio=1., upscale=2,
             cross_scale_scan=False)


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / 'in' / 'x.png'
    path.parent.mkdir()
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    return path


def _state(opt, seed=0):
    torch.manual_seed(seed)
    return build_network(dict(opt)).state_dict()


def _refused(capsys, argv, tmp_path, *fragments):
    """``basicsr <argv>`` exits 2 with one error line holding every fragment, and writes nothing."""
    before = sorted(str(p) for p in tmp_path.rglob('*'))
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and ': note: ' not in line]  # notes: detection
    assert len(lines) == 1 and lines[0].startswith(f'basicsr {argv[0]}: error: '), err
    assert 'Traceback' not in err and 'weights_only=False' not in err and 'weights_only` set to `False' not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert sorted(str(p) for p in tmp_path.rglob('*')) == before  # nothing created or written
    return err


def _infer(image, tmp_path, weights, *extra):
    return ['infer', '-i', image, '-o', tmp_path / 'out', '--weights', weights, '--device', 'cpu',
            '--no-progress', *extra]


def test_integer_weights_are_refused(tmp_path, capsys, image):
    state = _state(HAT)
    state['conv_first.weight'] = state['conv_first.weight'].round().to(torch.int64)
    torch.save({'params': state}, tmp_path / 'int.pth')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'int.pth'), tmp_path, 'int.pth', "'conv_first.weight'",
             'torch.int64')


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_weights_are_refused(tmp_path, capsys, image, value):
    state = _state(HAT)
    state['conv_last.weight'].fill_(value)
    torch.save({'params': state}, tmp_path / 'nan.pth')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'nan.pth'), tmp_path, 'nan.pth', "'conv_last.weight'",
             'NaN/inf', 'earlier checkpoint')


def test_hat_x1_pixelshuffle_is_detected_and_runs(tmp_path, capsys, image):
    opt = dict(HAT, upscale=1)
    state = _state(opt)
    detected, _ = detect_network(state)
    assert detected['upsampler'] == 'pixelshuffle' and detected['upscale'] == 1
    torch.save({'params': state}, tmp_path / 'x1.pth')
    assert main([str(a) for a in _infer(image, tmp_path, tmp_path / 'x1.pth')]) == 0, capsys.readouterr().err
    assert cv2.imread(str(tmp_path / 'out' / 'x.png')).shape == (12, 12, 3)


def test_state_dict_with_non_tensor_entries_names_the_entry(tmp_path, capsys, image):
    state = dict(_state(HAT), iteration=1200)
    torch.save(state, tmp_path / 'mixed.pth')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'mixed.pth'), tmp_path, 'mixed.pth', "'iteration'",
             'int, not a tensor')


def test_empty_checkpoint(tmp_path, capsys, image):
    torch.save({}, tmp_path / 'empty.pth')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'empty.pth'), tmp_path, 'empty.pth', 'empty dict')


class Payload:  # a pickled object: torch.load(weights_only=True) refuses it
    pass


def test_pickled_objects_are_refused_for_safety_without_suggesting_weights_only_false(tmp_path, capsys, image):
    torch.save({'params': _state(HAT), 'extra': Payload()}, tmp_path / 'code.pth')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'code.pth'), tmp_path, 'code.pth',
             'contains Python code or objects', 'refused for safety', 'Payload')


def test_zip_of_something_else(tmp_path, capsys, image):
    with zipfile.ZipFile(tmp_path / 'weights.pth', 'w') as archive:
        archive.writestr('README.txt', 'the weights are in the release page')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'weights.pth'), tmp_path, 'weights.pth',
             'zip archive but not a PyTorch checkpoint', 'README.txt')


def test_zero_byte_file(tmp_path, capsys, image):
    (tmp_path / 'zero.pth').write_bytes(b'')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'zero.pth'), tmp_path, 'zero.pth', '0 bytes')


def test_folder_as_weights(tmp_path, capsys, image):
    folder = tmp_path / 'release'
    folder.mkdir()
    torch.save({'params': _state(HAT)}, folder / 'net_g.pth')
    _refused(capsys, _infer(image, tmp_path, folder), tmp_path, 'is a folder', 'net_g.pth')


def test_arch_flag_with_the_other_archs_weights(tmp_path, capsys, image):
    torch.save({'params': _state(HAT)}, tmp_path / 'hat.pth')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'hat.pth', '--arch', 'MambaCSR', '--scale', '2'), tmp_path,
             'is a HAT checkpoint', 'not a MambaCSR one')
    torch.save({'params': _state(MAMBA)}, tmp_path / 'mamba.pth')
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'mamba.pth', '--arch', 'HAT', '--scale', '2'), tmp_path,
             'is a MambaCSR checkpoint', 'not a HAT one')
    # without --scale too: the weights are read for the scale, and the arch mismatch is what is said
    _refused(capsys, _infer(image, tmp_path, tmp_path / 'hat.pth', '--arch', 'MambaCSR'), tmp_path,
             'is a HAT checkpoint', 'not a MambaCSR one')


def test_safetensors_get_the_permissions_of_a_normal_file(tmp_path, capsys):
    torch.save({'params': _state(HAT)}, tmp_path / 'net_g.pth')
    out = tmp_path / 'net_g.safetensors'
    old = os.umask(0o022)
    try:
        assert main(['export', '--weights', str(tmp_path / 'net_g.pth'), '-o', str(out)]) == 0
        (tmp_path / 'plain').write_bytes(b'x')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(tmp_path / 'plain').st_mode) == 0o644


@pytest.mark.parametrize('flags', [['--size', '8', '8'], ['--dynamic'], ['--opset', '18'], ['--tolerance', '1e-4']])
def test_onnx_flags_with_a_safetensors_output_are_refused(tmp_path, capsys, flags):
    torch.save({'params': _state(HAT)}, tmp_path / 'net_g.pth')
    _refused(capsys, ['export', '--weights', tmp_path / 'net_g.pth', '-o', tmp_path / 'w.safetensors'] + flags,
             tmp_path, flags[0], 'of ONNX export only')


@pytest.mark.parametrize('arch,option,fragment', [
    ('MambaCSR', 'scan_size=0', 'scan_size must be an integer >= 1'),
    ('MambaCSR', 'd_state=0', 'd_state must be an integer >= 1'),
    ('MambaCSR', 'img_range=0', 'img_range must be a number > 0'),
    ('HAT', 'window_size=0', 'window_size must be an integer >= 1'),
    ('HAT', 'num_heads=[5]', 'divisible by every num_heads'),
    ('HAT', 'compress_ratio=24', 'compress_ratio')])
def test_options_that_build_a_broken_network(tmp_path, capsys, image, arch, option, fragment):
    weights = tmp_path / f'{arch}.pth'
    torch.save({'params': _state(MAMBA if arch == 'MambaCSR' else HAT)}, weights)
    _refused(capsys, _infer(image, tmp_path, weights, '--arch-opt', option), tmp_path, fragment)


def test_asking_a_safetensors_for_an_entry_it_does_not_hold(tmp_path, capsys, image):
    torch.save({'params': _state(HAT, 0), 'params_ema': _state(HAT, 1)}, tmp_path / 'net_g.pth')
    out = tmp_path / 'ema.safetensors'
    assert main(['export', '--weights', str(tmp_path / 'net_g.pth'), '-o', str(out), '--param-key', 'params_ema']) == 0
    capsys.readouterr()
    _refused(capsys, _infer(image, tmp_path, out, '--param-key', 'params'), tmp_path, 'ema.safetensors',
             "holds the 'params_ema' weights", "not 'params'", 'net_g.pth [params]')


def test_param_key_none_on_a_file_with_params_and_params_ema_is_not_guessed():
    """--param-key none (a bare state dict) on {'params', 'params_ema'} silently loaded params_ema."""
    from mambacsr_arch.models.weights import ParamKeyError, select_params

    state = {'w': torch.ones(2)}
    with pytest.raises(ParamKeyError, match="not a bare state dict .*it holds params_ema, params"):
        select_params({'params': state, 'params_ema': state}, 'none', source="'x.pth'")
    assert select_params({'params': state}, 'none')[1] == 'params'  # one entry: nothing to guess


def test_a_pth_renamed_safetensors_loads_as_what_it_is(tmp_path):
    """Its name said safetensors, so its zip bytes were parsed as a safetensors header ('header too large')."""
    from mambacsr_arch.models.weights import read_checkpoint

    torch.save({'params': {'w': torch.ones(2)}}, tmp_path / 'net.safetensors')
    assert torch.equal(read_checkpoint(tmp_path / 'net.safetensors')['params']['w'], torch.ones(2))


def test_arch_opt_type_points_at_arch():
    """--arch-opt type=HAT went on to report 'upscales x1 (upsampler '')'."""
    from mambacsr_arch.cli.common import parse_arch_opts
    from mambacsr_arch.errors import ConfigError

    with pytest.raises(ConfigError, match="the architecture is --arch HAT; --arch-opt sets its constructor options"):
        parse_arch_opts(['embed_dim=60', 'type=HAT'])
    assert parse_arch_opts(['embed_dim=60']) == {'embed_dim': 60}
