"""Every option file parses with BasicSR's parser, uses keys BasicSR 1.4.2 (or we) read, builds its
network (no forward for released sizes) and its datasets (pointed at tiny stand-in folders)."""
from __future__ import annotations

import glob
import os
import os.path as osp
import sys

import cv2
import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims and registration before basicsr)
from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.utils.options import parse_options
from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY
from helpers_images import photo_bgr

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
OPTION_FILES = sorted(glob.glob(osp.join(REPO, 'options', '*.yml')))
NAMES = [osp.basename(p) for p in OPTION_FILES]

# Keys read by BasicSR 1.4.2's train/test pipelines, SRModel/BaseModel, or by our model classes.
TOP_KEYS = {'name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'path', 'train',
            'val', 'logger', 'dist_params', 'find_unused_parameters', 'padding_size', 'tile'}
TRAIN_KEYS = {'ema_decay', 'optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt', 'perceptual_opt',
              'use_amp'}
VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'pbar', 'metrics', 'tile', 'max_pixels', 'pad_multiple',
            'official_protocol', 'use_amp', 'log_baseline', 'save_comparisons', 'plot_metrics'}
LOGGER_KEYS = {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb', 'save_safetensors'}
PATH_KEYS = {'pretrain_network_g', 'strict_load_g', 'resume_state', 'param_key_g', 'experiments_root',
             'results_root'}
PAIRED_KEYS = {'name', 'type', 'dataroot_gt', 'dataroot_lq', 'filename_tmpl', 'io_backend', 'meta_info_file',
               'gt_size', 'use_hflip', 'use_rot', 'use_shuffle', 'num_worker_per_gpu', 'batch_size_per_gpu',
               'dataset_enlarge_ratio', 'prefetch_mode', 'mean', 'std', 'color'}


def parse(path: str, monkeypatch) -> dict:
    is_train = osp.basename(path).startswith(('train_', 'demo_'))
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', path])
    opt, _ = parse_options(REPO, is_train=is_train)
    return opt


def test_option_files_exist():
    expected = {'train_mambacsr_x4.yml', 'train_mambacsr_x4_q20.yml', 'train_mambacsr_x4_q30.yml',
                'train_mambacsr_x4_q40.yml', 'train_mambacsr_x4_q10_wo_crossscale.yml', 'test_mambacsr_x4.yml',
                'train_hat_x4.yml', 'test_hat_x4.yml', 'train_hat_s_x4.yml', 'test_hat_s_x4.yml',
                'demo_mambacsr_x4.yml'}
    assert expected <= set(NAMES)


@pytest.mark.parametrize('path', OPTION_FILES, ids=NAMES)
def test_keys_are_read_by_basicsr_or_us(path, monkeypatch):
    opt = parse(path, monkeypatch)
    unknown = set(opt) - TOP_KEYS - {'dist', 'rank', 'world_size', 'auto_resume', 'is_train'}
    assert not unknown, unknown
    assert set(opt.get('train', {})) <= TRAIN_KEYS, set(opt['train']) - TRAIN_KEYS
    assert set(opt.get('val', {})) <= VAL_KEYS, set(opt['val']) - VAL_KEYS
    assert set(opt.get('logger', {})) <= LOGGER_KEYS
    assert set(opt['path']) - {'models', 'training_states', 'log', 'visualization'} <= PATH_KEYS
    assert opt['model_type'] in MODEL_REGISTRY and opt['network_g']['type'] in ARCH_REGISTRY
    for phase, dataset in opt['datasets'].items():
        assert phase.split('_')[0] in ('train', 'val', 'test'), phase
        if dataset['type'] == 'PairedImageDataset':
            assert set(dataset) - {'phase', 'scale'} <= PAIRED_KEYS, set(dataset) - PAIRED_KEYS
            assert dataset['filename_tmpl'] == '{}'  # prepare-csr keeps file names identical
        for key in ('dataroot_gt', 'dataroot_lq'):
            assert not osp.isabs(dataset.get(key) or ''), 'paths must be relative'
    for metric in (opt.get('val', {}).get('metrics') or {}).values():
        assert metric['crop_border'] == opt['scale'] and metric['test_y_channel'] is True
    if opt['is_train'] and 'milestones' in opt['train']['scheduler']:
        assert max(opt['train']['scheduler']['milestones']) < opt['train']['total_iter']


def _expected_network(name: str) -> dict:
    if 'hat_s' in name:
        return dict(embed_dim=144, compress_ratio=24, squeeze_factor=24, window_size=16, depths=[6] * 6,
                    num_heads=[6] * 6, conv_scale=0.01, overlap_ratio=0.5, mlp_ratio=2)
    if 'hat' in name:
        return dict(embed_dim=180, compress_ratio=3, squeeze_factor=30, window_size=16, depths=[6] * 6,
                    num_heads=[6] * 6, conv_scale=0.01, overlap_ratio=0.5, mlp_ratio=2)
    if 'demo' in name:
        return {}
    return dict(embed_dim=180, depths=[6] * 6, depths2=[6], d_state=16, scan_size=8, mlp_ratio=2, upscale=4,
                img_range=1.0, upsampler='pixelshuffle', resi_connection='1conv', dual_interleaved_scan=True,
                cross_scale_scan='wo_crossscale' not in name)


@pytest.mark.parametrize('path', OPTION_FILES, ids=NAMES)
def test_recipes_match_the_papers(path, monkeypatch):
    name = osp.basename(path)
    opt = parse(path, monkeypatch)
    for key, value in _expected_network(name).items():
        assert opt['network_g'][key] == value, (key, opt['network_g'][key])
    if name.startswith('train_'):
        train, data = opt['train'], opt['datasets']['train']
        assert (data['gt_size'], data['batch_size_per_gpu']) == (256, 4)
        assert train['optim_g'] == {'type': 'Adam', 'lr': 2e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]}
        assert train['scheduler'] == {'type': 'MultiStepLR', 'milestones': [150000, 250000, 275000], 'gamma': 0.5}
        assert (train['total_iter'], train['ema_decay'], train['pixel_opt']['type']) == (300000, 0.999, 'L1Loss')
        quality = name.split('_q')[1][:2] if '_q' in name else '10'
        assert data['dataroot_lq'].endswith(f'LQ_q{quality}_sub')
    if name == 'test_mambacsr_x4.yml':
        assert opt['val']['official_protocol'] is True and opt['padding_size'] == 64
        assert {d['name'] for d in opt['datasets'].values()} == {'Set5', 'Set14', 'Urban100', 'Manga109',
                                                                 'DIV2K_val'}


@pytest.mark.slow
@pytest.mark.parametrize('path', OPTION_FILES, ids=NAMES)
def test_builds_network(path, monkeypatch):
    opt = parse(path, monkeypatch)
    torch.manual_seed(0)
    net = build_network(dict(opt['network_g']))
    assert net.upscale == opt['scale']
    params = sum(p.numel() for p in net.parameters())
    if 'demo' in path:
        assert params < 2_000_000  # small enough for a CPU demo
    else:
        assert params > 5_000_000  # released sizes


def _stand_in_folders(root: str, scale: int, size: int) -> tuple:
    gt_dir, lq_dir = osp.join(root, 'GT'), osp.join(root, 'LQ')
    os.makedirs(gt_dir, exist_ok=True)
    os.makedirs(lq_dir, exist_ok=True)
    for name in ('astronaut', 'chelsea'):
        gt = photo_bgr(name, (size, size))
        cv2.imwrite(osp.join(gt_dir, f'{name}.png'), gt)
        cv2.imwrite(osp.join(lq_dir, f'{name}.png'), cv2.resize(gt, (size // scale, size // scale),
                                                               interpolation=cv2.INTER_AREA))
    return gt_dir, lq_dir


@pytest.mark.parametrize('path', OPTION_FILES, ids=NAMES)
def test_builds_datasets(path, monkeypatch, tmp_path):
    opt = parse(path, monkeypatch)
    gt_dir, lq_dir = _stand_in_folders(str(tmp_path), opt['scale'], 256)
    for phase, dataset_opt in opt['datasets'].items():
        dataset_opt = dict(dataset_opt, dataroot_gt=gt_dir)
        if dataset_opt.get('dataroot_lq'):
            dataset_opt['dataroot_lq'] = lq_dir
        dataset = build_dataset(dataset_opt)
        assert len(dataset) >= 2
        sample = dataset[0]
        assert sample['gt'].shape[-1] == sample['lq'].shape[-1] * opt['scale']
        if phase == 'train':
            assert sample['gt'].shape[-2:] == (dataset_opt['gt_size'],) * 2


def test_demo_photos_export_is_idempotent(tmp_path):
    from mambacsr_arch.data.demo_photos import TRAIN_PHOTOS, VAL_PHOTOS, export

    out = str(tmp_path / 'skimage_demo')
    assert export(out) is True
    stamp = os.stat(osp.join(out, 'manifest.txt')).st_mtime_ns
    assert export(out) is False
    assert os.stat(osp.join(out, 'manifest.txt')).st_mtime_ns == stamp
    assert sorted(os.listdir(osp.join(out, 'train'))) == sorted(f'{n}.png' for n in TRAIN_PHOTOS)
    assert sorted(os.listdir(osp.join(out, 'val'))) == sorted(f'{n}.png' for n in VAL_PHOTOS)
    for png in glob.glob(osp.join(out, '*', '*.png')):
        img = cv2.imread(png, cv2.IMREAD_UNCHANGED)
        assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] % 4 == 0 and img.shape[1] % 4 == 0
    os.remove(osp.join(out, 'val', 'chelsea.png'))  # an incomplete export is repaired
    assert export(out) is True and osp.isfile(osp.join(out, 'val', 'chelsea.png'))
