"""Hostile inputs to `basicsr prepare-csr`: changed sources vs. stale outputs/LMDBs, --out over --gt, link loops.

Issue 15, items 3 (stale LMDB served silently), 5 (`--gt X/GT --out X`) and 6 (symlink loop traceback).
"""
import json
import os

import cv2
import lmdb
import numpy as np
import pytest

from helpers_images import make_image_folder, photo_bgr
from mambacsr_arch.cli.main import main as cli_main
from mambacsr_arch.data import prepare as prepare_module
from mambacsr_arch.data.degradations import mod_crop
from mambacsr_arch.data.prepare import PrepareError, prepare_csr, subimage_grid
from test_degradations import independent_csr
from test_prepare_csr import config as base_config, read

pytestmark = pytest.mark.hostile

NAMES = ['astronaut', 'chelsea']
SIZE = (42, 58)  # not multiples of 4


def config(gt_dir, out, **kw):
    return base_config(gt_dir, out, **{'qualities': [10], 'workers': 1, **kw})


def lmdb_image(path, key):
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    with env.begin() as txn:
        value = txn.get(key.encode('ascii'))
    env.close()
    return cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_UNCHANGED)


def tree(folder):
    """{relative path: (bytes)} of every file under ``folder``."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), 'rb') as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return files


def run_cli(capsys, *args):
    code = cli_main(['prepare-csr', *map(str, args), '--quiet', '--workers', '1'])
    out, err = capsys.readouterr()
    return code, out, err


def test_changed_source_regenerates_its_outputs_and_rebuilds_the_lmdb(tmp_path):
    gt_dir, out = tmp_path / 'gt', tmp_path / 'out'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    first = prepare_csr(config(gt_dir, out, qualities=[10, 30], crop=16, step=16, lmdb=True))
    assert first.ok and first.regenerated == [] and first.lmdbs_rebuilt == []
    kept = os.stat(out / 'GT' / 'chelsea.png').st_mtime_ns
    # the source is regenerated with other content and another size (fewer sub-images), same name
    new = photo_bgr('coffee', (30, 38))[::-1].copy()
    assert cv2.imwrite(str(gt_dir / 'astronaut.png'), new)

    again = prepare_csr(config(gt_dir, out, qualities=[10], crop=16, step=16, lmdb=True))
    assert again.ok and again.regenerated == ['astronaut'] and again.written == 1 and again.skipped == 1
    expected_gt = mod_crop(new, 4)
    np.testing.assert_array_equal(read(out / 'GT' / 'astronaut.png'), expected_gt)
    for quality in (10, 30):  # q30 was not asked for this time, but must not stay stale either
        np.testing.assert_array_equal(read(out / f'LQ_q{quality}' / 'astronaut.png'),
                                      independent_csr(new, 4, quality))
    count = len(subimage_grid(28, 36, 16, 16, 0))  # 6, where the old 40 x 56 image had 12: none may linger
    assert count < len(subimage_grid(40, 56, 16, 16, 0))
    for folder in ('GT_sub', 'LQ_q10_sub', 'LQ_q30_sub'):
        subs = sorted(n for n in os.listdir(out / folder) if n.startswith('astronaut_'))
        assert subs == [f'astronaut_s{i:03d}.png' for i in range(1, count + 1)], folder
    assert os.stat(out / 'GT' / 'chelsea.png').st_mtime_ns == kept  # the unchanged source is left alone
    # the LMDBs serve the new content, and the run says they were rebuilt
    assert sorted(os.path.basename(p) for p in again.lmdbs_rebuilt) == ['GT.lmdb', 'GT_sub.lmdb', 'LQ_q10.lmdb',
                                                                       'LQ_q10_sub.lmdb', 'LQ_q30.lmdb',
                                                                       'LQ_q30_sub.lmdb']
    np.testing.assert_array_equal(lmdb_image(out / 'GT.lmdb', 'astronaut'), expected_gt)
    np.testing.assert_array_equal(lmdb_image(out / 'LQ_q30.lmdb', 'astronaut'), independent_csr(new, 4, 30))
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['regenerated'] == ['astronaut'] and manifest['sources']['astronaut']['size'] == \
        os.path.getsize(gt_dir / 'astronaut.png')

    # unchanged: nothing remade, LMDBs reused; a prepared PNG replaced behind our back: that LMDB is rebuilt
    third = prepare_csr(config(gt_dir, out, qualities=[10], crop=16, step=16, lmdb=True))
    assert third.regenerated == [] and third.lmdbs_rebuilt == [] and third.skipped == 2
    cv2.imwrite(str(out / 'GT' / 'chelsea.png'), photo_bgr('rocket', (40, 56)))
    fourth = prepare_csr(config(gt_dir, out, qualities=[10], crop=16, step=16, lmdb=True))
    assert [os.path.basename(p) for p in fourth.lmdbs_rebuilt] == ['GT.lmdb']
    np.testing.assert_array_equal(lmdb_image(out / 'GT.lmdb', 'chelsea'), read(out / 'GT' / 'chelsea.png'))


def test_outputs_of_an_older_manifest_without_hashes_are_remade(tmp_path):
    gt_dir, out = tmp_path / 'gt', tmp_path / 'out'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    prepare_csr(config(gt_dir, out, lmdb=True))
    manifest = json.loads((out / 'manifest.json').read_text())
    del manifest['sources']  # as written before the content checks existed
    (out / 'manifest.json').write_text(json.dumps(manifest))
    os.remove(out / 'GT.lmdb' / prepare_module.LMDB_RECORD)
    result = prepare_csr(config(gt_dir, out, lmdb=True))
    assert result.regenerated == NAMES and result.written == 2
    assert [os.path.basename(p) for p in result.lmdbs_rebuilt] == ['GT.lmdb', 'LQ_q10.lmdb']


def test_source_changed_during_the_run_is_reported_not_used(tmp_path, monkeypatch):
    gt_dir, out = tmp_path / 'gt', tmp_path / 'out'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    real = prepare_module._read_bytes
    monkeypatch.setattr(prepare_module, '_read_bytes',
                        lambda path: real(path) + (b'!' if path.endswith('chelsea.png') else b''))
    result = prepare_csr(config(gt_dir, out))
    assert [f['file'] for f in result.failed] == [str(gt_dir / 'chelsea.png')]
    assert 'changed while prepare-csr was running' in result.failed[0]['error']
    assert sorted(os.listdir(out / 'GT')) == ['astronaut.png']


def test_gt_folder_inside_out_named_like_an_output_is_refused(tmp_path, capsys):
    root = tmp_path / 'Set5'
    make_image_folder(root / 'GT', names=NAMES, size=SIZE, ext='.jpg')  # raw, not mod-cropped, not PNG
    before = tree(root)
    code, _, err = run_cli(capsys, '--gt', root / 'GT', '--out', root, '--quality', '10')
    assert code == 2 and 'Traceback' not in err
    assert str(root / 'GT') in err and str(root) in err and 'never writes into its source' in err
    assert tree(root) == before and sorted(os.listdir(root)) == ['GT']  # nothing written anywhere
    # --out equal to --gt, and an output folder that is a link to --gt, are refused the same way
    code, _, err = run_cli(capsys, '--gt', root / 'GT', '--out', root / 'GT', '--quality', '10')
    assert code == 2 and 'is the --gt folder' in err
    linked = tmp_path / 'linked'
    linked.mkdir()
    os.symlink(root / 'GT', linked / 'LQ_q10')
    code, _, err = run_cli(capsys, '--gt', root / 'GT', '--out', linked, '--quality', '10')
    assert code == 2 and str(linked / 'LQ_q10') in err
    assert tree(root) == before

    # the recipe that works: originals in their own folder, --out around it; GT is mod-cropped, source untouched
    os.rename(root / 'GT', root / 'HR')
    code, out, err = run_cli(capsys, '--gt', root / 'HR', '--out', root, '--quality', '10')
    assert code == 0, err
    assert read(root / 'GT' / 'astronaut.png').shape == (40, 56, 3)
    assert sorted(os.listdir(root / 'HR')) == ['astronaut.jpg', 'chelsea.jpg']
    assert run_cli(capsys, '--gt', root / 'HR', '--out', root, '--quality', '10')[0] == 0  # and re-runs


def test_out_with_foreign_images_and_no_manifest_is_refused(tmp_path, capsys):
    gt_dir, out = tmp_path / 'HR', tmp_path / 'out'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    make_image_folder(out / 'GT', names=NAMES, size=SIZE)  # a raw GT copied in by hand
    before = tree(out)
    code, _, err = run_cli(capsys, '--gt', gt_dir, '--out', out, '--quality', '10')
    assert code == 2 and 'no manifest.json' in err and str(out / 'GT') in err
    assert tree(out) == before


def test_link_loop_in_the_gt_folder_is_a_clear_error(tmp_path, capsys):
    gt_dir, out = tmp_path / 'gt', tmp_path / 'out'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    os.symlink(gt_dir / 'loop.png', gt_dir / 'loop.png')
    code, _, err = run_cli(capsys, '--gt', gt_dir, '--out', out, '--quality', '10')
    assert code == 2 and 'Traceback' not in err
    assert str(gt_dir / 'loop.png') in err and 'link loop' in err
    assert not out.exists()
    # --gt itself a link loop, --out a dangling link: named, exit 2
    os.symlink(tmp_path / 'self', tmp_path / 'self')
    code, _, err = run_cli(capsys, '--gt', tmp_path / 'self', '--out', out, '--quality', '10')
    assert code == 2 and 'link loop' in err
    os.symlink(tmp_path / 'nowhere', tmp_path / 'dangling')
    os.remove(gt_dir / 'loop.png')
    code, _, err = run_cli(capsys, '--gt', gt_dir, '--out', tmp_path / 'dangling', '--quality', '10')
    assert code == 2 and 'not a folder' in err
    with pytest.raises(PrepareError, match='not a folder'):
        prepare_csr(config(gt_dir, gt_dir / 'astronaut.png'))
    (tmp_path / 'blocked').mkdir()
    os.symlink(tmp_path / 'blocked' / 'GT', tmp_path / 'blocked' / 'GT')  # an output folder that is a link loop
    with pytest.raises(PrepareError, match='link loop is in the way'):
        prepare_csr(config(gt_dir, tmp_path / 'blocked'))


# ----------------------------------------------------------------------------- too small, two runs, flags, --out


def test_gt_too_small_for_the_kernel_is_named_and_the_others_are_prepared(tmp_path, capsys):
    gt_dir = tmp_path / 'HR'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    cv2.imwrite(str(gt_dir / 'tiny.png'), photo_bgr('coffee', (6, 40)))  # 4 px after the mod-crop: 1 px LQ
    out = tmp_path / 'out'
    code = cli_main(['prepare-csr', '--gt', str(gt_dir), '--out', str(out), '--quality', '10', '--quiet',
                     '--workers', '2'])
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err, err
    assert 'tiny.png: too small' in err and 'at least 8 px' in err, err
    assert sorted(os.listdir(out / 'LQ_q10')) == [f'{n}.png' for n in NAMES]  # the others were finished
    assert json.loads((out / 'manifest.json').read_text())['failed'][0]['file'].endswith('tiny.png')


def test_a_second_run_on_one_out_is_refused_naming_the_first(tmp_path, capsys):
    from mambacsr_arch.fileio import folder_lock

    gt_dir = tmp_path / 'HR'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    out = tmp_path / 'out'
    assert run_cli(capsys, '--gt', gt_dir, '--out', out, '--quality', '10', '--lmdb')[0] == 0
    before = tree(out)
    with folder_lock(out / prepare_module.LOCK_NAME):  # a run in progress (flock: another open, even in-process)
        code, _, err = run_cli(capsys, '--gt', gt_dir, '--out', out, '--quality', '10', '20', '--lmdb')
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    assert f'process {os.getpid()}' in err and 'in use' in err, err
    assert {k: v for k, v in tree(out).items() if k != prepare_module.LOCK_NAME} == \
        {k: v for k, v in before.items() if k != prepare_module.LOCK_NAME}  # nothing touched
    assert run_cli(capsys, '--gt', gt_dir, '--out', out, '--quality', '10', '20', '--lmdb')[0] == 0  # lock released


@pytest.mark.parametrize('workers', ['0', '-3'])
def test_workers_below_one_refused(tmp_path, capsys, workers):
    gt_dir = tmp_path / 'HR'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    code = cli_main(['prepare-csr', '--gt', str(gt_dir), '--out', str(tmp_path / 'out'), '--quality', '10',
                     '--quiet', '--workers', workers])
    err = capsys.readouterr().err
    assert code == 2 and '--workers' in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'out').exists()


def test_out_that_cannot_be_written_is_one_line(tmp_path, capsys):
    # tests run as root, where chmod 555 does not stop writes: a path under a file cannot be created by anyone
    gt_dir = tmp_path / 'HR'
    make_image_folder(gt_dir, names=NAMES, size=SIZE)
    (tmp_path / 'a_file').write_text('x')
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, '--gt', gt_dir, '--out', tmp_path / 'a_file' / 'sub', '--quality', '10')
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    assert 'a_file' in err and '--out' in err, err
    assert tree(tmp_path) == before
