"""ONE inference-settings resolver: `basicsr test` and `basicsr infer` read an option file identically.

Covers the authors' option-file layouts (HAT's top-level ``tile``, MambaCSR's top-level
``padding_size``), typos and conflicts under the tile keys, ``--scale 0``, HAT's hard-cropped tiles
against a plain re-implementation of XPixelGroup/HAT's ``tile_process`` written here, and
``strict_load_g: false`` naming every key that did not load.
"""
from __future__ import annotations

import argparse
import logging
import os.path as osp
import re
from collections import OrderedDict

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mambacsr_arch  # noqa: F401  (shims and registration before basicsr)
from basicsr.archs import build_network
from basicsr.models import build_model
from helpers_images import photo_bgr
from mambacsr_arch.cli import infer as infer_cli
from mambacsr_arch.cli.main import main as cli_main
from mambacsr_arch.errors import EXIT_CONFIG
from mambacsr_arch.models import csr_model
from mambacsr_arch.models import inference
from mambacsr_arch.models.inference import InferenceSettings, resolve_inference_settings, restore_image
from mambacsr_arch.models.weights import load_weights

pytestmark = pytest.mark.hostile

HAT_TINY = dict(type='HAT', upscale=4, img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4,
                compress_ratio=3, squeeze_factor=4, mlp_ratio=1.0, upsampler='pixelshuffle')
MSRRESNET_TINY = dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, upscale=4)


def make_opt(network, model_type='HATModel', **top):
    """A `basicsr test` option dict as BasicSR's parser leaves it (no datasets needed here)."""
    opt = {'name': 'settings', 'model_type': model_type, 'scale': 4, 'num_gpu': 0, 'dist': False, 'rank': 0,
           'world_size': 1, 'is_train': False, 'network_g': dict(network),
           'path': {'pretrain_network_g': None, 'strict_load_g': True}, 'val': {}}
    for key, value in top.items():
        if key.startswith('val_'):
            opt['val'][key[4:]] = value
        else:
            opt[key] = value
    return opt


def infer_setup(argv, opt=None, tmp_path=None):
    """`basicsr infer`'s resolved setup for ``argv`` (plus ``--opt`` of ``opt`` written as YAML)."""
    import yaml

    parser = argparse.ArgumentParser()
    infer_cli.add_arguments(parser)
    args = ['-i', 'unused', '-o', 'unused'] + list(argv)
    if opt is not None:
        path = osp.join(str(tmp_path), 'opt.yml')
        with open(path, 'w') as f:
            yaml.safe_dump(opt, f)
        args += ['--opt', path]
    return infer_cli.resolve_setup(parser.parse_args(args))


# ----------------------------------------------------------------------------- test == infer == flags
CASES = {
    # the official HAT files' top-level tile: HAT's hard-cropped tiles everywhere
    'hat_top_level_tile': (dict(tile={'tile_size': 8, 'tile_pad': 2}),
                           ['--tile', '8', '--tile-overlap', '2', '--tile-mode', 'hat'],
                           InferenceSettings(tile_mode='hat', tile_size=8, tile_overlap=2)),
    # the official MambaCSR files' top-level padding_size: the official chop protocol, automatically
    'mambacsr_padding_size': (dict(padding_size=64), ['--padding-size', '64'],
                              InferenceSettings(official_protocol=True, padding_size=64)),
    'padding_size_turned_off': (dict(padding_size=32, val_official_protocol=False),
                                ['--padding-size', '32', '--no-official-protocol'],
                                InferenceSettings(padding_size=32)),
    'our_val_keys': (dict(val_tile={'size': 12, 'overlap': 4}, val_max_pixels=1000, val_pad_multiple=8,
                          val_use_amp='bf16'),
                     ['--tile', '12', '--tile-overlap', '4', '--max-pixels', '1000', '--pad-multiple', '8', '--bf16'],
                     InferenceSettings(tile_mode='blend', tile_size=12, tile_overlap=4, max_pixels=1000,
                                       pad_multiple=8, amp_dtype=torch.bfloat16)),
    'never_tile': (dict(val_tile={'size': 0}), ['--tile', '0'], InferenceSettings(tile_mode='none')),
    'defaults': (dict(), [], InferenceSettings()),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_option_file_cli_flags_and_model_agree(case, tmp_path):
    top, flags, expected = CASES[case]
    opt = make_opt(HAT_TINY, **top)
    model = build_model(opt)  # what `basicsr test` runs
    from_file = infer_setup(['--weights', 'w.pth'], opt, tmp_path)
    from_flags = infer_setup(['--weights', 'w.pth', '--scale', '4', '--arch', 'HAT'] + flags)
    assert model.inference_settings == from_file.settings == from_flags.settings == expected
    # the engine itself: `basicsr test`'s model.test() and infer's restore give the same pixels
    net = model.net_g
    lq = torch.rand(1, 3, 19, 23, generator=torch.Generator().manual_seed(0))
    model.feed_data({'lq': lq})
    model.test()
    via_infer = restore_image(net, lq, 4, **from_flags.settings.restore_kwargs(net))
    assert model.output.shape == via_infer.shape == (1, 3, 76, 92)
    assert torch.equal(model.output.float(), via_infer.float())
    assert model.inference_kwargs(net)['pad_multiple'] == (expected.pad_multiple or 4)  # HAT declares window_size


def test_flags_override_the_option_file(tmp_path):
    hat_file = make_opt(HAT_TINY, tile={'tile_size': 8, 'tile_pad': 2})
    hat_file['path']['pretrain_network_g'] = 'w.pth'
    assert infer_setup(['--tile', '16'], hat_file, tmp_path).settings == \
        InferenceSettings(tile_mode='hat', tile_size=16, tile_overlap=2)
    assert infer_setup(['--tile-mode', 'blend', '--tile-overlap', '3'], hat_file, tmp_path).settings == \
        InferenceSettings(tile_mode='blend', tile_size=8, tile_overlap=3)
    assert infer_setup(['--official-protocol'], hat_file, tmp_path).settings == \
        InferenceSettings(official_protocol=True, tile_overlap=2)
    official_file = make_opt(HAT_TINY, padding_size=64, val_use_amp='bf16')
    official_file['path']['pretrain_network_g'] = 'w.pth'
    assert infer_setup(['--tile', '64', '--fp32'], official_file, tmp_path).settings == \
        InferenceSettings(tile_mode='blend', tile_size=64)


# ----------------------------------------------------------------------------- hostile tile keys
@pytest.mark.parametrize('top,match', [
    (dict(val_tile={'szie': 8}), r"val\.tile\.szie.*size, overlap"),
    (dict(val_tile={'overlap': 8}), r'val\.tile needs size'),
    (dict(val_tile=192), r'val\.tile must be a mapping'),
    (dict(val_tile={'size': '8'}), r'val\.tile\.size must be an integer'),
    (dict(tile={'tile_size': 8, 'tile_pda': 2}), r"tile\.tile_pda.*tile_size, tile_pad"),
    (dict(tile={'tile_size': 8}), r'tile needs tile_pad'),
    (dict(tile={'tile_size': 8, 'tile_pad': 2}, val_tile={'size': 8}), r'keep one of them'),
    (dict(padding_size=64, val_tile={'size': 64}), r'val\.official_protocol: false'),
    (dict(val_official_protocol='yes'), r'official_protocol must be true or false'),
    (dict(val_tile={'size': 8, 'overlap': 8}), r'must exceed the tile overlap'),
    (dict(padding_size=0), r'padding_size must be an integer >= 1'),
])
def test_bad_tile_options_fail_before_any_work(top, match, tmp_path, capsys):
    opt = make_opt(HAT_TINY, **top)
    with pytest.raises(ValueError, match=match):
        build_model(opt)  # `basicsr test`: at model construction, before weights or data
    with pytest.raises(infer_cli.InferConfigError, match=match):
        infer_setup(['--weights', 'w.pth'], opt, tmp_path)


@pytest.mark.parametrize('argv,match', [
    (['--scale', '0'], r'--scale must be an integer >= 1 \(got 0\)'),
    (['--scale', '-2'], r'--scale must be an integer >= 1'),
    (['--tile-mode', 'hat'], r'--tile-mode hat needs a tile size'),
    (['--tile', '8', '--official-protocol'], r'exclude each other'),
    (['--tile', '-1'], r'--tile must be an integer >= 0'),
    (['--padding-size', '0'], r'--padding-size must be an integer >= 1'),
])
def test_bad_infer_flags_exit_2_naming_the_flag(argv, match, tmp_path, capsys):
    argv = ['infer', '-i', str(tmp_path), '-o', str(tmp_path / 'out'), '--arch', 'HAT', '--weights', 'w.pth',
            '--scale', '4'] + argv  # a later --scale wins
    assert cli_main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert re.search(match, err.strip().splitlines()[-1]), err


# ----------------------------------------------------------------------------- HAT's hard-cropped tiles
def hat_tile_process(net, lq, scale, window_size, tile_size, tile_pad):
    """XPixelGroup/HAT's HATModel pre_process + tile_process + post_process, written out plainly."""
    h, w = lq.shape[-2:]
    pad_h, pad_w = (-h) % window_size, (-w) % window_size
    img = F.pad(lq, (0, pad_w, 0, pad_h), mode='reflect')
    big_h, big_w = img.shape[-2:]
    out = torch.zeros(lq.shape[0], lq.shape[1], big_h * scale, big_w * scale)
    for row in range((big_h + tile_size - 1) // tile_size):
        for col in range((big_w + tile_size - 1) // tile_size):
            top, left = row * tile_size, col * tile_size
            bottom, right = min(top + tile_size, big_h), min(left + tile_size, big_w)
            ctx_top, ctx_left = max(top - tile_pad, 0), max(left - tile_pad, 0)
            ctx_bottom, ctx_right = min(bottom + tile_pad, big_h), min(right + tile_pad, big_w)
            with torch.no_grad():
                tile_out = net(img[:, :, ctx_top:ctx_bottom, ctx_left:ctx_right])
            dy, dx = (top - ctx_top) * scale, (left - ctx_left) * scale
            out[:, :, top * scale:bottom * scale, left * scale:right * scale] = \
                tile_out[:, :, dy:dy + (bottom - top) * scale, dx:dx + (right - left) * scale]
    return out[:, :, :h * scale, :w * scale]


@pytest.fixture(scope='module')
def tiny_hat():
    torch.manual_seed(0)
    return build_network(dict(HAT_TINY)).eval()


@pytest.mark.parametrize('size,tile,pad', [((21, 27), 8, 4), ((16, 16), 8, 0), ((13, 30), 12, 4)])
def test_hat_tiles_match_hat_tile_process(tiny_hat, size, tile, pad):
    lq = torch.from_numpy(photo_bgr('astronaut', size)[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    expected = hat_tile_process(tiny_hat, lq, 4, 4, tile, pad)
    settings = resolve_inference_settings({'tile': {'tile_size': tile, 'tile_pad': pad}})
    ours = restore_image(tiny_hat, lq, 4, **settings.restore_kwargs(tiny_hat))
    assert ours.shape == expected.shape == (1, 3, size[0] * 4, size[1] * 4)
    assert (ours - expected).abs().max().item() <= 1 / 255
    blended = restore_image(tiny_hat, lq, 4, tile_size=tile + 2 * pad, tile_overlap=2 * pad, pad_multiple=4)
    if (size[0] > tile or size[1] > tile) and pad:  # the previous mapping onto blended tiles really differed
        assert (blended - expected).abs().max().item() > 1 / 255


def test_hat_model_test_uses_hat_tiles(tiny_hat):
    model = build_model(make_opt(HAT_TINY, tile={'tile_size': 8, 'tile_pad': 4}))
    model.net_g.load_state_dict(tiny_hat.state_dict())
    lq = torch.rand(1, 3, 19, 22, generator=torch.Generator().manual_seed(1))
    model.feed_data({'lq': lq})
    model.test()
    expected = hat_tile_process(tiny_hat, lq, 4, 4, 8, 4)
    assert (model.output - expected).abs().max().item() <= 1 / 255


# ----------------------------------------------------------------------------- official MambaCSR protocol
class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture()
def basicsr_log():
    handler = LogCapture()
    logger = logging.getLogger('basicsr')  # BasicSR's logger does not propagate to the root (caplog)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_padding_size_turns_on_the_official_protocol_logged_once(basicsr_log):
    torch.manual_seed(0)
    model = build_model(make_opt(MSRRESNET_TINY, 'MambaCSRModel', padding_size=64))
    sizes = []
    model.net_g.register_forward_hook(lambda module, args, out: sizes.append(tuple(args[0].shape[-2:])))
    lq = torch.rand(1, 3, 200, 30, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        model.feed_data({'lq': lq})
        model.test()
    notes = [line for line in basicsr_log if 'official MambaCSR test protocol' in line]
    assert len(notes) == 1 and 'padding_size 64' in notes[0], basicsr_log
    assert sizes == [(128, 64)] * 4  # per test(): 2 chops of 125 x 30 LR px (100 + shave 25), flip-padded to 64
    net = model.net_g.eval()
    official = restore_image(net, lq, 4, official_protocol=True, official_padding_size=64)
    torch.testing.assert_close(model.output, official, rtol=0, atol=0)
    assert not torch.equal(model.output, restore_image(net, lq, 4))  # really not the whole image


def test_amp_parsing_has_one_home():
    assert csr_model.parse_amp is inference.parse_amp and csr_model.AMP_DTYPES is inference.AMP_DTYPES
    with pytest.raises(ValueError, match='val: use_amp must be bf16, fp16 or ~'):
        resolve_inference_settings({'val': {'use_amp': 'fp8'}})


# ----------------------------------------------------------------------------- strict_load_g: false
def test_non_strict_loading_lists_every_key_that_did_not_load(tmp_path, basicsr_log):
    torch.manual_seed(0)
    net = build_network(dict(HAT_TINY))
    source = build_network(dict(HAT_TINY)).state_dict()
    state = OrderedDict((k, v.clone() + 1) for k, v in source.items())  # distinct from net's initial values
    del state['conv_last.weight']
    state['conv_first.bias'] = torch.zeros(5)
    state['extra.weight'] = torch.zeros(2)
    path = tmp_path / 'partial.pth'
    torch.save({'params_ema': state}, path)
    load_weights(net, path, param_key='params_ema', strict=False)
    warning = '\n'.join(basicsr_log)
    for key in ('conv_last.weight', 'conv_first.bias', 'extra.weight'):
        assert key in warning, warning
    assert 'left as initialised' in warning and 'strict_load_g: false' in warning
    loaded = net.state_dict()
    for key, value in state.items():
        if key not in ('conv_first.bias', 'extra.weight'):
            assert torch.equal(loaded[key], value), key


def test_non_strict_loading_of_a_full_checkpoint_loads_everything_quietly(tmp_path, basicsr_log):
    torch.manual_seed(1)
    released = build_network(dict(HAT_TINY)).state_dict()
    path = tmp_path / 'released.pth'
    torch.save({'params_ema': released, 'params': released}, path)
    opt = make_opt(HAT_TINY)
    opt['path'].update(pretrain_network_g=str(path), strict_load_g=False, param_key_g='params_ema')
    model = build_model(opt)  # as the official HAT/MambaCSR test files load: strict_load_g false
    for key, value in model.net_g.state_dict().items():
        assert torch.equal(value, released[key]), key
    assert not [line for line in basicsr_log if 'NOT everything loaded' in line]
    total = len(released)
    assert any(f'{total} of {total} tensors' in line for line in basicsr_log), basicsr_log


def test_non_strict_loading_of_a_foreign_checkpoint_is_an_error(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'params': torch.nn.Sequential(torch.nn.Linear(4, 4)).state_dict()}, path)
    with pytest.raises(RuntimeError, match='not one tensor fits HAT'):
        load_weights(build_network(dict(HAT_TINY)), path, strict=False)


def test_infer_restores_like_the_model_with_the_hat_file(tmp_path, tiny_hat):
    """Pixels: `basicsr infer --opt <HAT file>` == HATModel.test() on the same image."""
    weights = tmp_path / 'hat.pth'
    torch.save({'params': tiny_hat.state_dict()}, weights)
    opt = make_opt(HAT_TINY, tile={'tile_size': 8, 'tile_pad': 4})
    opt['path']['pretrain_network_g'] = str(weights)
    image = photo_bgr('chelsea', (18, 21))
    cv2.imwrite(str(tmp_path / 'in.png'), image)
    setup = infer_setup([], opt, tmp_path)
    net = infer_cli.build_model(setup, torch.device('cpu'))
    restored = infer_cli.restore_file(net, str(tmp_path / 'in.png'), setup, torch.device('cpu'))
    model = build_model(opt)
    model.feed_data({'lq': torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255})
    model.test()
    expected = model.output[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1]
    np.testing.assert_array_equal(restored, expected)


def test_infer_says_once_that_padding_size_turned_on_the_official_protocol(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_network(dict(MSRRESNET_TINY))
    weights = osp.join(str(tmp_path), 'net.pth')
    torch.save({'params': net.state_dict()}, weights)
    opt = make_opt(MSRRESNET_TINY, 'MambaCSRModel', padding_size=64)
    opt['path']['pretrain_network_g'] = weights
    setup = infer_setup(['--device', 'cpu'], opt, tmp_path)
    infer_cli.build_model(setup, torch.device('cpu'))
    err = capsys.readouterr().err
    assert err.count('official MambaCSR test protocol: padding_size 64') == 1, err
