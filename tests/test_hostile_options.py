"""Hostile option files: each mistake fails before any dataset or network is built, with one message.

Issue 15 items 4 (misspelt network_g key), 7 (scale vs network_g.upscale), 11 (checkpoint of the
other arch), and the HAT-only classes of the official HAT repository. The CLI cases call
``basicsr train|test|infer`` in-process (exit status 2 and one ``basicsr <cmd>: error:`` line on
stderr are the contract); the rest call our wrapped ``parse_options`` directly, as the CLI does.
"""
from __future__ import annotations

import os
import os.path as osp
import sys

import pytest
import torch
import yaml

import mambacsr_arch  # noqa: F401  (registers the archs before basicsr builds anything)
from basicsr.utils import options as basicsr_options
from helpers_images import make_image_folder
from mambacsr_arch.archs.hat.arch import HAT
from mambacsr_arch.archs.mambacsr.arch import MambaCSR
from mambacsr_arch.cli import runtime
from mambacsr_arch.cli.main import main as cli_main
from mambacsr_arch.cli.option_checks import OptionError
from mambacsr_arch.models.weights import load_weights

pytestmark = pytest.mark.hostile

TINY_MAMBACSR = dict(type='MambaCSR', upscale=4, img_size=16, embed_dim=24, d_state=4, scan_size=4, depths=[1],
                     depths2=[1], mlp_ratio=1.0, upsampler='pixelshuffle', cross_scale_scan=False)
TINY_HAT = dict(type='HAT', upscale=4, img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4,
                compress_ratio=3, squeeze_factor=4, mlp_ratio=2., upsampler='pixelshuffle')


def options(network_g=None, **top):
    """A complete, valid option dict (tiny MambaCSR x4, JPEG pairs made on the fly)."""
    dataset = dict(type='JPEGDegradedPairedDataset', dataroot_gt='data/gt', jpeg_quality=10)
    opt = {
        'name': 'hostile', 'model_type': 'MambaCSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 1,
        'datasets': {'train': dict(dataset, name='train', gt_size=32, use_hflip=True, use_rot=True,
                                   num_worker_per_gpu=0, batch_size_per_gpu=1, dataset_enlarge_ratio=1),
                     'val': dict(dataset, name='val')},
        'network_g': dict(network_g or TINY_MAMBACSR),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 1, 'warmup_iter': -1,
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5},
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'val': {'val_freq': 1, 'save_img': False},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 1, 'use_tb_logger': False},
    }
    opt.update(top)
    return opt


def write(path, opt) -> str:
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return str(path)


def parse(path, monkeypatch, is_train=True, extra=()):
    """Our CLI's parse_options (BasicSR's, wrapped), reading ``-opt path`` like the pipelines do."""
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', str(path), *extra])
    monkeypatch.chdir(osp.dirname(path))  # where options()' relative dataroot 'data/gt' is made
    os.makedirs('data/gt', exist_ok=True)
    return runtime.wrap_parse_options(basicsr_options.parse_options)(str(osp.dirname(path)), is_train=is_train)[0]


# ----------------------------------------------------------------------------- issue 15 item 4


@pytest.mark.parametrize('command', ['train', 'test'])
def test_misspelt_network_key_stops_train_and_test_before_anything_runs(tmp_path, monkeypatch, capsys, command):
    opt = options(network_g=dict(TINY_MAMBACSR, embed_dims=24))
    if command == 'test':
        opt['datasets'] = {'val1': opt['datasets']['val']}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))  # the command sets sys.argv for BasicSR; restored after
    code = cli_main([command, '-opt', write(tmp_path / 'typo.yml', opt)])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    error = [line for line in err.splitlines() if line.startswith(f'basicsr {command}: error:')]
    assert len(error) == 1, err[-3000:]
    assert "network_g: MambaCSR has no option 'embed_dims' (did you mean 'embed_dim'?)" in error[0]
    assert 'typo.yml' in error[0]
    assert not (tmp_path / 'experiments').exists() and not (tmp_path / 'results').exists()


def test_misspelt_network_key_stops_infer_before_building(tmp_path, capsys):
    torch.save({'params': MambaCSR(**{k: v for k, v in TINY_MAMBACSR.items() if k != 'type'}).state_dict()},
               tmp_path / 'net.pth')
    opt = options(network_g=dict(TINY_MAMBACSR, depth=[2]), path={'pretrain_network_g': str(tmp_path / 'net.pth')})
    make_image_folder(tmp_path / 'lq', names=('astronaut', ), size=(8, 8))
    code = cli_main(['infer', '-i', str(tmp_path / 'lq'), '-o', str(tmp_path / 'out'), '--no-progress',
                     '--opt', write(tmp_path / 'typo.yml', opt)])
    assert code == 2
    err = capsys.readouterr().err
    assert "basicsr infer: error: network_g: MambaCSR has no option 'depth' (did you mean 'depths'?)" in err
    assert not (tmp_path / 'out').exists()


def test_every_unknown_key_is_named_and_hat_gets_the_same_check(tmp_path, monkeypatch):
    opt = options(network_g=dict(TINY_HAT, windowsize=8, qkv_bais=False), model_type='HATModel')
    with pytest.raises(OptionError) as err:
        parse(write(tmp_path / 'o.yml', opt), monkeypatch)
    message = str(err.value)
    assert "'windowsize' (did you mean 'window_size'?)" in message
    assert "'qkv_bais' (did you mean 'qkv_bias'?)" in message
    assert 'HAT has no option' in message


# ----------------------------------------------------------------------------- issue 15 item 7


def test_scale_3_with_upscale_4_fails_at_parse_time_in_train(tmp_path, monkeypatch):
    with pytest.raises(OptionError, match=r"o\.yml'?: scale is 3 but network_g upscales x4.*same factor"):
        parse(write(tmp_path / 'o.yml', options(scale=3)), monkeypatch)


def test_missing_upscale_is_compared_through_the_arch_default(tmp_path, monkeypatch):
    network = {k: v for k, v in TINY_HAT.items() if k != 'upscale'}  # HAT's default upscale is 2
    with pytest.raises(OptionError, match=r'scale is 4 but network_g upscales x2 \(HAT default; the key is not set\)'):
        parse(write(tmp_path / 'o.yml', options(network_g=network, model_type='HATModel')), monkeypatch)


def test_force_yml_fixes_are_seen_by_the_checks(tmp_path, monkeypatch):
    opt = parse(write(tmp_path / 'o.yml', options(scale=3)), monkeypatch, extra=['--force_yml', 'scale=4'])
    assert opt['scale'] == 4 and opt['datasets']['train']['scale'] == 4


# ----------------------------------------------------------------------------- issue 15 item 11


def _tiny_state(network_opt):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in network_opt.items() if k != 'type'}
    return (MambaCSR if network_opt['type'] == 'MambaCSR' else HAT)(**kwargs)


@pytest.mark.parametrize('model_opt, ckpt_opt, said, not_said', [
    (TINY_MAMBACSR, TINY_HAT, 'this is a HAT checkpoint', 'cross_scale_scan'),
    (TINY_HAT, TINY_MAMBACSR, 'this is a MambaCSR checkpoint', 'compress_ratio'),
], ids=['hat-into-mambacsr', 'mambacsr-into-hat'])
def test_checkpoint_of_the_other_arch_is_named(tmp_path, model_opt, ckpt_opt, said, not_said):
    torch.save({'params': _tiny_state(ckpt_opt).state_dict()}, tmp_path / 'other.pth')
    with pytest.raises(RuntimeError) as err:
        load_weights(_tiny_state(model_opt), tmp_path / 'other.pth', param_key='params', strict=True)
    message = str(err.value)
    assert said in message and f"network_g.type: {ckpt_opt['type']}" in message, message
    assert not_said not in message, message  # no hyper-parameter blamed for an architecture difference
    assert 'strict_load_g: false' not in message  # loading the keys two architectures share: nonsense


# ----------------------------------------------------------------------------- HAT-only classes, unknown types


@pytest.mark.parametrize('where, name, instead', [
    ('dataset', 'ImageNetPairedDataset', 'JPEGDegradedPairedDataset'),
    ('model', 'RealHATMSEModel', 'model_type: HATModel'),
    ('model', 'RealHATGANModel', 'model_type: HATModel'),
])
def test_hat_only_classes_are_out_of_scope_with_what_to_use(tmp_path, monkeypatch, where, name, instead):
    opt = options(network_g=TINY_HAT, model_type='HATModel')
    if where == 'dataset':
        opt['datasets']['train']['type'] = name
    else:
        opt['model_type'] = name
    with pytest.raises(OptionError) as err:
        parse(write(tmp_path / 'o.yml', opt), monkeypatch)
    assert f"'{name}'" in str(err.value) and 'out of scope' in str(err.value) and instead in str(err.value)


def test_unknown_types_suggest_the_registered_name(tmp_path, monkeypatch):
    opt = options()
    opt['datasets']['val']['type'] = 'JPEGDegradedPairDataset'
    with pytest.raises(OptionError, match=r"datasets\.val\.type: unknown dataset 'JPEGDegradedPairDataset' "
                                          r"\(did you mean 'JPEGDegradedPairedDataset'\?\)"):
        parse(write(tmp_path / 'o.yml', opt), monkeypatch)
    with pytest.raises(OptionError, match=r"network_g\.type: unknown arch 'MambaCRS' \(did you mean 'MambaCSR'\?\)"):
        parse(write(tmp_path / 'o.yml', options(network_g=dict(TINY_MAMBACSR, type='MambaCRS'))), monkeypatch)


# ----------------------------------------------------------------------------- datasets section


def test_several_dataroot_folders_are_refused_naming_key_and_dataset(tmp_path, monkeypatch):
    opt = options()
    opt['datasets']['train']['dataroot_gt'] = ['data/a', 'data/b']
    with pytest.raises(OptionError, match=r'datasets\.train\.dataroot_gt lists 2 folders \(data/a, data/b\).*Merge'):
        parse(write(tmp_path / 'o.yml', opt), monkeypatch)


@pytest.mark.parametrize('key, command, message', [
    ('valid', 'train', r'dataset key datasets\.valid is not a phase'),
    ('test_1', 'train', r"basicsr train validates on val / val_<N> datasets; rename 'test_1' to 'val_1'"),
])
def test_dataset_keys_basicsr_would_reject_late(tmp_path, monkeypatch, key, command, message):
    opt = options()
    opt['datasets'][key] = opt['datasets'].pop('val')
    with pytest.raises(OptionError, match=message):
        parse(write(tmp_path / 'o.yml', opt), monkeypatch, is_train=command == 'train')


def test_val1_next_to_val_1_is_ambiguous(tmp_path, monkeypatch):
    opt = options()
    opt['datasets']['val1'] = opt['datasets']['val_1'] = opt['datasets'].pop('val')
    with pytest.raises(OptionError, match=r'datasets\.val1 and datasets\.val_1 are the same set'):
        parse(write(tmp_path / 'o.yml', opt), monkeypatch)


def test_broken_yaml_and_missing_sections_are_one_message(tmp_path, monkeypatch):
    bad = tmp_path / 'bad.yml'
    bad.write_text('name: x\nnetwork_g: {type: MambaCSR\n', encoding='utf-8')
    with pytest.raises(OptionError, match='not valid YAML'):
        parse(bad, monkeypatch)
    no_path = options()
    del no_path['path']
    with pytest.raises(OptionError, match=r"o\.yml': the path section is missing"):
        parse(write(tmp_path / 'o.yml', no_path), monkeypatch)
    with pytest.raises(OptionError, match=r"option file '.*nothere\.yml' does not exist \(-opt\)"):
        parse(tmp_path / 'nothere.yml', monkeypatch)


def test_an_unusable_resume_state_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / 'data' / 'gt', ['astronaut'], (32, 32))
    state = tmp_path / 'broken.state'
    state.write_bytes(b'not a torch file')
    opt = options()
    opt['path']['resume_state'] = str(state)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    code = cli_main(['train', '-opt', write(tmp_path / 'resume.yml', opt)])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert 'Traceback' not in err
    assert any(line.startswith('basicsr train: error:') and 'broken.state' in line for line in err.splitlines()), err
