"""Validation visuals (val.save_comparisons, val.plot_metrics): the PNGs exist, are readable and say the truth."""
from __future__ import annotations

import json
import os
import os.path as osp
import re

import cv2
import numpy as np
import pytest
import torch
import yaml

import mambacsr_arch  # noqa: F401  (shims and registration before basicsr)
from basicsr.metrics import calculate_psnr
from basicsr.models import build_model
from basicsr.utils import tensor2img
from mambacsr_arch.data.jpeg_degraded_dataset import JPEGDegradedPairedDataset
from mambacsr_arch.models import visuals

from helpers_images import make_image_folder

pytestmark = pytest.mark.hostile

TINY_MAMBACSR = dict(type='MambaCSR', upscale=4, in_chans=3, img_size=8, embed_dim=24, d_state=4, scan_size=8,
                     depths=[1], depths2=[1], mlp_ratio=2, img_range=1., upsampler='pixelshuffle',
                     resi_connection='1conv', dual_interleaved_scan=True, cross_scale_scan=True)
GT_SIZE = (32, 48)
PSNR_Y = {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}
NAME_RE = re.compile(r'^(?P<img>\w+?)_(?P<iter>\d{6})_bicubic(?P<up>\d+\.\d\d)dB_MambaCSR(?P<net>\d+\.\d\d)dB\.png$')


def make_model(tmp_path, **val_extra):
    root = str(tmp_path / 'exp')
    opt = {
        'name': 'visuals', 'model_type': 'MambaCSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 1, 'dist': False,
        'rank': 0, 'world_size': 1, 'is_train': True, 'network_g': dict(TINY_MAMBACSR),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'models': osp.join(root, 'models'),
                 'training_states': osp.join(root, 'training_states'),
                 'visualization': osp.join(root, 'visualization')},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 20,
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
        'val': dict({'metrics': {'psnr': dict(PSNR_Y)}}, **val_extra),
    }
    return build_model(opt)


def make_loader(tmp_path, names=('chelsea', 'coffee')):
    folder = tmp_path / 'val_gt'
    make_image_folder(folder, names=names, size=GT_SIZE)
    dataset = JPEGDegradedPairedDataset(dict(name='tiny_val', type='JPEGDegradedPairedDataset', phase='val', scale=4,
                                             dataroot_gt=str(folder), io_backend={'type': 'disk'}, jpeg_quality=10))
    return torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False)


def read_png(path):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert img is not None, f'{path} is not a readable image'
    return img


def test_comparisons_and_curves_are_written_with_true_psnr(tmp_path):
    model = make_model(tmp_path, save_comparisons=True, plot_metrics=True)
    loader = make_loader(tmp_path)
    vis = model.opt['path']['visualization']
    model.validation(loader, 10, None)
    first_psnr = model.metric_results['psnr']
    model.validation(loader, 20, None)
    model.validation(loader, 21, None)  # BasicSR's extra validation after the last iteration -> filed as 20

    comparisons = sorted(os.listdir(osp.join(vis, 'comparisons', 'tiny_val')))
    assert len(comparisons) == 4, comparisons  # 2 photos x iterations 10 and 20 (21 is the same as 20)
    parsed = [NAME_RE.match(name) for name in comparisons]
    assert all(parsed), comparisons
    assert {(m['img'], m['iter']) for m in parsed} == {(img, it) for img in ('chelsea', 'coffee')
                                                       for it in ('000010', '000020')}

    # the PSNRs in the names are the photos' own: mean of the network's = the logged metric, bicubic's = baseline
    at_10 = [m for m in parsed if m['iter'] == '000010']
    assert np.mean([float(m['net']) for m in at_10]) == pytest.approx(first_psnr, abs=0.01)
    bicubic = []
    for data in loader:
        up = tensor2img([visuals.bicubic_upsample(data['lq'], 4, data['gt'])])
        bicubic.append(calculate_psnr(up, tensor2img([data['gt']]), crop_border=4, test_y_channel=True))
    assert sorted(float(m['up']) for m in at_10) == pytest.approx(sorted(bicubic), abs=0.006)

    for name in comparisons:
        img = read_png(osp.join(vis, 'comparisons', 'tiny_val', name))
        zoom = 5  # 48 px wide panels are enlarged (pixel replication) to >= 200 px so the captions fit
        h, w = GT_SIZE[0] * zoom, GT_SIZE[1] * zoom
        assert img.shape[1] == 3 * w + 2 * 4 and img.shape[0] > h and img.shape[2] == 3, img.shape
        band = img.shape[0] - h
        assert (img[:band] < 128).any(), 'caption band has no text'
        # right panel is the GT photo, unchanged apart from the zoom
        gt = cv2.imread(str(tmp_path / 'val_gt' / (name.split('_')[0] + '.png')))
        np.testing.assert_array_equal(img[band::zoom, 2 * (w + 4)::zoom], gt)
        np.testing.assert_array_equal(img[band + zoom - 1::zoom, 2 * (w + 4) + zoom - 1::zoom], gt)

    plot = read_png(osp.join(vis, 'curves', 'tiny_val_psnr.png'))
    assert plot.ndim == 3 and plot.shape[:2] == (420, 680)
    assert len(np.unique(plot.reshape(-1, 3), axis=0)) > 10, 'plot is blank'
    with open(osp.join(vis, 'curves', 'history.json'), encoding='utf-8') as f:
        history = json.load(f)
    record = history['tiny_val']['psnr']
    assert [p[0] for p in record['network']] == [10, 20]
    assert record['baseline'] == pytest.approx(float(np.mean(bicubic)), abs=1e-6)


def test_resumed_run_drops_future_points_and_keeps_baseline(tmp_path):
    folder = str(tmp_path / 'curves')
    visuals.record_metrics(folder, 'set', 100, {'psnr': 25.0}, {'psnr': 24.0})
    visuals.record_metrics(folder, 'set', 200, {'psnr': 25.5}, {})
    entry = visuals.record_metrics(folder, 'set', 150, {'psnr': 25.2}, {})  # resumed from iteration 100
    assert entry['psnr'] == {'network': [[100, 25.0], [150, 25.2]], 'baseline': 24.0}
    with open(osp.join(folder, visuals.HISTORY_FILE), 'w', encoding='utf-8') as f:
        f.write('{not json')
    with pytest.raises(ValueError, match='history.json is not readable JSON.*delete it'):
        visuals.record_metrics(folder, 'set', 300, {'psnr': 25.0}, {})


def test_plot_metrics_option_errors_name_the_key(tmp_path):
    loader = make_loader(tmp_path, names=('chelsea',))
    model = make_model(tmp_path, plot_metrics=['psnr', 'lpips'])
    with pytest.raises(ValueError, match=r'val\.plot_metrics: lpips not in val\.metrics \(psnr\)'):
        model.validation(loader, 10, None)
    assert visuals.plot_metric_names({'plot_metrics': 'psnr', 'metrics': {'psnr': PSNR_Y}}) == ['psnr']
    with pytest.raises(ValueError, match='val.plot_metrics needs val.metrics'):
        visuals.plot_metric_names({'plot_metrics': True})
    with pytest.raises(ValueError, match='true or a list'):
        visuals.plot_metric_names({'plot_metrics': 3, 'metrics': {'psnr': PSNR_Y}})


def test_off_by_default_and_unwritable_folder_is_named(tmp_path):
    loader = make_loader(tmp_path, names=('chelsea',))
    model = make_model(tmp_path)
    model.validation(loader, 10, None)
    assert not osp.exists(model.opt['path']['visualization'])

    blocker = tmp_path / 'blocker'
    blocker.write_text('a file where the folder should be')
    with pytest.raises(OSError):
        visuals.write_png(str(blocker / 'x.png'), np.zeros((4, 4, 3), np.uint8))
    assert blocker.read_text() == 'a file where the folder should be'


def test_metric_plot_handles_single_points_and_flat_series():
    img = visuals.metric_plot({'net': [(5, 30.0)], 'base': [(5, 30.0)]}, 'one point', 'PSNR(Y) (dB)')
    assert img.shape == (420, 680, 3) and (img < 128).any()
    img = visuals.metric_plot({'net': [(1, 0.5), (2, 0.5)]}, 'flat', 'SSIM(Y)')
    assert (img < 128).any()
    with pytest.raises(ValueError, match='no points'):
        visuals.metric_plot({'net': []}, 'empty', 'x')


def test_demo_option_file_turns_visuals_on():
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    with open(osp.join(root, 'options', 'demo_mambacsr_x4.yml'), encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    assert opt['val']['save_comparisons'] is True and opt['val']['plot_metrics'] is True
    assert 'psnr' in opt['val']['metrics'] and opt['val']['metrics']['psnr']['test_y_channel'] is True


def test_demo_export_removes_only_its_own_stale_photos(tmp_path):
    from mambacsr_arch.data.demo_photos import TRAIN_PHOTOS, export

    out = str(tmp_path / 'demo')
    assert export(out) is True
    os.makedirs(osp.join(out, 'train'), exist_ok=True)
    cv2.imwrite(osp.join(out, 'train', 'moon.png'), np.zeros((8, 8, 3), np.uint8))  # exported by an older version
    cv2.imwrite(osp.join(out, 'train', 'mine.png'), np.zeros((8, 8, 3), np.uint8))  # the user's own file
    with open(osp.join(out, 'manifest.txt'), 'a', encoding='utf-8') as f:
        f.write('train moon 8 8\n')
    assert export(out) is True
    left = sorted(os.listdir(osp.join(out, 'train')))
    assert left == sorted([f'{n}.png' for n in TRAIN_PHOTOS] + ['mine.png'])
    assert export(out) is False
