"""The authors' folder layouts load unchanged, through BasicSR's PairedImageDataset and ours.

* MambaCSR test sets: ``Testsets/<set>/HR/<stem>.png`` beside ``Testsets/<set>/LR_q10/<stem>.jpg``;
* DIV2K with ``filename_tmpl: '{}x4'``: ``HR/0801.png`` beside ``LR_q10/0801x4.jpg``;
* one GT LMDB read by an on-the-fly training set and a validation set in one process (and by
  forked DataLoader workers after the parent has opened it).
"""
import os
import os.path as osp

import cv2
import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before basicsr)
import basicsr.train as basicsr_train
from basicsr.data import build_dataloader
from basicsr.data.data_util import paired_paths_from_folder as basicsr_paired_paths_from_folder
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from helpers_images import photo_bgr
from mambacsr_arch.cli.runtime import patch_datasets
from mambacsr_arch.data.degradations import bicubic_downsample, mod_crop

pytestmark = pytest.mark.official

SCALE = 4


@pytest.fixture(scope='module', autouse=True)
def patched():
    patch_datasets()


def write_set(root, stems, photos, tmpl='{}', size=(46, 58)):
    """``root/HR/<stem>.png`` and ``root/LR_q10/<tmpl(stem)>.jpg`` (bicubic x1/4 then JPEG q10, as the authors)."""
    hr, lr = root / 'HR', root / 'LR_q10'
    hr.mkdir(parents=True)
    lr.mkdir()
    for stem, photo in zip(stems, photos):
        gt = photo_bgr(photo, size)
        cv2.imwrite(str(hr / f'{stem}.png'), gt)
        lq = bicubic_downsample(mod_crop(gt, SCALE), SCALE)
        cv2.imwrite(str(lr / f'{tmpl.format(stem)}.jpg'), lq, [cv2.IMWRITE_JPEG_QUALITY, 10])
    return str(hr), str(lr)


def paired_opt(kind, hr, lr, tmpl='{}', **kw):
    opt = dict(name='Set5', type=kind, phase='val', scale=SCALE, dataroot_gt=hr, dataroot_lq=lr,
               filename_tmpl=tmpl, io_backend={'type': 'disk'})
    opt.update(kw)
    return opt


def assert_sample_is_the_files(sample, gt_file, lq_file):
    gt = cv2.imread(gt_file)
    lq = cv2.imread(lq_file)
    h, w = lq.shape[:2]
    assert sample['lq_path'] == lq_file and sample['gt_path'] == gt_file
    want_lq = torch.from_numpy(lq[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.)
    want_gt = torch.from_numpy(gt[:h * SCALE, :w * SCALE, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.)
    assert torch.allclose(sample['lq'], want_lq) and torch.allclose(sample['gt'], want_gt)


@pytest.mark.parametrize('kind', ['PairedImageDataset', 'JPEGDegradedPairedDataset'])
def test_mambacsr_testset_png_hr_with_jpg_lr(tmp_path, kind):
    hr, lr = write_set(tmp_path / 'Set5', ['baby', 'bird', 'butterfly'], ['astronaut', 'coffee', 'chelsea'])
    with pytest.raises(AssertionError, match='not in lq_paths'):  # why the override exists
        basicsr_paired_paths_from_folder([lr, hr], ['lq', 'gt'], '{}')
    ds = basicsr_train.build_dataset(paired_opt(kind, hr, lr))  # patched: pairs, then start-up check
    assert len(ds) == 3
    for i, stem in enumerate(['baby', 'bird', 'butterfly']):
        assert_sample_is_the_files(ds[i], osp.join(hr, f'{stem}.png'), osp.join(lr, f'{stem}.jpg'))


@pytest.mark.parametrize('kind', ['PairedImageDataset', 'JPEGDegradedPairedDataset'])
def test_div2k_x4_template_png_hr_with_jpg_lr(tmp_path, kind):
    stems = ['0801', '0802']
    hr, lr = write_set(tmp_path / 'DIV2K', stems, ['rocket', 'camera'], tmpl='{}x4', size=(40, 52))
    ds = basicsr_train.build_dataset(paired_opt(kind, hr, lr, tmpl='{}x4'))
    assert [osp.basename(p['lq_path']) for p in ds.paths] == ['0801x4.jpg', '0802x4.jpg']
    assert_sample_is_the_files(ds[1], osp.join(hr, '0802.png'), osp.join(lr, '0802x4.jpg'))


@pytest.mark.parametrize('kind', ['PairedImageDataset', 'JPEGDegradedPairedDataset'])
def test_meta_info_file_with_png_names_finds_jpg_lr(tmp_path, kind):
    hr, lr = write_set(tmp_path / 'DIV2K', ['0801', '0802'], ['rocket', 'camera'], tmpl='{}x4')
    meta = tmp_path / 'meta_info.txt'
    meta.write_text('0802.png (46,58,3)\n0801.png (46,58,3)\n')
    ds = basicsr_train.build_dataset(paired_opt(kind, hr, lr, tmpl='{}x4', meta_info_file=str(meta)))
    assert [osp.basename(p['lq_path']) for p in ds.paths] == ['0802x4.jpg', '0801x4.jpg']  # file order kept
    assert_sample_is_the_files(ds[0], osp.join(hr, '0802.png'), osp.join(lr, '0802x4.jpg'))


def make_lmdb(folder, lmdb_path):
    names = sorted(os.listdir(folder))
    make_lmdb_from_imgs(folder, str(lmdb_path), names, [osp.splitext(n)[0] for n in names], map_size=1 << 24)
    return str(lmdb_path)


def test_basicsr_lmdb_branch_still_works_after_the_patch(tmp_path):
    hr, lr = write_set(tmp_path / 'Set5', ['a', 'b'], ['astronaut', 'coffee'])
    gt_db, lq_db = make_lmdb(hr, tmp_path / 'gt.lmdb'), make_lmdb(lr, tmp_path / 'lq.lmdb')
    opt = paired_opt('PairedImageDataset', gt_db, lq_db, io_backend={'type': 'lmdb'})
    ds = basicsr_train.build_dataset(opt)
    sample = ds[1]
    assert sample['gt_path'] == 'b' and tuple(sample['lq'].shape) == (3, 11, 14)
    assert torch.allclose(sample['gt'], basicsr_train.build_dataset(paired_opt('PairedImageDataset', hr, lr))[1]['gt'])


def test_one_gt_lmdb_shared_by_train_and_val_in_one_process(tmp_path):
    gt_dir = tmp_path / 'gt'
    gt_dir.mkdir()
    for photo in ('astronaut', 'chelsea', 'coffee', 'rocket'):
        cv2.imwrite(str(gt_dir / f'{photo}.png'), photo_bgr(photo, (40, 40)))
    db = make_lmdb(str(gt_dir), tmp_path / 'gt.lmdb')
    common = dict(type='JPEGDegradedPairedDataset', scale=SCALE, dataroot_gt=db, io_backend={'type': 'lmdb'},
                  jpeg_quality=10, num_worker_per_gpu=0, batch_size_per_gpu=2)
    train = basicsr_train.build_dataset(dict(common, name='train', phase='train', gt_size=16))
    val = basicsr_train.build_dataset(dict(common, name='val', phase='val'))
    assert train[0]['gt'].shape[1:] == (16, 16) and val[0]['gt'].shape[1:] == (40, 40)
    assert train[1]['gt'].shape[1:] == (16, 16) and val[3]['gt'].shape[1:] == (40, 40)  # both still open
    # BasicSR's own class over the same database, through FileClient's (patched) lmdb backend
    paired = basicsr_train.build_dataset(paired_opt('PairedImageDataset', db, db, io_backend={'type': 'lmdb'},
                                                    scale=1))
    assert torch.equal(paired[2]['gt'], val[2]['gt'])
    # forked workers after the parent opened it: each worker opens its own environment
    loader = build_dataloader(train, dict(common, phase='train', num_worker_per_gpu=2, use_shuffle=False),
                              num_gpu=0, dist=False, sampler=None, seed=0)
    batches = list(loader)
    assert sum(b['gt'].shape[0] for b in batches) == 4


def test_forked_child_reopens_instead_of_using_the_parents_environment(tmp_path):
    from mambacsr_arch.data import shared_lmdb

    gt_dir = tmp_path / 'gt'
    gt_dir.mkdir()
    cv2.imwrite(str(gt_dir / 'a.png'), photo_bgr('coffee', (8, 8)))
    db = make_lmdb(str(gt_dir), tmp_path / 'gt.lmdb')
    parent_env = shared_lmdb.open_shared_env(db)
    assert shared_lmdb.open_shared_env(db + '/') is parent_env  # one per database, whatever the spelling
    pid = os.fork()
    if pid == 0:  # child: exit code 0 only if it got its own, working environment
        try:
            env = shared_lmdb.open_shared_env(db)
            ok = env is not parent_env and shared_lmdb.SharedLmdbBackend(db).get('a', 'default') is not None
            os._exit(0 if ok else 1)
        except BaseException:  # noqa: BLE001 - any failure is the child's exit code
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0
    with parent_env.begin() as txn:  # the child's close left the parent's copy alone
        assert txn.get(b'a') is not None
