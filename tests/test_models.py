"""Model classes in-process: weight loading, atomic checkpoints, non-finite guard, AMP, RNG state, DDP on CPU."""
from __future__ import annotations

import os
import os.path as osp
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims and registration before basicsr)
from basicsr.models import build_model
from basicsr.utils.registry import MODEL_REGISTRY
from mambacsr_arch.models import checkpoint_io
from mambacsr_arch.models.checkpoint_io import atomic_torch_save, capture_rng_state, restore_rng_state
from mambacsr_arch.models.weights import load_weights

SMALL_NET = dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, upscale=4)


def make_opt(tmp_path, is_train: bool = True, network=None, **train_extra) -> dict:
    root = str(tmp_path)
    for sub in ('models', 'training_states'):
        os.makedirs(osp.join(root, sub), exist_ok=True)
    opt = {
        'name': 'unit', 'model_type': 'MambaCSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 3, 'dist': False,
        'rank': 0, 'world_size': 1, 'is_train': is_train, 'network_g': dict(network or SMALL_NET),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'models': osp.join(root, 'models'),
                 'training_states': osp.join(root, 'training_states')},
        'val': {'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
    }
    if is_train:
        opt['train'] = dict({
            'ema_decay': 0.5, 'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5}, 'total_iter': 10,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}}, **train_extra)
    return opt


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {'lq': torch.rand(2, 3, 8, 8, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g)}


def test_models_registered():
    assert MODEL_REGISTRY.get('MambaCSRModel').__name__ == 'MambaCSRModel'
    assert MODEL_REGISTRY.get('mambacsr_arch.HATModel').__name__ == 'HATModel'


# ----------------------------------------------------------------------------------------- loading
@pytest.fixture()
def net_and_state():
    from basicsr.archs import build_network

    torch.manual_seed(0)
    net = build_network(dict(SMALL_NET))
    return net, OrderedDict((k, torch.randn_like(v)) for k, v in net.state_dict().items())


def _assert_loaded(net, state):
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize('layout,param_key', [
    ('params_ema', 'params_ema'), ('params', 'params'), ('params_only', 'params_ema'), ('bare', None),
    ('bare', 'params')])
def test_load_weights_param_keys(tmp_path, net_and_state, layout, param_key):
    net, state = net_and_state
    other = OrderedDict((k, torch.zeros_like(v)) for k, v in state.items())
    content = {'params_ema': {'params_ema': state, 'params': other}, 'params': {'params': state, 'params_ema': other},
               'params_only': {'params': state}, 'bare': state}[layout]
    path = str(tmp_path / 'w.pth')
    torch.save(content, path)
    load_weights(net, path, param_key=param_key, strict=True)
    _assert_loaded(net, state)


def test_load_weights_strips_module_prefix(tmp_path, net_and_state):
    net, state = net_and_state
    path = str(tmp_path / 'ddp.pth')
    torch.save({'params': OrderedDict(('module.' + k, v) for k, v in state.items())}, path)
    load_weights(torch.nn.DataParallel(net), path, param_key='params')
    _assert_loaded(net, state)


def test_load_weights_mismatch_message(tmp_path):
    from basicsr.archs import build_network

    saved = build_network(dict(SMALL_NET, num_feat=16, num_block=2))
    path = str(tmp_path / 'big.pth')
    torch.save({'params': saved.state_dict()}, path)
    net = build_network(dict(SMALL_NET))
    with pytest.raises(RuntimeError) as err:
        load_weights(net, path, param_key='params', strict=True)
    message = str(err.value)
    assert 'big.pth' in message and 'unexpected keys' in message and 'body.1.conv1.weight' in message
    assert 'shape mismatches' in message and 'embed_dim: model has 8, checkpoint has 16' in message
    load_weights(net, path, param_key='params', strict=False)  # loads what fits, warns about the rest


def test_load_weights_bad_key_and_missing_file(tmp_path, net_and_state):
    net, state = net_and_state
    path = str(tmp_path / 'w.pth')
    torch.save({'params': state, 'meta': {'iter': 3}}, path)
    with pytest.raises(KeyError, match='param_key_g'):
        load_weights(net, path, param_key='weights')
    with pytest.raises(FileNotFoundError, match='pretrain_network_g'):
        load_weights(net, str(tmp_path / 'nope.pth'))


def test_arch_specific_mismatch_message_is_kept(tmp_path):
    from basicsr.archs import build_network

    small = dict(type='HAT', upscale=4, embed_dim=12, depths=[1], num_heads=[2], window_size=4, compress_ratio=3,
                 squeeze_factor=4, mlp_ratio=1.0, upsampler='pixelshuffle', img_size=16)
    path = str(tmp_path / 'hat.pth')
    torch.save({'params_ema': build_network(dict(small, embed_dim=24)).state_dict()}, path)
    with pytest.raises(RuntimeError, match='embed_dim'):
        load_weights(build_network(dict(small)), path, param_key='params_ema')


def test_model_loads_pretrained_with_param_key(tmp_path, net_and_state):
    net, state = net_and_state
    path = str(tmp_path / 'pre.pth')
    torch.save({'params_ema': state}, path)
    opt = make_opt(tmp_path, is_train=False)
    opt['path'].update(pretrain_network_g=path, param_key_g='params_ema')
    model = build_model(opt)
    _assert_loaded(model.net_g, state)


# ----------------------------------------------------------------------------------------- saving
def test_atomic_save_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    target = str(tmp_path / 'net_g_latest.pth')
    atomic_torch_save({'params': {'w': torch.ones(3)}}, target)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise RuntimeError('simulated crash mid-write')

    monkeypatch.setattr(checkpoint_io.torch, 'save', crashing_save)
    with pytest.raises(RuntimeError, match='mid-write'):
        atomic_torch_save({'params': {'w': torch.zeros(3)}}, target)
    monkeypatch.setattr(checkpoint_io.torch, 'save', real_save)
    assert torch.equal(torch.load(target, weights_only=True)['params']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['net_g_latest.pth']  # the temporary file was removed


def test_atomic_save_retries_then_raises(tmp_path, monkeypatch):
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        raise OSError('disk full')

    monkeypatch.setattr(checkpoint_io.torch, 'save', failing_save)
    monkeypatch.setattr(checkpoint_io.time, 'sleep', lambda s: None)
    with pytest.raises(OSError, match='after 3 attempts'):
        atomic_torch_save({}, str(tmp_path / '5.state'))
    assert len(calls) == 3 and os.listdir(tmp_path) == []


def test_model_save_crash_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = build_model(make_opt(tmp_path))
    model.feed_data(batch())
    model.optimize_parameters(1)
    model.save(0, 1)
    model.optimize_parameters(2)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(checkpoint_io.torch, 'save', crashing_save)
    with pytest.raises(KeyboardInterrupt):
        model.save(0, 2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / 'models')) == ['net_g_1.pth']
    assert sorted(os.listdir(tmp_path / 'training_states')) == ['1.state']
    state = torch.load(tmp_path / 'training_states' / '1.state', weights_only=True)  # as the CLI resumes it
    assert state['iter'] == 1 and 'rng' in state
    load_weights(build_model(make_opt(tmp_path, is_train=False)).net_g, str(tmp_path / 'models' / 'net_g_1.pth'),
                 param_key='params_ema')


def test_save_safetensors_writes_one_file_per_entry_next_to_each_pth(tmp_path):
    import json

    from mambacsr_arch.models.weights import read_checkpoint

    opt = make_opt(tmp_path)
    opt['logger'] = {'save_safetensors': True}
    model = build_model(opt)
    model.feed_data(batch())
    model.optimize_parameters(1)
    model.save(0, 1)
    models = tmp_path / 'models'
    assert sorted(os.listdir(models)) == ['net_g_1.pth', 'net_g_1.safetensors', 'net_g_1_ema.safetensors']
    pth = torch.load(models / 'net_g_1.pth', weights_only=True)
    assert any(not torch.equal(pth['params'][k], pth['params_ema'][k]) for k in pth['params'])  # ema_decay 0.5
    from safetensors import safe_open

    for name, key in (('net_g_1.safetensors', 'params'), ('net_g_1_ema.safetensors', 'params_ema')):
        st = read_checkpoint(str(models / name))
        assert st.keys() == pth[key].keys()
        for tensor_name, value in pth[key].items():
            assert torch.equal(st[tensor_name], value), (name, tensor_name)
        with safe_open(str(models / name), 'pt') as f:
            meta = f.metadata()
        assert meta['param_key'] == key and json.loads(meta['network_g'])['type'] == 'MSRResNet'
        entries = {'params': 'net_g_1.safetensors', 'params_ema': 'net_g_1_ema.safetensors'}
        assert json.loads(meta['entries']) == entries
        assert os.stat(models / name).st_mode & 0o777 == os.stat(models / 'net_g_1.pth').st_mode & 0o777


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(2)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(3))
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(state)
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.rand(3), expected[1])


# ----------------------------------------------------------------------------------------- training step
def test_non_finite_loss_raises_and_keeps_weights(tmp_path):
    model = build_model(make_opt(tmp_path))
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    data = batch()
    data['gt'][0, 0, 0, 0] = float('nan')
    model.feed_data(data)
    with pytest.raises(FloatingPointError, match='iteration 7.*l_pix=nan'):
        model.optimize_parameters(7)
    for key, value in model.net_g.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bf16_autocast_step_on_cpu(tmp_path):
    model = build_model(make_opt(tmp_path, use_amp='bf16'))
    assert model.train_amp == torch.bfloat16
    model.feed_data(batch())
    before = model.net_g.conv_first.weight.detach().clone()
    model.optimize_parameters(1)
    assert np.isfinite(model.get_current_log()['l_pix'])
    assert not torch.equal(before, model.net_g.conv_first.weight)
    assert model.net_g.conv_first.weight.dtype == torch.float32


def test_amp_option_errors(tmp_path):
    with pytest.raises(ValueError, match='use_amp'):
        build_model(make_opt(tmp_path, use_amp='int8'))
    with pytest.raises(ValueError, match='fp16 needs CUDA'):
        build_model(make_opt(tmp_path, use_amp='fp16'))


def test_torch_rng_reseeded_per_iteration(tmp_path):
    """Dropout-like draws depend on (seed, rank, iteration) only, not on the run's history."""
    model = build_model(make_opt(tmp_path))
    draws = []
    for history_seed, iteration in [(0, 4), (1, 4), (0, 5)]:
        torch.manual_seed(history_seed)
        model._reseed_torch(iteration)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    model.opt['rank'] = 1
    model._reseed_torch(4)
    assert not torch.equal(torch.rand(4), draws[0])


def test_validation_test_uses_tiles_and_bare_net(tmp_path):
    opt = make_opt(tmp_path, is_train=False)
    opt['val'].update(tile={'size': 8, 'overlap': 2}, pad_multiple=4)
    model = build_model(opt)
    model.feed_data({'lq': torch.rand(1, 3, 13, 11)})
    model.test()
    assert model.output.shape == (1, 3, 52, 44)


def test_num_gpu_without_cuda_is_explained(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('CUDA present')
    opt = make_opt(tmp_path)
    opt['num_gpu'] = 1
    with pytest.raises(RuntimeError, match='num_gpu: auto'):
        build_model(opt)


# ----------------------------------------------------------------------------------------- DDP on CPU
def _ddp_worker(rank: int, world: int, init_file: str, root: str) -> None:
    import torch.distributed as dist

    from basicsr.models import build_model as build

    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        opt = make_opt(root)
        opt.update(dist=True, rank=rank, world_size=world)
        model = build(opt)
        model.feed_data(batch(seed=rank))  # different data per rank
        model.optimize_parameters(1)
        if rank == 0:  # rank-0-only inference, as dist_validation does: must not wait for rank 1
            model.feed_data({'lq': torch.rand(1, 3, 9, 9)})
            model.test()
        random.seed(rank)  # each rank its own stream, as BasicSR seeds seed + rank
        model.save(0, 1)  # collective RNG gather on every rank, files written by rank 0
        dist.barrier()
        weights = torch.cat([p.detach().flatten() for p in model.get_bare_model(model.net_g).parameters()])
        torch.save({'wrapper': type(model.net_g).__name__, 'weights': weights}, osp.join(root, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_on_cpu_gloo_keeps_ranks_in_sync(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f'rank{rank}.pt', weights_only=True) for rank in range(2)]
    assert [r['wrapper'] for r in results] == ['DistributedDataParallel'] * 2
    torch.testing.assert_close(results[0]['weights'], results[1]['weights'], rtol=0, atol=0)
    state = torch.load(tmp_path / 'training_states' / '1.state', weights_only=True)
    assert len(state['rng']) == 2
    for rank in range(2):
        restore_rng_state(state['rng'][rank])
        value = random.random()
        random.seed(rank)
        assert value == random.random()


def test_bf16_step_with_tiny_mambacsr(tmp_path):
    net = dict(type='MambaCSR', upscale=4, embed_dim=24, d_state=4, scan_size=4, depths=[1], depths2=[1],
               mlp_ratio=1.0, cross_scale_scan=True)
    model = build_model(make_opt(tmp_path, network=net, use_amp='bf16'))
    model.feed_data(batch())
    model.optimize_parameters(1)
    assert np.isfinite(model.get_current_log()['l_pix'])
    assert all(p.dtype == torch.float32 for p in model.net_g.parameters())


def test_hat_model_pads_to_window_and_honours_official_tile_option(tmp_path):
    net = dict(type='HAT', upscale=4, embed_dim=12, depths=[1], num_heads=[2], window_size=4, compress_ratio=3,
               squeeze_factor=4, mlp_ratio=1.0, upsampler='pixelshuffle', img_size=16)
    opt = make_opt(tmp_path, is_train=False, network=net)
    opt['model_type'] = 'HATModel'
    opt['tile'] = {'tile_size': 8, 'tile_pad': 2}  # official HAT option file layout
    model = build_model(opt)
    kwargs = model.inference_kwargs(model.net_g)
    # HAT's own hard-cropped tiles (tile_process), not our blended ones
    assert (kwargs['tile_mode'], kwargs['pad_multiple'], kwargs['tile_size'], kwargs['tile_overlap']) \
        == ('hat', 4, 8, 2)
    model.feed_data({'lq': torch.rand(1, 3, 14, 17)})
    model.test()
    assert model.output.shape == (1, 3, 56, 68)
