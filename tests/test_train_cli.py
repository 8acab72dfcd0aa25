"""End to end through the console script: ``basicsr train`` / ``basicsr test`` in subprocesses.

* a tiny network trains a few iterations on scikit-image photos (JPEG degradation on the fly),
  validates, writes checkpoints; ``basicsr test`` reloads them and reproduces the validation PSNR;
* a run killed with SIGKILL in the middle of writing a training state resumes with
  ``--auto_resume`` from the last complete state and ends with the same weights as an
  uninterrupted run.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from helpers_images import make_image_folder

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASICSR = osp.join(osp.dirname(sys.executable), 'basicsr')
TIMEOUT = 300

pytestmark = pytest.mark.slow


def tiny_network() -> dict:
    """A small MambaCSR network_g for CPU tests (DIS + cross-scale, so every block type runs)."""
    return dict(type='MambaCSR', upscale=4, in_chans=3, img_size=16, embed_dim=24, d_state=4, scan_size=4,
                depths=[1], depths2=[1], mlp_ratio=1.0, img_range=1.0, upsampler='pixelshuffle',
                resi_connection='1conv', dual_interleaved_scan=True, cross_scale_scan=True)


def train_options(name: str, gt_dir: str, total_iter: int, save_freq: int, val_freq: int) -> dict:
    dataset = dict(type='JPEGDegradedPairedDataset', dataroot_gt=gt_dir, jpeg_quality=10)
    return {
        'name': name, 'model_type': 'MambaCSRModel', 'scale': 4, 'num_gpu': 'auto', 'manual_seed': 7,
        'datasets': {
            'train': dict(dataset, name='train', gt_size=32, use_hflip=True, use_rot=True, use_shuffle=True,
                          num_worker_per_gpu=0, batch_size_per_gpu=2, dataset_enlarge_ratio=1),
            'val': dict(dataset, name='val'),
        },
        'network_g': tiny_network(),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0.9,
            'optim_g': {'type': 'Adam', 'lr': 1e-3, 'weight_decay': 0, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [3], 'gamma': 0.5},
            'total_iter': total_iter, 'warmup_iter': -1,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
        },
        'val': {'val_freq': val_freq, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': save_freq, 'use_tb_logger': False},
    }


def write_yaml(path: str, opt: dict) -> str:
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return path


def start(args, cwd) -> subprocess.Popen:
    # One thread everywhere: the runs compared bit for bit must not depend on how many threads torch's own
    # kernels use (the cpu scan kernel itself is thread-count independent); PASSIVE stops idle spinning.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1',
               NUMBA_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, check=True) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if check and proc.returncode != 0:
        raise AssertionError(f'{proc.args} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}')
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(args, cwd, check=True) -> subprocess.CompletedProcess:
    return finish(start(args, cwd), check)


def psnr_lines(text: str) -> list:
    return [float(v) for v in re.findall(r'# psnr: ([0-9.]+)', text)]


def log_text(folder: str) -> str:
    return ''.join(open(osp.join(folder, f), encoding='utf-8').read() for f in sorted(os.listdir(folder))
                   if f.endswith('.log'))


@pytest.fixture(scope='module')
def gt_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp('photos') / 'gt'
    make_image_folder(folder, names=('astronaut', 'chelsea', 'coffee', 'rocket'), size=(48, 48))
    return str(folder)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, gt_dir) -> dict:
    """Two runs side by side: uninterrupted (8 iterations, 2 per epoch, checkpoints every 2, validation
    at 4 and 8), and one SIGKILLed half-way through writing its 6.state."""
    ref, killed = str(tmp_path_factory.mktemp('ref')), str(tmp_path_factory.mktemp('killed'))
    procs = []
    for cwd in (ref, killed):
        opt_path = write_yaml(osp.join(cwd, 'train.yml'), train_options('tiny', gt_dir, 8, 2, 4))
        if cwd == ref:
            procs.append(start([BASICSR, 'train', '-opt', opt_path], cwd))
        else:
            killer = osp.join(cwd, 'killer.py')
            with open(killer, 'w', encoding='utf-8') as f:
                f.write(KILLER.replace('{victim}', '6.state'))
            procs.append(start([sys.executable, killer, '-opt', opt_path], cwd))
    finish(procs[0])
    return {'ref': ref, 'killed': killed, 'killed_result': finish(procs[1], check=False)}


@pytest.fixture(scope='module')
def reference_run(runs) -> str:
    return runs['ref']


def test_train_writes_checkpoints_and_test_reproduces_psnr(reference_run, gt_dir):
    exp = osp.join(reference_run, 'experiments', 'tiny')
    models = sorted(os.listdir(osp.join(exp, 'models')))
    assert {'net_g_2.pth', 'net_g_8.pth', 'net_g_latest.pth'} <= set(models)
    assert sorted(os.listdir(osp.join(exp, 'training_states'))) == ['2.state', '4.state', '6.state', '8.state']
    assert not [f for f in os.listdir(osp.join(exp, 'models')) if f.endswith('.tmp')]
    train_psnr = psnr_lines(log_text(exp))
    assert len(train_psnr) == 3  # iterations 4 and 8, then the final validation

    ckpt = torch.load(osp.join(exp, 'models', 'net_g_latest.pth'), map_location='cpu', weights_only=True)
    assert set(ckpt) == {'params', 'params_ema'}

    test_opt = {
        'name': 'tiny_test', 'model_type': 'MambaCSRModel', 'scale': 4, 'num_gpu': 'auto', 'manual_seed': 7,
        'datasets': {'test': dict(name='val', type='JPEGDegradedPairedDataset', dataroot_gt=gt_dir,
                                  jpeg_quality=10)},
        'network_g': tiny_network(),
        'path': {'pretrain_network_g': osp.join(exp, 'models', 'net_g_latest.pth'), 'param_key_g': 'params_ema',
                 'strict_load_g': True},
        'val': {'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
    }
    cwd = osp.dirname(gt_dir)
    run([BASICSR, 'test', '-opt', write_yaml(osp.join(cwd, 'test.yml'), test_opt)], cwd)
    test_psnr = psnr_lines(log_text(osp.join(cwd, 'results', 'tiny_test')))
    assert test_psnr == [pytest.approx(train_psnr[-1], abs=1e-4)]


KILLER = textwrap.dedent('''
    """Run `basicsr train` but SIGKILL the process half-way through writing {victim}."""
    import os, signal, sys
    import mambacsr_arch.models.checkpoint_io as io

    real_save = io.torch.save

    def dying_save(obj, f, *args, **kwargs):
        name = getattr(f, 'name', str(f))
        if name.endswith('{victim}.' + str(os.getpid()) + '.tmp'):
            f.write(b'half a checkpoint')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    io.torch.save = dying_save
    from mambacsr_arch.cli.main import main
    sys.exit(main(['train'] + sys.argv[1:]))
''')


def test_kill9_then_auto_resume_matches_uninterrupted(runs):
    cwd, reference_run, killed = runs['killed'], runs['ref'], runs['killed_result']
    opt_path = osp.join(cwd, 'train.yml')
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    states = osp.join(cwd, 'experiments', 'tiny', 'training_states')
    assert sorted(f for f in os.listdir(states) if f.endswith('.state')) == ['2.state', '4.state']
    assert [f for f in os.listdir(states) if f.endswith('.tmp')], 'the kill should leave a partial temp file'

    resumed = run([BASICSR, 'train', '-opt', opt_path, '--auto_resume'], cwd)
    assert 'iter: 4' in log_text(osp.join(cwd, 'experiments', 'tiny')) or 'iter: 4' in resumed.stdout + resumed.stderr

    ref = torch.load(osp.join(reference_run, 'experiments', 'tiny', 'models', 'net_g_latest.pth'),
                     map_location='cpu', weights_only=True)
    got = torch.load(osp.join(cwd, 'experiments', 'tiny', 'models', 'net_g_latest.pth'), map_location='cpu',
                     weights_only=True)
    for key in ('params', 'params_ema'):
        assert ref[key].keys() == got[key].keys()
        for name in ref[key]:
            assert torch.equal(ref[key][name], got[key][name]), f'{key}/{name} differs after resume'


def test_demo_option_file_runs_and_logs_baseline(tmp_path):
    """The README's main command, cut to 2 iterations: photos exported, training, validation + baseline."""
    from mambacsr_arch.data.demo_photos import export

    cwd = str(tmp_path)
    export(osp.join(cwd, 'datasets', 'skimage_demo'))
    demo = osp.join(REPO, 'options', 'demo_mambacsr_x4.yml')
    run([BASICSR, 'train', '-opt', demo, '--force_yml', 'train:total_iter=2', 'val:val_freq=2',
         'logger:save_checkpoint_freq=2', 'logger:print_freq=1'], cwd)
    text = log_text(osp.join(cwd, 'experiments', 'demo_mambacsr_x4'))
    assert 'Bicubic baseline skimage_demo_val' in text
    assert len(psnr_lines(text)) >= 2  # network and baseline
    assert osp.isfile(osp.join(cwd, 'experiments', 'demo_mambacsr_x4', 'models', 'net_g_latest.pth'))


def test_torchrun_two_cpu_processes_train_mambacsr(tmp_path, gt_dir):
    """`torchrun --nproc_per_node=2 -m mambacsr_arch.train ... --launcher pytorch` on CPU (gloo)."""
    torchrun = osp.join(osp.dirname(sys.executable), 'torchrun')
    opt = train_options('ddp_mambacsr', gt_dir, total_iter=2, save_freq=2, val_freq=2)
    opt_path = write_yaml(str(tmp_path / 'ddp.yml'), opt)
    run([torchrun, '--standalone', '--nproc_per_node=2', '-m', 'mambacsr_arch.train', '-opt', opt_path,
         '--launcher', 'pytorch'], str(tmp_path))
    exp = tmp_path / 'experiments' / 'ddp_mambacsr'
    log = log_text(str(exp))
    assert 'World size (gpu number): 2' in log
    assert psnr_lines(log), 'rank 0 validated'
    saved = torch.load(exp / 'models' / 'net_g_2.pth', weights_only=True)
    assert not any(k.startswith('module.') for k in saved['params']), 'DDP wrapper leaked into the checkpoint'
    assert (exp / 'training_states' / '2.state').is_file()
