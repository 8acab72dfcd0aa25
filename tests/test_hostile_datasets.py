"""Hostile dataset folders: every problem is one error naming the file, raised before training starts.

Stray files, ambiguous stems, symbolic-link loops, unusable template, val images too small for the
scale or LQ of the wrong size -- through BasicSR's PairedImageDataset (after our patch), our
JPEGDegradedPairedDataset and the real ``basicsr train`` pipeline.
"""
import logging
import os
import re
import sys

import cv2
import pytest
import yaml

import mambacsr_arch  # noqa: F401  (shims before basicsr)
import basicsr.train as basicsr_train
from helpers_images import make_image_folder, photo_bgr
from mambacsr_arch.cli.runtime import patch_datasets
from mambacsr_arch.data.checks import DatasetCheckError, check_dataset, image_size
from mambacsr_arch.data.image_io import ImageFolderError
from mambacsr_arch.data.pairing import PairingError

pytestmark = pytest.mark.hostile

KINDS = ['PairedImageDataset', 'JPEGDegradedPairedDataset']


@pytest.fixture(scope='module', autouse=True)
def patched():
    patch_datasets()


def pair_folders(root, names=('astronaut', 'chelsea'), gt_size=(32, 40), lq_ext='.jpg'):
    gt, lq = root / 'gt', root / 'lq'
    make_image_folder(gt, names, gt_size)
    make_image_folder(lq, names, (gt_size[0] // 4, gt_size[1] // 4), ext=lq_ext)
    return gt, lq


def build(kind, gt, lq=None, phase='val', **kw):
    opt = dict(name='hostile', type=kind, phase=phase, scale=4, dataroot_gt=str(gt), io_backend={'type': 'disk'})
    if lq is not None:
        opt.update(dataroot_lq=str(lq), filename_tmpl='{}')
    elif kind == 'JPEGDegradedPairedDataset':
        opt.update(jpeg_quality=10)
    opt.update(kw)
    return basicsr_train.build_dataset(opt)


@pytest.mark.parametrize('kind', KINDS)
def test_stray_non_image_is_skipped_with_a_warning_naming_it(tmp_path, kind, caplog):
    gt, lq = pair_folders(tmp_path)
    (lq / 'notes.txt').write_text('how I made these')
    with caplog.at_level(logging.WARNING, logger='basicsr'):
        ds = build(kind, gt, lq)
    assert len(ds) == 2 and 'notes.txt' in caplog.text and str(lq) in caplog.text


@pytest.mark.parametrize('kind', KINDS)
def test_stray_unpaired_image_is_named(tmp_path, kind):
    gt, lq = pair_folders(tmp_path)
    cv2.imwrite(str(lq / 'zz_extra.png'), photo_bgr('coffee', (8, 10)))
    with pytest.raises(ValueError, match=r"match no GT image.*'zz_extra\.png'"):
        build(kind, gt, lq)


def test_missing_lq_names_the_gt_and_a_non_image_namesake(tmp_path):
    gt, lq = pair_folders(tmp_path)
    os.remove(lq / 'chelsea.jpg')
    (lq / 'chelsea.gif').write_bytes(b'GIF89a')
    with pytest.raises(PairingError, match=r"no LQ image.*'chelsea\.png \(found 'chelsea\.gif', not an image"):
        build('PairedImageDataset', gt, lq)


@pytest.mark.parametrize('kind', KINDS)
def test_ambiguous_stem_names_both_files(tmp_path, kind):
    gt, lq = pair_folders(tmp_path)
    cv2.imwrite(str(lq / 'astronaut.png'), photo_bgr('astronaut', (8, 10)))
    with pytest.raises(ValueError, match=r"dataroot_lq '.*lq': more than one image with the same stem: "
                                         r"'astronaut\.jpg' and 'astronaut\.png'"):
        build(kind, gt, lq)


def test_unusable_filename_tmpl_names_the_option(tmp_path):
    gt, lq = pair_folders(tmp_path)
    with pytest.raises(PairingError, match=r"filename_tmpl 'x4' has no '\{\}'"):
        build('PairedImageDataset', gt, lq, filename_tmpl='x4')
    with pytest.raises(PairingError, match=r"filename_tmpl '\{0\}\{1\}' is not a template"):
        build('PairedImageDataset', gt, lq, filename_tmpl='{0}{1}')


@pytest.mark.parametrize('kind', KINDS)
def test_symlink_loop_in_gt_folder_is_named(tmp_path, kind):
    gt, lq = pair_folders(tmp_path)
    os.symlink('loop.png', gt / 'loop.png')  # loop.png -> itself
    os.symlink(str(gt), gt / 'again')  # a folder link back to its parent: not entered, not an error
    with pytest.raises(ImageFolderError, match=r"loop\.png' is a symbolic-link loop"):
        build(kind, gt, lq)
    if kind == 'JPEGDegradedPairedDataset':  # on-the-fly listing goes through the same walker
        with pytest.raises(ImageFolderError, match=r"loop\.png' is a symbolic-link loop"):
            build(kind, gt)


@pytest.mark.parametrize('kind', KINDS)
def test_lq_of_the_wrong_size_is_refused_when_built(tmp_path, kind):
    gt, lq = pair_folders(tmp_path, gt_size=(34, 41))  # LQ 8x10 = (34 // 4)x(41 // 4): fine
    assert len(build(kind, gt, lq)) == 2
    cv2.imwrite(str(lq / 'chelsea.jpg'), photo_bgr('chelsea', (9, 10)))
    with pytest.raises(DatasetCheckError, match=r"val dataset 'hostile'.*gt/chelsea\.png' with LQ "
                                                r"'.*lq/chelsea\.jpg': GT is 34x41 and LQ is 9x10, "
                                                r"but at scale 4 the LQ of this GT is 8x10"):
        build(kind, gt, lq)
    # train: not checked
    assert len(build(kind, gt, lq, phase='train', gt_size=16, use_hflip=False, use_rot=False)) == 2


def test_gt_smaller_than_scale_refused_and_exif_rotation_respected(tmp_path):
    gt = tmp_path / 'gt'
    make_image_folder(gt, ['astronaut'], (3, 2))
    with pytest.raises(DatasetCheckError, match=r"astronaut\.png': GT is 3x2, smaller than scale 4"):
        build('JPEGDegradedPairedDataset', gt)
    # a JPEG whose EXIF says "rotate 90": OpenCV (hence the datasets) decodes it rotated, and so does the check
    from PIL import Image

    rotated = tmp_path / 'rotated.jpg'
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo_bgr('coffee', (8, 20))).save(rotated, exif=exif.tobytes())
    assert image_size(str(rotated)) == cv2.imread(str(rotated)).shape[:2] == (20, 8)


def test_check_skips_datasets_it_cannot_size():
    class Unpaired:
        paths = ['a.png']

    assert check_dataset(Unpaired(), {'scale': 4, 'phase': 'val'}) == 0


def test_train_stops_on_a_3x2_val_image_before_the_first_iteration(tmp_path, monkeypatch, capsys):
    from mambacsr_arch.cli import train as train_cli

    train_gt, val_gt = tmp_path / 'train_gt', tmp_path / 'val_gt'
    make_image_folder(train_gt, ['astronaut', 'chelsea'], (32, 32))
    make_image_folder(val_gt, ['coffee'], (32, 32))
    make_image_folder(val_gt, ['rocket'], (3, 2))
    data = dict(type='JPEGDegradedPairedDataset', jpeg_quality=10)
    opt = {
        'name': 'hostile_val', 'model_type': 'MambaCSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 1,
        'datasets': {
            'train': dict(data, name='train', dataroot_gt=str(train_gt), gt_size=16, use_shuffle=True,
                          num_worker_per_gpu=0, batch_size_per_gpu=1),
            'val': dict(data, name='tiny_val', dataroot_gt=str(val_gt)),
        },
        'network_g': dict(type='MambaCSR', upscale=4, embed_dim=24, depths=[1], depths2=[1], d_state=4,
                          scan_size=4, img_size=16),
        'path': {'experiments_root': str(tmp_path / 'exp')},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 2, 'warmup_iter': -1,
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5},
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'val': {'val_freq': 1, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 1, 'use_tb_logger': False},
    }
    opt_file = tmp_path / 'train.yml'
    opt_file.write_text(yaml.safe_dump(opt))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))  # the CLI rewrites sys.argv for BasicSR's parser
    built = []
    monkeypatch.setattr(basicsr_train, 'build_dataset', spy(basicsr_train.build_dataset, built))
    monkeypatch.setattr(basicsr_train, 'build_model', spy(basicsr_train.build_model, built))
    assert train_cli.main(['-opt', str(opt_file)]) == 2  # one line on stderr, no traceback
    err = capsys.readouterr().err
    assert re.search(r"basicsr train: error: val dataset 'tiny_val'.*rocket\.png': GT is 3x2, smaller than scale 4",
                     err), err
    # the training set was built, then the check stopped the run: no model, no iteration, no checkpoint, and the
    # experiment folder this failed start made (logs only) is gone again
    assert built == ['train', 'tiny_val'] and not (tmp_path / 'exp').exists()
    assert f"removed '{tmp_path / 'exp'}', made by this failed start" in err


def spy(function, calls):
    def wrapped(opt):
        calls.append(opt.get('name', 'model') if 'type' in opt else 'model')
        return function(opt)

    return wrapped


def test_lmdb_val_sizes_come_from_meta_info_and_name_the_key(tmp_path):
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    gt = tmp_path / 'gt'
    make_image_folder(gt, ['astronaut'], (16, 16))
    make_image_folder(gt, ['coffee'], (2, 9))
    db = str(tmp_path / 'gt.lmdb')
    make_lmdb_from_imgs(str(gt), db, ['astronaut.png', 'coffee.png'], ['astronaut', 'coffee'], map_size=1 << 24)
    with pytest.raises(DatasetCheckError, match=r"'coffee': GT is 2x9, smaller than scale 4"):
        build('JPEGDegradedPairedDataset', db, io_backend={'type': 'lmdb'})
