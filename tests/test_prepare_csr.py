"""`basicsr prepare-csr` (mambacsr_arch.data.prepare): identity with the dataset, sub-images, resume, failures, LMDB."""
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from basicsr.data.paired_image_dataset import PairedImageDataset
from helpers_images import make_image_folder
from mambacsr_arch.cli.main import main as cli_main
from mambacsr_arch.data import prepare as prepare_module
from mambacsr_arch.data.jpeg_degraded_dataset import JPEGDegradedPairedDataset
from mambacsr_arch.data.prepare import PrepareConfig, PrepareError, prepare_csr, subimage_grid
from test_degradations import independent_csr

NAMES = ['astronaut', 'chelsea', 'coffee']


@pytest.fixture()
def gt_dir(tmp_path):
    make_image_folder(tmp_path / 'gt', names=NAMES, size=(90, 118))  # not multiples of 4
    return tmp_path / 'gt'


def config(gt_dir, out, **kw):
    opt = dict(gt_dir=str(gt_dir), out_dir=str(out), qualities=[10, 30], scale=4, progress=False)
    opt.update(kw)
    return PrepareConfig(**opt)


def read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def snapshot(out):
    """{relative path: bytes} of every file in the output folders (manifest excluded)."""
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            if name != 'manifest.json' and '.lmdb' not in root:
                with open(osp.join(root, name), 'rb') as f:
                    files[osp.relpath(osp.join(root, name), out)] = f.read()
    return files


def test_outputs_bit_identical_to_dataset_and_independent_pipeline(gt_dir, tmp_path):
    out = tmp_path / 'out'
    result = prepare_csr(config(gt_dir, out))
    assert result.ok and result.written == 3 and result.folders == {'GT': 3, 'LQ_q10': 3, 'LQ_q30': 3}
    for quality in (10, 30):
        ds = JPEGDegradedPairedDataset(dict(name='v', phase='val', scale=4, dataroot_gt=str(gt_dir),
                                            jpeg_quality=quality))
        for index, name in enumerate(NAMES):
            lq = read(out / f'LQ_q{quality}' / f'{name}.png')
            np.testing.assert_array_equal(lq, independent_csr(read(gt_dir / f'{name}.png'), 4, quality))
            fly = ds[index]
            as_tensor = torch.from_numpy(lq[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.)
            assert torch.equal(fly['lq'], as_tensor)
        # the written pair, read back by the dataset in pre-generated mode, is the on-the-fly pair
        paired = JPEGDegradedPairedDataset(dict(name='p', phase='val', scale=4, dataroot_gt=str(out / 'GT'),
                                                dataroot_lq=str(out / f'LQ_q{quality}')))
        for index in range(3):
            assert torch.equal(paired[index]['lq'], ds[index]['lq'])
            assert torch.equal(paired[index]['gt'], ds[index]['gt'])
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['scale'] == 4 and manifest['qualities'] == [10, 30]
    assert manifest['downsample'] == 'matlab_bicubic' and manifest['versions']['opencv'] == cv2.__version__
    assert 'jpeg' in manifest['versions']['libjpeg'].lower()
    assert manifest['counts']['inputs'] == 3 and manifest['counts']['files']['LQ_q30'] == 3
    assert manifest['failed'] == [] and manifest['complete'] is True


def test_subimage_grid_follows_the_extract_subimages_recipe():
    def recipe(h, w, crop, step, thresh):  # BasicSR's extract_subimages loop, written out
        hs = np.arange(0, h - crop + 1, step)
        if h - (hs[-1] + crop) > thresh:
            hs = np.append(hs, h - crop)
        ws = np.arange(0, w - crop + 1, step)
        if w - (ws[-1] + crop) > thresh:
            ws = np.append(ws, w - crop)
        return [(int(x), int(y)) for x in hs for y in ws]

    for args in [(1356, 2040, 480, 240, 0), (88, 116, 32, 16, 0), (88, 116, 32, 16, 12), (96, 96, 32, 32, 0)]:
        assert subimage_grid(*args) == recipe(*args)
    assert subimage_grid(20, 100, 32, 16, 0) == []


def test_subimages_are_aligned_cuts_of_the_whole_images(gt_dir, tmp_path):
    out = tmp_path / 'out'
    result = prepare_csr(config(gt_dir, out, qualities=[20], crop=32, step=24, thresh=4))
    grid = subimage_grid(88, 116, 32, 24, 4)
    assert result.ok and result.folders['GT_sub'] == result.folders['LQ_q20_sub'] == 3 * len(grid)
    for name in NAMES:
        gt, lq = read(out / 'GT' / f'{name}.png'), read(out / 'LQ_q20' / f'{name}.png')
        assert gt.shape == (88, 116, 3) and lq.shape == (22, 29, 3)
        for index, (top, left) in enumerate(grid, start=1):
            np.testing.assert_array_equal(read(out / 'GT_sub' / f'{name}_s{index:03d}.png'),
                                          gt[top:top + 32, left:left + 32])
            np.testing.assert_array_equal(read(out / 'LQ_q20_sub' / f'{name}_s{index:03d}.png'),
                                          lq[top // 4:top // 4 + 8, left // 4:left // 4 + 8])


def test_resume_after_a_killed_run(gt_dir, tmp_path, monkeypatch):
    clean = tmp_path / 'clean'
    prepare_csr(config(gt_dir, clean, crop=32, step=32))
    expected = snapshot(clean)

    out = tmp_path / 'out'
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):  # the 20th rename never happens: the process "dies" mid-run
        calls.append(dst)
        if len(calls) == 20:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(prepare_module.os, 'replace', dying_replace)
    with pytest.raises(KeyboardInterrupt):
        prepare_csr(config(gt_dir, out, crop=32, step=32))
    monkeypatch.setattr(prepare_module.os, 'replace', real_replace)
    partial = snapshot(out)
    # an interrupted write removes its temporary; the run's lock file (free once the run ends) stays
    assert [p for p in partial if osp.basename(p).startswith('.')] == [prepare_module.LOCK_NAME]
    (out / 'GT' / f'.{NAMES[0]}.png.999999.tmp').write_bytes(b'partial')  # ... a kill -9 would leave one behind
    for path, data in partial.items():  # every visible PNG is complete and correct
        if not osp.basename(path).startswith('.'):
            assert data == expected[path], path
    assert not (out / 'GT' / f'{NAMES[0]}.png').exists()  # first image not marked done
    assert json.loads((out / 'manifest.json').read_text())['complete'] is False
    with pytest.raises(PrepareError, match='scale=4'):  # the killed run's options are already recorded
        prepare_csr(config(gt_dir, out, scale=2, crop=32, step=32))

    result = prepare_csr(config(gt_dir, out, crop=32, step=32))
    assert result.ok and result.written == 3 and result.skipped == 0
    assert snapshot(out) == expected  # temporaries removed, outputs identical to a clean run

    again = prepare_csr(config(gt_dir, out, crop=32, step=32))
    assert again.written == 0 and again.skipped == 3
    # a removed LQ is the only thing redone; a new quality is added to done images
    os.remove(out / 'LQ_q30' / f'{NAMES[1]}.png')
    mtime = os.stat(out / 'GT' / f'{NAMES[1]}.png').st_mtime_ns
    third = prepare_csr(config(gt_dir, out, crop=32, step=32))
    assert third.written == 1 and third.skipped == 2 and snapshot(out) == expected
    assert os.stat(out / 'GT' / f'{NAMES[1]}.png').st_mtime_ns == mtime
    fourth = prepare_csr(config(gt_dir, out, qualities=[50], crop=32, step=32))
    assert fourth.written == 3 and fourth.folders['LQ_q50'] == 3 and fourth.folders['LQ_q10'] == 3
    assert json.loads((out / 'manifest.json').read_text())['qualities'] == [10, 30, 50]


def test_corrupt_input_is_skipped_and_reported(gt_dir, tmp_path):
    (gt_dir / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
    out = tmp_path / 'out'
    script = osp.join(osp.dirname(sys.executable), 'basicsr')  # the installed console script
    command = [script] if osp.exists(script) else [sys.executable, '-m', 'mambacsr_arch.cli.main']
    proc = subprocess.run(command + ['prepare-csr', '--gt', str(gt_dir), '--out', str(out), '--quality', '10',
                                     '--workers', '2', '--quiet'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert 'broken.jpg' in proc.stderr and '3 written' in proc.stdout and '1 failed' in proc.stdout
    manifest = json.loads((out / 'manifest.json').read_text())
    assert [f['file'] for f in manifest['failed']] == [str(gt_dir / 'broken.jpg')]
    assert manifest['counts']['failed'] == 1 and manifest['counts']['written'] == 3
    assert sorted(os.listdir(out / 'LQ_q10')) == [f'{n}.png' for n in NAMES]


def test_lmdb_outputs_load_in_both_datasets(gt_dir, tmp_path):
    out = tmp_path / 'out'
    result = prepare_csr(config(gt_dir, out, qualities=[10], crop=32, step=32, lmdb=True))
    assert sorted(osp.basename(p) for p in result.lmdbs) == ['GT.lmdb', 'GT_sub.lmdb', 'LQ_q10.lmdb',
                                                            'LQ_q10_sub.lmdb']
    lmdb_opt = dict(name='l', phase='val', scale=4, io_backend={'type': 'lmdb'}, dataroot_gt=str(out / 'GT.lmdb'),
                    dataroot_lq=str(out / 'LQ_q10.lmdb'))
    disk_opt = dict(name='d', phase='val', scale=4, dataroot_gt=str(out / 'GT'), dataroot_lq=str(out / 'LQ_q10'))
    from_lmdb, from_disk = JPEGDegradedPairedDataset(lmdb_opt), JPEGDegradedPairedDataset(disk_opt)
    assert len(from_lmdb) == len(from_disk) == 3
    for i in range(3):
        assert torch.equal(from_lmdb[i]['lq'], from_disk[i]['lq']) and torch.equal(from_lmdb[i]['gt'],
                                                                                   from_disk[i]['gt'])
    # the sub-image LMDBs are plain BasicSR LMDBs: BasicSR's own PairedImageDataset trains on them
    basic = PairedImageDataset(dict(phase='train', scale=4, gt_size=32, use_hflip=False, use_rot=False,
                                    io_backend={'type': 'lmdb'}, dataroot_gt=str(out / 'GT_sub.lmdb'),
                                    dataroot_lq=str(out / 'LQ_q10_sub.lmdb')))
    assert len(basic) == result.folders['GT_sub']
    sample = basic[0]
    gt_sub = read(out / 'GT_sub' / f'{sample["gt_path"]}.png')
    assert torch.equal(sample['gt'], torch.from_numpy(gt_sub[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.))
    # a re-run reuses complete LMDBs
    mtime = os.stat(out / 'GT.lmdb' / 'data.mdb').st_mtime_ns
    prepare_csr(config(gt_dir, out, qualities=[10], crop=32, step=32, lmdb=True))
    assert os.stat(out / 'GT.lmdb' / 'data.mdb').st_mtime_ns == mtime


@pytest.mark.slow
def test_two_workers_write_the_same_files(gt_dir, tmp_path):
    prepare_csr(config(gt_dir, tmp_path / 'one', workers=1))
    result = prepare_csr(config(gt_dir, tmp_path / 'two', workers=2))
    assert result.ok and snapshot(tmp_path / 'one') == snapshot(tmp_path / 'two')


def test_usage_errors_exit_2_and_write_nothing(gt_dir, tmp_path, capsys):
    out = tmp_path / 'out'
    base = ['prepare-csr', '--gt', str(gt_dir), '--out', str(out), '--quiet', '--workers', '1']
    assert cli_main(base + ['--quality', '10', '--crop', '30']) == 2
    assert 'multiple of --scale' in capsys.readouterr().err
    assert cli_main(base + ['--quality', '0']) == 2
    assert cli_main(base + ['--quality', '10', '--thresh', '-1']) == 2  # ignored without --crop before
    assert '--thresh needs --crop' in capsys.readouterr().err
    assert cli_main(['prepare-csr', '--gt', str(tmp_path / 'none'), '--out', str(out), '--quality', '10']) == 2
    assert 'none' in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(base + ['--quality', '10']) == 0
    assert cli_main(base + ['--quality', '10', '--scale', '2']) == 2
    assert 'scale=4' in capsys.readouterr().err
    with pytest.raises(PrepareError, match='same name'):
        cv2.imwrite(str(gt_dir / 'coffee.jpg'), read(gt_dir / 'coffee.png'))
        prepare_csr(config(gt_dir, tmp_path / 'dup'))
