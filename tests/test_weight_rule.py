"""The one weight-selection rule (models.weights.choose_param_key) and this project's .safetensors metadata.

A checkpoint holding different `params` and `params_ema` must give the same network in `basicsr test`
(CSRModel), `basicsr infer` and `basicsr export` under one option file; training's `.pth` and its
`.safetensors` must be interchangeable; an exported file must rebuild the saved network exactly.
"""
import argparse
import json
import os

import pytest
import torch
import yaml

import mambacsr_arch  # noqa: F401  (first: its torchvision shim lets basicsr import; registers the archs)
from basicsr.archs import build_network
from basicsr.models import build_model
from mambacsr_arch.cli import infer as infer_cli
from mambacsr_arch.cli.main import main
from mambacsr_arch.models.weights import (CheckpointError, choose_param_key, default_param_key, load_weights,
                                          read_checkpoint)

HAT = dict(type='HAT', img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, compress_ratio=3,
           squeeze_factor=4, mlp_ratio=1., upscale=2, upsampler='pixelshuffle')


def test_the_rule():
    assert default_param_key(True) == 'params' and default_param_key(False) == 'params_ema'
    assert choose_param_key(None, {}, True) == 'params'  # BasicSR's path.param_key_g default
    assert choose_param_key(None, {'param_key_g': 'params_ema'}, True) == 'params_ema'
    assert choose_param_key(None, {'param_key_g': 'params_ema'}, False) == 'params_ema'
    assert choose_param_key(None, None, False) == 'params_ema'
    assert choose_param_key('none', {'param_key_g': 'params_ema'}, True) == 'none'  # --param-key wins


@pytest.fixture()
def two_entries(tmp_path):
    """A HAT checkpoint whose params and params_ema differ, and option files naming it."""
    torch.manual_seed(0)
    params = build_network(dict(HAT)).state_dict()
    torch.manual_seed(1)
    ema = build_network(dict(HAT)).state_dict()
    weights = tmp_path / 'net_g.pth'
    torch.save({'params': params, 'params_ema': ema}, weights)
    return weights, {'params': params, 'params_ema': ema}


def _option_file(tmp_path, weights, **path):
    opt = {'name': 'rule', 'model_type': 'HATModel', 'scale': 2, 'num_gpu': 0, 'is_train': False, 'dist': False,
           'rank': 0, 'world_size': 1, 'network_g': dict(HAT),
           'path': dict({'pretrain_network_g': str(weights), 'strict_load_g': True}, **path), 'val': {}}
    file = tmp_path / f"opt_{path.get('param_key_g', 'default')}.yml"
    file.write_text(yaml.safe_dump(opt))
    return opt, file


def _infer_net(argv):
    parser = argparse.ArgumentParser()
    infer_cli.add_arguments(parser)
    setup = infer_cli.resolve_setup(parser.parse_args(['-i', 'unused', '-o', 'unused'] + argv))
    return infer_cli.build_model(setup, torch.device('cpu'))


def _same(state, expected):
    return all(torch.equal(state[k], v) for k, v in expected.items() if v.is_floating_point())


@pytest.mark.parametrize('param_key_g,expected', [(None, 'params'), ('params_ema', 'params_ema')])
def test_test_infer_and_export_load_the_same_entry_under_one_option_file(tmp_path, two_entries, param_key_g, expected):
    weights, entries = two_entries
    opt, file = _option_file(tmp_path, weights, **({'param_key_g': param_key_g} if param_key_g else {}))
    tested = build_model(dict(opt)).net_g  # `basicsr test`: CSRModel.load_network as BasicSR calls it
    inferred = _infer_net(['--opt', str(file)])
    out = tmp_path / f'{expected}.safetensors'
    assert main(['export', '--weights', str(weights), '--opt', str(file), '-o', str(out)]) == 0
    exported = read_checkpoint(out)
    other = 'params' if expected == 'params_ema' else 'params_ema'
    for state in (tested.state_dict(), inferred.state_dict(), exported):
        assert _same(state, entries[expected]) and not _same(state, entries[other])


def test_bare_weights_load_params_ema_in_infer_and_export(tmp_path, two_entries):
    weights, entries = two_entries
    assert _same(_infer_net(['--weights', str(weights), '--device', 'cpu']).state_dict(), entries['params_ema'])
    out = tmp_path / 'bare.safetensors'
    assert main(['export', '--weights', str(weights), '-o', str(out)]) == 0
    assert _same(read_checkpoint(out), entries['params_ema'])


def test_training_safetensors_swap_for_the_pth_under_one_option_file(tmp_path):
    from basicsr.models import build_model as build

    root = str(tmp_path)
    os.makedirs(os.path.join(root, 'models'))
    net_opt = dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, upscale=4)
    opt = {'name': 'swap', 'model_type': 'MambaCSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 3, 'dist': False,
           'rank': 0, 'world_size': 1, 'is_train': True, 'network_g': net_opt, 'logger': {'save_safetensors': True},
           'path': {'pretrain_network_g': None, 'strict_load_g': True, 'models': os.path.join(root, 'models'),
                    'training_states': root},
           'train': {'ema_decay': 0.5, 'optim_g': {'type': 'Adam', 'lr': 1e-2}, 'total_iter': 2,
                     'scheduler': {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5},
                     'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}}
    model = build(opt)
    g = torch.Generator().manual_seed(0)
    model.feed_data({'lq': torch.rand(1, 3, 8, 8, generator=g), 'gt': torch.rand(1, 3, 32, 32, generator=g)})
    model.optimize_parameters(1)
    model.save(0, 1)
    models = tmp_path / 'models'
    pth = torch.load(models / 'net_g_1.pth', weights_only=True)
    assert not _same(pth['params'], pth['params_ema'])
    files = {'params': models / 'net_g_1.safetensors', 'params_ema': models / 'net_g_1_ema.safetensors'}
    for key, file in files.items():  # the .pth and the entry's .safetensors restore the same network
        from_pth, from_st = build_network(dict(net_opt)), build_network(dict(net_opt))
        load_weights(from_pth, str(models / 'net_g_1.pth'), param_key=key)
        assert load_weights(from_st, str(file), param_key=key) == key
        assert _same(from_st.state_dict(), from_pth.state_dict()) and _same(from_st.state_dict(), pth[key])
    # an entry a file does not hold: an error naming the file, the entry it holds and the file that holds it
    with pytest.raises(CheckpointError, match=r"net_g_1\.safetensors' holds the 'params' weights .*not 'params_ema'"
                       r".*net_g_1_ema\.safetensors"):
        load_weights(build_network(dict(net_opt)), str(files['params']), param_key='params_ema')
    with pytest.raises(CheckpointError, match=r"holds the 'params_ema' weights .*not 'params'.*'net_g_1\.safetensors'"):
        load_weights(build_network(dict(net_opt)), str(files['params_ema']), param_key='params')


def test_export_metadata_rebuilds_the_saved_network_exactly(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / 'net_g.pth'
    torch.save({'params': build_network(dict(HAT)).state_dict()}, weights)
    out = tmp_path / 'x.safetensors'
    # options no weight shows: detection would reset them to the released defaults (img_range 1, qk_scale None)
    assert main(['export', '--weights', str(weights), '-o', str(out), '--arch-opt', 'img_range=255.',
                 'qk_scale=0.25', 'img_size=16']) == 0
    capsys.readouterr()
    parser = argparse.ArgumentParser()
    infer_cli.add_arguments(parser)
    setup = infer_cli.resolve_setup(parser.parse_args(['-i', 'u', '-o', 'u', '--weights', str(out)]))
    assert setup.network_opt['img_range'] == 255. and setup.network_opt['qk_scale'] == 0.25
    assert any('metadata' in note for note in setup.notes)
    again = tmp_path / 'again.safetensors'
    assert main(['export', '--weights', str(out), '-o', str(again)]) == 0
    assert 'from the metadata' in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(again), 'pt') as f:
        meta = f.metadata()
    assert json.loads(meta['network_g'])['img_range'] == 255. and meta['written_by'] == 'mambacsr_arch'
    # --arch-opt still overrides the metadata, and says so
    setup = infer_cli.resolve_setup(parser.parse_args(['-i', 'u', '-o', 'u', '--weights', str(out),
                                                       '--arch-opt', 'img_range=1.']))
    assert setup.network_opt['img_range'] == 1.
    assert any("overridden by --arch-opt / the option file: {'img_range': 1.0}" in note for note in setup.notes)
