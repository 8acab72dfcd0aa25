"""`basicsr train|test|env` through our CLI on CPU: plain run, auto-resume, 2-process torchrun.

The network is BasicSR's own tiny MSRResNet with BasicSR's SRModel and PairedImageDataset:
these tests check the runtime (CLI, CPU distributed, resume), not our archs, and show that a
user's existing BasicSR experiment runs unchanged through the plugin's CLI.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import cv2
import pytest
import torch
import yaml
from skimage import data as skdata

BIN = osp.dirname(sys.executable)


def _write_pairs(root: str, count: int = 4, gt_px: int = 48, scale: int = 4) -> None:
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    os.makedirs(osp.join(root, 'gt'), exist_ok=True)
    os.makedirs(osp.join(root, 'lq'), exist_ok=True)
    for i in range(count):
        rgb = photos[i % len(photos)]
        gt = cv2.resize(rgb, (gt_px, gt_px), interpolation=cv2.INTER_AREA)[:, :, ::-1]
        lq = cv2.resize(gt, (gt_px // scale, gt_px // scale), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(osp.join(root, 'gt', f'{i:03d}.png'), gt)
        cv2.imwrite(osp.join(root, 'lq', f'{i:03d}.png'), lq)


def _options(name: str, total_iter: int, save_freq: int) -> dict:
    paired = {'type': 'PairedImageDataset', 'dataroot_gt': 'data/gt', 'dataroot_lq': 'data/lq',
              'io_backend': {'type': 'disk'}}
    return {
        'name': name, 'model_type': 'SRModel', 'scale': 4, 'num_gpu': 'auto', 'manual_seed': 10,
        'datasets': {
            'train': dict(paired, name='train', gt_size=32, use_hflip=True, use_rot=True,
                          num_worker_per_gpu=0, batch_size_per_gpu=2, dataset_enlarge_ratio=1,
                          prefetch_mode=None),
            'val': dict(paired, name='val'),
        },
        'network_g': {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8,
                      'num_block': 1, 'upscale': 4},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 1e-3},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                  'total_iter': total_iter, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
        'val': {'val_freq': save_freq, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': save_freq, 'use_tb_logger': False},
    }


@pytest.fixture
def workdir(tmp_path):
    _write_pairs(str(tmp_path / 'data'))
    return tmp_path


def _write_yaml(path, opt):
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f)
    return str(path)


def _run(args, cwd, timeout=600, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert proc.returncode == 0, f'{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc


def _train_log(exp_dir):
    logs = sorted(f for f in os.listdir(exp_dir) if f.startswith('train_') and f.endswith('.log'))
    return ''.join(open(osp.join(exp_dir, f)).read() for f in logs)


def test_train_then_auto_resume_from_first_checkpoint_on_cpu(workdir):
    opt = _options('tiny_resume', total_iter=2, save_freq=2)
    yml = _write_yaml(workdir / 'tiny.yml', opt)
    _run([osp.join(BIN, 'basicsr'), 'train', '-opt', yml], cwd=workdir)
    exp = workdir / 'experiments' / 'tiny_resume'
    assert (exp / 'training_states' / '2.state').is_file()
    assert (exp / 'models' / 'net_g_2.pth').is_file()
    first = torch.load(exp / 'models' / 'net_g_2.pth', weights_only=True)['params']

    # the "interrupted" run continues to 4 iterations from its iteration-2 state
    _run([osp.join(BIN, 'basicsr'), 'train', '-opt', yml, '--auto_resume',
          '--force_yml', 'train:total_iter=4'], cwd=workdir)
    log = _train_log(exp)
    assert re.search(r'Resuming training from epoch: \d+, iter: 2\.', log), log[-2000:]
    assert (exp / 'models' / 'net_g_4.pth').is_file()
    assert (exp / 'training_states' / '4.state').is_file()
    resumed = torch.load(exp / 'models' / 'net_g_4.pth', weights_only=True)['params']
    assert any(not torch.equal(first[k], resumed[k]) for k in first), 'training did not continue'


def test_experiments_root_option_and_python_dash_m(workdir):
    opt = _options('tiny_root', total_iter=1, save_freq=1)
    opt['path']['experiments_root'] = 'elsewhere/run1'
    yml = _write_yaml(workdir / 'tiny.yml', opt)
    _run([sys.executable, '-m', 'mambacsr_arch.train', '-opt', yml], cwd=workdir)
    assert (workdir / 'elsewhere' / 'run1' / 'models' / 'net_g_1.pth').is_file()
    assert not (workdir / 'experiments' / 'tiny_root').exists()

    test_opt = _options('tiny_root_test', total_iter=1, save_freq=1)
    del test_opt['datasets']['train'], test_opt['train'], test_opt['logger']
    test_opt['datasets'] = {'test_1': dict(test_opt['datasets']['val'], name='val')}
    test_opt['path'] = {'pretrain_network_g': 'elsewhere/run1/models/net_g_1.pth', 'strict_load_g': True}
    yml = _write_yaml(workdir / 'tiny_test.yml', test_opt)
    _run([osp.join(BIN, 'basicsr'), 'test', '-opt', yml], cwd=workdir)
    logs = os.listdir(workdir / 'results' / 'tiny_root_test')
    assert any(f.startswith('test_tiny_root_test') for f in logs), logs


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_rank0_saves(workdir):
    torchrun = osp.join(BIN, 'torchrun')
    if not osp.exists(torchrun):
        pytest.skip('torchrun not installed next to this python')
    opt = _options('tiny_ddp', total_iter=3, save_freq=3)
    yml = _write_yaml(workdir / 'ddp.yml', opt)
    _run([torchrun, '--standalone', '--nproc_per_node=2', '-m', 'mambacsr_arch.train', '-opt', yml,
          '--launcher', 'pytorch'], cwd=workdir, env={'CUDA_VISIBLE_DEVICES': ''})
    exp = workdir / 'experiments' / 'tiny_ddp'
    log = _train_log(exp)
    assert 'World size (gpu number): 2' in log
    assert re.search(r'iter:\s+3,', log), log[-2000:]
    assert (exp / 'models' / 'net_g_3.pth').is_file()
    assert (exp / 'training_states' / '3.state').is_file()
    # only rank 0 writes: exactly one log file and no archived duplicate experiment folders
    assert len([f for f in os.listdir(exp) if f.endswith('.log')]) == 1
    assert [d for d in os.listdir(workdir / 'experiments')] == ['tiny_ddp']


def test_local_rank_spelling_is_normalized():
    from mambacsr_arch.cli.runtime import normalize_argv

    assert normalize_argv(['-opt', 'x.yml', '--local-rank=1']) == ['-opt', 'x.yml', '--local_rank=1']
    assert normalize_argv(['--local-rank', '0']) == ['--local_rank', '0']


def test_env_command_names_the_scan_backend():
    proc = _run([osp.join(BIN, 'basicsr'), 'env'], cwd=os.getcwd())
    assert 'active backend for CPU tensors:' in proc.stdout
    assert re.search(r'active backend for CPU tensors:\s+(cpu|torch) \(', proc.stdout), proc.stdout
    assert 'basicsr' in proc.stdout and 'torch' in proc.stdout
    assert 'mamba_ssm' in proc.stdout  # missing here: named with its install command
    assert "mamba-ssm (the [cuda] extra)" in proc.stdout


def test_env_reports_an_unusable_backend_request_instead_of_crashing():
    proc = _run([osp.join(BIN, 'basicsr'), 'env'], cwd=os.getcwd(),
                env={'MAMBACSR_SCAN_BACKEND': 'mamba_ssm'})
    assert 'active backend for CPU tensors:  error (' in proc.stdout
    assert 'mamba_ssm' in proc.stdout


def test_env_shows_the_cpu_scan_threads_and_where_they_come_from():
    from mambacsr_arch.cli import env

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv('MAMBACSR_SCAN_THREADS', raising=False)
        threads, why = env.collect()['scan_threads_cpu']
        assert threads == torch.get_num_threads() and 'torch.get_num_threads()' in why
        mp.setenv('MAMBACSR_SCAN_THREADS', '3')
        report = env.collect()
        assert report['scan_threads_cpu'] == (3, 'MAMBACSR_SCAN_THREADS environment variable')
        assert 'cpu scan threads:                3 (MAMBACSR_SCAN_THREADS' in env.format_report(report)
        mp.setenv('MAMBACSR_SCAN_THREADS', 'many')  # reported, not raised
        threads, why = env.collect()['scan_threads_cpu']
        assert threads == 'error' and "MAMBACSR_SCAN_THREADS='many'" in why


def test_unknown_command_fails_with_usage(capsys):
    from mambacsr_arch.cli.main import main

    assert main(['nope']) == 2
    assert 'unknown command' in capsys.readouterr().err
