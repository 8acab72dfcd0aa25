"""JPEGDegradedPairedDataset: exact degradation, quality specs, crops, backends, bad inputs, workers."""
import os
import os.path as osp
import random

import cv2
import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from basicsr.data import build_dataset
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from helpers_images import make_image_folder, photo_bgr
from mambacsr_arch.data.degradations import degrade_csr
from mambacsr_arch.data.image_io import ImageReadError
from mambacsr_arch.data.jpeg_degraded_dataset import JPEGDegradedPairedDataset, parse_quality_spec
from test_degradations import independent_csr

NAMES = ['astronaut', 'chelsea', 'coffee']


def make_opt(root, phase='val', **kw):
    opt = dict(name='csr', type='JPEGDegradedPairedDataset', phase=phase, scale=4, dataroot_gt=str(root),
               io_backend={'type': 'disk'}, jpeg_quality=[10, 30])
    if phase == 'train':
        opt.update(gt_size=32, use_hflip=True, use_rot=True)
    opt.update(kw)
    return opt


def to_u8(t):
    """(3, H, W) RGB float tensor in [0, 1] -> uint8 BGR (H, W, 3), exact for k/255 values."""
    return np.round(t.numpy().transpose(1, 2, 0)[:, :, ::-1] * 255).astype(np.uint8)


@pytest.fixture(scope='module')
def gt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('gt')
    make_image_folder(root, names=NAMES, size=(70, 90))  # 70 is not a multiple of 4: mod-crop matters
    return root


def make_lmdb(folder, lmdb_path):
    names = sorted(n for n in os.listdir(folder) if n.endswith('.png'))
    make_lmdb_from_imgs(str(folder), str(lmdb_path), names, [osp.splitext(n)[0] for n in names])
    return str(lmdb_path)


def test_registered_and_built_by_basicsr(gt_dir):
    ds = build_dataset(make_opt(gt_dir))
    assert isinstance(ds, JPEGDegradedPairedDataset) and len(ds) == 3


@pytest.mark.parametrize('method', ['matlab_bicubic', 'cv2_bicubic'])
def test_validation_lq_is_the_independent_pipeline_bit_for_bit(gt_dir, method):
    ds = JPEGDegradedPairedDataset(make_opt(gt_dir, jpeg_quality=[10, 30], downsample=method))
    for index, name in enumerate(NAMES):
        sample = ds[index]
        gt_src = cv2.imread(str(gt_dir / f'{name}.png'))
        quality = [10, 30][index % 2]
        assert sample['jpeg_quality'] == quality and sample['gt_path'].endswith(f'{name}.png')
        expected_lq = independent_csr(gt_src, 4, quality, method)
        expected_lq_t = torch.from_numpy(expected_lq[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.)
        assert sample['lq'].dtype == torch.float32 and sample['lq'].shape == (3, 17, 22)
        assert torch.equal(sample['lq'], expected_lq_t)
        np.testing.assert_array_equal(to_u8(sample['gt']), gt_src[:68, :88])


def test_validation_is_deterministic_and_qualities_cycle(gt_dir):
    opt = make_opt(gt_dir, jpeg_quality_range=[20, 21], jpeg_quality=None)
    a, b = JPEGDegradedPairedDataset(opt), JPEGDegradedPairedDataset(dict(opt))
    assert [a[i]['jpeg_quality'] for i in range(3)] == [20, 21, 20]
    for _ in range(2):  # another "epoch"
        for i in range(3):
            assert torch.equal(a[i]['lq'], b[i]['lq'])


def test_quality_spec_rules():
    assert parse_quality_spec({'jpeg_quality': 10}) == (10,)
    assert parse_quality_spec({'jpeg_quality': [10, 40]}) == (10, 40)  # a list is always choices
    assert parse_quality_spec({'jpeg_quality_range': [10, 13]}) == (10, 11, 12, 13)
    bad = [{}, {'jpeg_quality': 10, 'jpeg_quality_range': [1, 2]}, {'jpeg_quality': 0},
           {'jpeg_quality': []}, {'jpeg_quality_range': [40, 10]}, {'jpeg_quality_range': [10, 20, 30]},
           {'jpeg_quality_range': 10}, {'jpeg_quality': [10, 'high']}]
    for opt in bad:
        with pytest.raises(ValueError, match='jpeg_quality'):
            parse_quality_spec(opt)


@pytest.mark.parametrize('spec,allowed', [({'jpeg_quality': [10, 40]}, {10, 40}),
                                          ({'jpeg_quality_range': [10, 12]}, {10, 11, 12}),
                                          ({'jpeg_quality': 25}, {25})])
def test_training_quality_drawn_from_spec(gt_dir, spec, allowed):
    opt = make_opt(gt_dir, phase='train', **{'jpeg_quality': None, **spec})
    ds = JPEGDegradedPairedDataset(opt)
    random.seed(0)
    seen = {ds[i % 3]['jpeg_quality'] for i in range(40)}
    assert seen == allowed


def test_training_crop_is_aligned_and_lq_is_the_degraded_gt_patch(gt_dir):
    ds = JPEGDegradedPairedDataset(make_opt(gt_dir, phase='train', use_hflip=False, use_rot=False))
    src = cv2.imread(str(gt_dir / 'astronaut.png'))
    random.seed(3)
    positions = set()
    for _ in range(6):
        sample = ds[0]
        gt, lq = to_u8(sample['gt']), to_u8(sample['lq'])
        assert gt.shape == (32, 32, 3) and lq.shape == (8, 8, 3)
        np.testing.assert_array_equal(lq, degrade_csr(gt, 4, sample['jpeg_quality']))
        # the GT patch is a block of the source at a position on the scale grid
        hits = [(t, left) for t in range(0, 68 - 32 + 1, 4) for left in range(0, 88 - 32 + 1, 4)
                if np.array_equal(src[t:t + 32, left:left + 32], gt)]
        assert len(hits) == 1
        positions.add(hits[0])
    assert len(positions) > 1  # crops are random


def test_training_with_augmentation_keeps_the_pairing(gt_dir):
    ds = JPEGDegradedPairedDataset(make_opt(gt_dir, phase='train'))
    random.seed(1)
    for i in range(6):
        sample = ds[i % 3]
        np.testing.assert_array_equal(to_u8(sample['lq']), degrade_csr(to_u8(sample['gt']), 4, sample['jpeg_quality']))
    random.seed(7)
    first = [ds[i]['lq'] for i in range(3)]
    random.seed(7)
    assert all(torch.equal(a, ds[i]['lq']) for i, a in enumerate(first))


@pytest.mark.parametrize('phase', ['val', 'train'])
def test_lmdb_and_disk_give_identical_samples(gt_dir, tmp_path, phase):
    lmdb_path = make_lmdb(gt_dir, tmp_path / 'gt.lmdb')
    disk = JPEGDegradedPairedDataset(make_opt(gt_dir, phase=phase))
    lmdb = JPEGDegradedPairedDataset(make_opt(lmdb_path, phase=phase, io_backend={'type': 'lmdb'}))
    assert len(disk) == len(lmdb) == 3
    for i in range(3):
        random.seed(i)
        a = disk[i]
        random.seed(i)
        b = lmdb[i]
        assert b['gt_path'] == NAMES[i] and a['jpeg_quality'] == b['jpeg_quality']
        assert torch.equal(a['lq'], b['lq']) and torch.equal(a['gt'], b['gt'])


def test_pre_generated_pairs_mode_matches_on_the_fly(gt_dir, tmp_path):
    lq_dir = tmp_path / 'lq'
    lq_dir.mkdir()
    for name in NAMES:
        gt = cv2.imread(str(gt_dir / f'{name}.png'))
        cv2.imwrite(str(lq_dir / f'{name}x4.png'), degrade_csr(gt[:68, :88], 4, 30))
    fly = JPEGDegradedPairedDataset(make_opt(gt_dir, jpeg_quality=30))
    paired = JPEGDegradedPairedDataset(make_opt(gt_dir, jpeg_quality=None, dataroot_lq=str(lq_dir),
                                                filename_tmpl='{}x4'))
    for i in range(3):
        a, b = fly[i], paired[i]
        assert 'jpeg_quality' not in b and b['lq_path'].endswith(f'{NAMES[i]}x4.png')
        assert torch.equal(a['lq'], b['lq']) and torch.equal(a['gt'], b['gt'])
    with pytest.raises(ValueError, match='jpeg_quality has no effect'):
        JPEGDegradedPairedDataset(make_opt(gt_dir, dataroot_lq=str(lq_dir), filename_tmpl='{}x4'))


def test_meta_info_file_selects_and_orders_images(gt_dir, tmp_path):
    meta = tmp_path / 'meta_info.txt'
    meta.write_text('coffee.png (70,90,3) 1\nastronaut.png (70,90,3) 1\n')
    ds = JPEGDegradedPairedDataset(make_opt(gt_dir, meta_info_file=str(meta), jpeg_quality=[10, 30]))
    assert [osp.basename(p['gt_path']) for p in ds.paths] == ['coffee.png', 'astronaut.png']
    assert [ds[i]['jpeg_quality'] for i in range(2)] == [10, 30]
    with pytest.raises(FileNotFoundError, match='meta_info_file'):
        JPEGDegradedPairedDataset(make_opt(gt_dir, meta_info_file=str(tmp_path / 'none.txt')))


def test_color_y_and_normalisation(gt_dir):
    y = JPEGDegradedPairedDataset(make_opt(gt_dir, color='y'))[0]
    assert y['lq'].shape == (1, 17, 22) and y['gt'].shape == (1, 68, 88)
    random.seed(0)
    y_train = JPEGDegradedPairedDataset(make_opt(gt_dir, phase='train', color='y'))[0]
    assert y_train['lq'].shape == (1, 8, 8) and y_train['gt'].shape == (1, 32, 32)
    plain = JPEGDegradedPairedDataset(make_opt(gt_dir))[0]
    norm = JPEGDegradedPairedDataset(make_opt(gt_dir, mean=[0.5] * 3, std=[0.5] * 3))[0]
    assert torch.allclose(norm['lq'], plain['lq'] * 2 - 1)


def test_dataloader_two_workers_match_zero_workers(gt_dir):
    ds = JPEGDegradedPairedDataset(make_opt(gt_dir, jpeg_quality_range=[10, 12], jpeg_quality=None))
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers)
        batches.append(list(loader))
    for a, b in zip(*batches):
        assert torch.equal(a['lq'], b['lq']) and torch.equal(a['gt'], b['gt'])
        assert a['jpeg_quality'].tolist() == b['jpeg_quality'].tolist()


# ------------------------------------------------------------------------------------------ bad input
def test_corrupt_file_names_the_file(tmp_path):
    make_image_folder(tmp_path, names=['astronaut'], size=(32, 32))
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    ds = JPEGDegradedPairedDataset(make_opt(tmp_path))
    assert ds[0]['gt'].shape == (3, 32, 32)
    with pytest.raises(ImageReadError, match='broken.png'):
        ds[1]


def test_missing_lmdb_key_names_the_key(gt_dir, tmp_path):
    lmdb_path = make_lmdb(gt_dir, tmp_path / 'gt.lmdb')
    with open(osp.join(lmdb_path, 'meta_info.txt'), 'a') as f:
        f.write('ghost.png (70,90,3) 1\n')
    ds = JPEGDegradedPairedDataset(make_opt(lmdb_path, io_backend={'type': 'lmdb'}))
    index = [p['gt_path'] for p in ds.paths].index('ghost')
    with pytest.raises(ImageReadError, match="gt.lmdb.*no key 'ghost'"):
        ds[index]


def test_too_small_image_for_training_patch(tmp_path):
    make_image_folder(tmp_path, names=['chelsea'], size=(30, 60))
    ds = JPEGDegradedPairedDataset(make_opt(tmp_path, phase='train', gt_size=32))
    with pytest.raises(ValueError, match='chelsea.png.*smaller than gt_size 32'):
        ds[0]


@pytest.mark.parametrize('kind', ['gray', 'deep16', 'rgba'])
def test_unusual_images_become_3_channel_8_bit(tmp_path, kind):
    bgr = photo_bgr('coffee', (32, 40))
    if kind == 'gray':
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        img, expected = gray, np.repeat(gray[:, :, None], 3, axis=2)
    elif kind == 'deep16':
        img, expected = bgr.astype(np.uint16) * 257, bgr  # exact 8 -> 16 bit expansion, must scale back
    else:
        img, expected = np.concatenate([bgr, np.full((32, 40, 1), 7, np.uint8)], axis=2), bgr
    cv2.imwrite(str(tmp_path / f'{kind}.png'), img)
    sample = JPEGDegradedPairedDataset(make_opt(tmp_path, jpeg_quality=20))[0]
    np.testing.assert_array_equal(to_u8(sample['gt']), expected)
    np.testing.assert_array_equal(to_u8(sample['lq']), degrade_csr(expected, 4, 20))


def test_option_errors_name_the_key(gt_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataroot_gt: '{tmp_path}/nope' does not exist"):
        JPEGDegradedPairedDataset(make_opt(tmp_path / 'nope'))
    with pytest.raises(FileNotFoundError, match='dataroot_lq'):
        JPEGDegradedPairedDataset(make_opt(gt_dir, jpeg_quality=None, dataroot_lq=str(tmp_path / 'nolq')))
    with pytest.raises(ValueError, match="'use_hflp' \\(did you mean 'use_hflip'\\?\\)"):
        JPEGDegradedPairedDataset(make_opt(gt_dir, use_hflp=True))
    with pytest.warns(UserWarning, match='use_hflp'):
        JPEGDegradedPairedDataset(make_opt(gt_dir, use_hflp=True, strict_options=False))
    with pytest.raises(ValueError, match='gt_size'):
        JPEGDegradedPairedDataset(make_opt(gt_dir, phase='train', gt_size=30))
    with pytest.raises(ValueError, match='downsample'):
        JPEGDegradedPairedDataset(make_opt(gt_dir, downsample='bilinear'))
    with pytest.raises(ValueError, match='not a BasicSR LMDB'):
        JPEGDegradedPairedDataset(make_opt(gt_dir, io_backend={'type': 'lmdb'}))
    # BasicSR's standard dataset keys are accepted
    JPEGDegradedPairedDataset(make_opt(gt_dir, batch_size_per_gpu=2, num_worker_per_gpu=1, dataset_enlarge_ratio=1,
                                       prefetch_mode=None, pin_memory=True, persistent_workers=False,
                                       use_shuffle=True, filename_tmpl='{}'))
