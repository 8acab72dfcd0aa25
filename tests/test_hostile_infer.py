"""Hostile inputs for `basicsr infer` / `basicsr eval` (issue 15 items 1, 2, 6, 11b): no silent harm.

Every refused run must leave each input byte-identical (sha256 before/after), write nothing, and say
which file is the problem. The network is BasicSR's MSRResNet at 8 features (milliseconds per image):
these tests are about paths, not pixels.
"""
import hashlib
import json
import os
import os.path as osp
import sys

import cv2
import pytest
import torch

import mambacsr_arch  # noqa: F401  (compat shims before basicsr)
from basicsr.archs import build_network
from mambacsr_arch.cli.infer import MANIFEST_NAME
from mambacsr_arch.cli.main import main as cli_main

sys.path.insert(0, osp.dirname(__file__))
from helpers_images import photo_bgr  # noqa: E402

pytestmark = pytest.mark.hostile

NET = {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 4}


@pytest.fixture(scope='module')
def net_args(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt') / 'net.pth'
    torch.save({'params': build_network(NET).state_dict()}, path)
    kwargs = [f'{k}={v}' for k, v in NET.items() if k != 'type']
    return ['--arch', 'MSRResNet', '--weights', str(path), '--device', 'cpu', '--no-progress', '--arch-opt'] + kwargs


def _infer(*args):
    return cli_main(['infer'] + [str(a) for a in args])


def _eval(*args):
    return cli_main(['eval'] + [str(a) for a in args])


def _images(folder, names, size=(8, 8)):
    """Write ``names`` (e.g. 'x.png', 'x.jpg') into ``folder``, each a different photo."""
    folder.mkdir(exist_ok=True)
    photos = ('chelsea', 'coffee', 'rocket', 'astronaut')
    for index, name in enumerate(names):
        assert cv2.imwrite(str(folder / name), photo_bgr(photos[index % len(photos)], size))


def _snapshot(folder):
    """{name: sha256} of every file (dotfiles included) directly in ``folder``; links by their target's bytes."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() if (folder / name).is_file() else 'link'
            for name in sorted(os.listdir(folder))}


def _error_lines(capsys):
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return err


# ------------------------------------------------------------------ item 1: an output is another input


def test_same_stem_png_and_jpg_into_the_input_folder_with_overwrite_is_refused(tmp_path, net_args, capsys):
    src = tmp_path / 'd'
    _images(src, ['x.png', 'x.jpg'])
    before = _snapshot(src)

    assert _infer('-i', src, '-o', src, '--overwrite', *net_args) == 2

    err = _error_lines(capsys)
    assert _snapshot(src) == before  # no byte changed, no output, no manifest, no temp file
    assert f"the output '{src / 'x.png'}' is the input '{src / 'x.png'}'" in err, err  # x.jpg -> x.png
    assert 'nothing written' in err and '--suffix' in err and '-o' in err


def test_ext_jpg_with_p_png_and_p_jpg_is_refused(tmp_path, net_args, capsys):
    src = tmp_path / 'd'
    _images(src, ['p.png', 'p.jpg'])
    before = _snapshot(src)

    assert _infer('-i', src, '-o', src, '--ext', 'jpg', '--overwrite', *net_args) == 2

    err = _error_lines(capsys)
    assert _snapshot(src) == before
    assert f"'{src / 'p.png'}': the output '{src / 'p.jpg'}' is the input '{src / 'p.jpg'}'" in err, err
    assert f"'{src / 'p.jpg'}': the output '{src / 'p.jpg'}' is this input itself" in err, err


def test_two_inputs_one_output_and_an_output_linked_to_an_input_are_refused(tmp_path, net_args, capsys):
    src, out = tmp_path / 'd', tmp_path / 'out'
    _images(src, ['x.png', 'x.jpg'])
    before = _snapshot(src)
    assert _infer('-i', src, '-o', out, *net_args) == 2
    err = _error_lines(capsys)
    assert f"'{src / 'x.jpg'}' and '{src / 'x.png'}' would both be written to '{out / 'x.png'}'" in err, err
    assert not out.exists()  # refused before the output folder was made

    # an existing output that is a link to an input: writing "through" it is refused, even with --overwrite
    os.remove(src / 'x.jpg')
    out.mkdir()
    os.symlink(src / 'x.png', out / 'x.png')
    assert _infer('-i', src, '-o', out, '--overwrite', *net_args) == 2
    assert f"the output '{out / 'x.png'}' is this input itself" in _error_lines(capsys)
    assert _snapshot(src) == {'x.png': before['x.png']}
    assert os.readlink(out / 'x.png') == str(src / 'x.png')


def test_a_path_through_dotdot_cannot_reach_an_input(tmp_path, net_args, capsys, monkeypatch):
    """'-o missing/../d' resolves to d once infer made 'missing'; a --suffix with a separator leaves -o."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / 'd'
    _images(src, ['a.png', 'b.png'])
    before = _snapshot(src)
    assert _infer('-i', 'd', '-o', 'missing/../d', '--overwrite', *net_args) == 2
    assert f"the output '{src / 'a.png'}' is this input itself" in _error_lines(capsys)
    assert _infer('-i', 'd/a.png', '-o', 'out', '--suffix', '/../../d/a', *net_args) == 2
    assert "--suffix '/../../d/a' contains '/'" in _error_lines(capsys)
    assert _infer('-i', 'd', '-o', 'out', '--suffix', '/../../d/b', *net_args) == 2
    assert _snapshot(src) == before and sorted(os.listdir(tmp_path)) == ['d']  # no 'missing', no 'out'


# ------------------------------------------------------------------ item 2: earlier outputs are not re-read


def test_rerun_with_suffix_into_the_input_folder_does_not_restore_its_own_outputs(tmp_path, net_args, capsys):
    src = tmp_path / 'd'
    _images(src, ['a.png'])
    original = _snapshot(src)['a.png']
    assert _infer('-i', src, '-o', src, '--suffix', '_x4', *net_args) == 0
    assert sorted(os.listdir(src)) == [MANIFEST_NAME, 'a.png', 'a_x4.png']
    manifest = json.loads((src / MANIFEST_NAME).read_text())
    assert manifest['outputs']['a_x4.png']['input'] == 'a.png'
    capsys.readouterr()

    assert _infer('-i', src, '-o', src, '--suffix', '_x4', *net_args) == 0  # the user runs it again
    summary = capsys.readouterr().out
    assert '0 written' in summary and '1 skipped' in summary and '1 earlier output(s)' in summary, summary
    assert _infer('-i', src, '-o', src, '--suffix', '_x4', '--overwrite', *net_args) == 0  # and again, redoing
    assert '1 written' in capsys.readouterr().out
    assert sorted(os.listdir(src)) == [MANIFEST_NAME, 'a.png', 'a_x4.png']  # never a_x4_x4.png
    assert _snapshot(src)['a.png'] == original

    # the user edits the output: it is their image now, so a.png -> a_x4.png would destroy it
    assert cv2.imwrite(str(src / 'a_x4.png'), photo_bgr('camera', (32, 32)))
    before = _snapshot(src)
    assert _infer('-i', src, '-o', src, '--suffix', '_x4', '--overwrite', *net_args) == 2
    err = _error_lines(capsys)
    assert f"the output '{src / 'a_x4.png'}' is the input '{src / 'a_x4.png'}'" in err, err
    assert 'earlier run' in err
    assert _snapshot(src) == before


def test_a_folder_holding_only_earlier_outputs_says_so(tmp_path, net_args, capsys):
    src, out = tmp_path / 'd', tmp_path / 'out'
    _images(src, ['a.png'])
    assert _infer('-i', src, '-o', out, *net_args) == 0
    capsys.readouterr()
    assert _infer('-i', out, '-o', out, '--suffix', '_x4', *net_args) == 2
    err = _error_lines(capsys)
    assert 'earlier basicsr infer' in err and MANIFEST_NAME in err and 'another -o' in err, err
    # chaining into another folder is the way to restore them again
    assert _infer('-i', out, '-o', tmp_path / 'x16', *net_args) == 0
    assert cv2.imread(str(tmp_path / 'x16' / 'a.png')).shape == (128, 128, 3)


def test_a_damaged_manifest_is_reported_not_ignored(tmp_path, net_args, capsys):
    src = tmp_path / 'd'
    _images(src, ['a.png'])
    (src / MANIFEST_NAME).write_text('{"outputs": ')
    before = _snapshot(src)
    assert _infer('-i', src, '-o', src, '--suffix', '_x4', *net_args) == 2
    err = _error_lines(capsys)
    assert str(src / MANIFEST_NAME) in err and 'delete' in err, err
    assert _snapshot(src) == before


# ------------------------------------------------------------------ item 6: symbolic-link loops


def test_infer_link_loop_file_is_one_clear_error_and_folder_loop_is_harmless(tmp_path, net_args, capsys):
    src, out = tmp_path / 'd', tmp_path / 'out'
    _images(src, ['a.png'])
    os.symlink(src, src / 'loop')  # d/loop -> d: not an image, not entered (the listing is not recursive)
    assert _infer('-i', src, '-o', out, *net_args) == 0
    assert sorted(os.listdir(out)) == [MANIFEST_NAME, 'a.png']
    capsys.readouterr()

    os.symlink('x.png', src / 'x.png')  # x.png -> x.png
    before = _snapshot(src)
    assert _infer('-i', src, '-o', tmp_path / 'out2', *net_args) == 2
    err = _error_lines(capsys)
    assert str(src / 'x.png') in err and 'symbolic-link loop' in err, err
    assert 'cannot create the output folder' not in err
    assert not (tmp_path / 'out2').exists()
    assert _snapshot(src) == before

    assert _infer('-i', src / 'x.png', '-o', tmp_path / 'out2', *net_args) == 2  # the loop named directly
    assert 'symbolic-link loop' in _error_lines(capsys)
    os.remove(src / 'x.png')
    os.symlink('self', tmp_path / 'self')  # -o a link loop: the one case that may say "cannot create"
    assert _infer('-i', src, '-o', tmp_path / 'self', *net_args) == 2
    err = _error_lines(capsys)
    assert f"cannot create the output folder '{tmp_path / 'self'}'" in err and 'symbolic-link loop' in err, err
    assert _snapshot(src) == {name: value for name, value in before.items() if name != 'x.png'}


def test_eval_link_loop_file_is_one_clear_error_and_folder_loop_is_harmless(tmp_path, capsys):
    gt, sr = tmp_path / 'gt', tmp_path / 'sr'
    _images(gt, ['a.png', 'b.png'], size=(16, 16))
    _images(sr, ['a.png', 'b.png'], size=(16, 16))
    os.symlink(gt, gt / 'loop')
    assert _eval('--restored', sr, '--gt', gt) == 0
    assert 'mean (2)' in capsys.readouterr().out

    os.symlink('c.png', sr / 'c.png')
    assert _eval('--restored', sr, '--gt', gt) == 2
    err = _error_lines(capsys)
    assert '--restored' in err and str(sr / 'c.png') in err and 'symbolic-link loop' in err, err


# ------------------------------------------------------------------ item 11b: eval's --json / --csv


@pytest.fixture()
def eval_dirs(tmp_path):
    gt, sr = tmp_path / 'gt', tmp_path / 'sr'
    _images(gt, ['a.png'], size=(16, 16))
    _images(sr, ['a.png'], size=(16, 16))
    return sr, gt


def test_eval_unwritable_json_fails_before_scoring(tmp_path, eval_dirs, capsys):
    sr, gt = eval_dirs
    blocker = tmp_path / 'notes.txt'
    blocker.write_text('a file, not a folder')
    cases = [('--json', blocker / 'scores.json', "is not a folder"),  # parent is a file
             ('--json', tmp_path, 'is a folder'),  # the destination is a folder
             ('--csv', gt / 'a.png', 'folder being scored')]  # would overwrite a GT image
    for flag, path, reason in cases:
        before = _snapshot(gt), _snapshot(sr)
        assert _eval('--restored', sr, '--gt', gt, flag, path) == 2
        captured = capsys.readouterr()
        assert captured.out == ''  # nothing scored or printed
        assert str(path) in captured.err and reason in captured.err and 'Traceback' not in captured.err, captured.err
        assert (_snapshot(gt), _snapshot(sr)) == before
    assert _eval('--restored', sr, '--gt', gt, '--csv', tmp_path / 's', '--json', tmp_path / 's') == 2
    assert 'same file' in _error_lines(capsys)


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0, reason='root can write into a 0o500 folder')
def test_eval_json_in_a_read_only_folder_fails_before_scoring(tmp_path, eval_dirs, capsys):
    sr, gt = eval_dirs
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert _eval('--restored', sr, '--gt', gt, '--json', locked / 'scores.json') == 2
    finally:
        locked.chmod(0o700)
    captured = capsys.readouterr()
    assert captured.out == '' and str(locked / 'scores.json') in captured.err


def test_eval_write_failure_after_scoring_keeps_the_earlier_file(tmp_path, eval_dirs, capsys, monkeypatch):
    sr, gt = eval_dirs
    target = tmp_path / 'scores.json'
    target.write_text('{"earlier": true}\n')

    def disk_full(src, dst):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'replace', disk_full)
    assert _eval('--restored', sr, '--gt', gt, '--json', target) == 2
    captured = capsys.readouterr()
    assert 'mean (1)' in captured.out  # scored and printed, then the write failed
    assert f"cannot write --json '{target}'" in captured.err and 'No space left' in captured.err, captured.err
    assert 'Traceback' not in captured.err
    assert target.read_text() == '{"earlier": true}\n'
    assert sorted(os.listdir(tmp_path)) == ['gt', 'scores.json', 'sr']  # no temporary file left


def test_ctrl_c_mid_run_writes_no_partial_file_and_a_rerun_continues(tmp_path, net_args, capsys, monkeypatch):
    from mambacsr_arch.cli import infer as infer_cli

    _images(tmp_path / 'in', ['a.png', 'b.png', 'c.png'])
    before = _snapshot(tmp_path / 'in')
    real, calls = infer_cli.restore_file, []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(infer_cli, 'restore_file', interrupted_on_the_second)
    assert _infer('-i', tmp_path / 'in', '-o', tmp_path / 'out', *net_args) == 130
    err = _error_lines(capsys)
    assert 'interrupted at' in err and 'b.png' in err and 'Run the same command again' in err
    assert sorted(os.listdir(tmp_path / 'out')) == [MANIFEST_NAME, 'a.png']  # no temporary left behind
    monkeypatch.setattr(infer_cli, 'restore_file', real)
    assert _infer('-i', tmp_path / 'in', '-o', tmp_path / 'out', *net_args) == 0
    assert sorted(os.listdir(tmp_path / 'out')) == [MANIFEST_NAME, 'a.png', 'b.png', 'c.png']
    assert _snapshot(tmp_path / 'in') == before


def test_temporaries_of_a_killed_run_are_removed_on_the_next_run(tmp_path, net_args, capsys):
    """kill -9 mid-write leaves '.a.png.<pid>.tmp'; the next run into the folder removes the dead writers' ones."""
    import subprocess

    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    _images(tmp_path / 'in', ['a.png'])
    out = tmp_path / 'out'
    out.mkdir()
    stale = [out / f'.a.png.{dead.pid}.tmp', out / f'.{MANIFEST_NAME}.{dead.pid}.tmp']
    kept = [out / f'.a.png.{os.getppid()}.tmp', out / f'.notes.txt.{dead.pid}.tmp']  # a live writer; not ours
    for path in stale + kept:
        path.write_bytes(b'partial')
    assert _infer('-i', tmp_path / 'in', '-o', out, *net_args) == 0
    assert 'removed 2 temporary file(s) a killed run left' in capsys.readouterr().err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_opencv_says_nothing_of_its_own_about_a_truncated_image(tmp_path, net_args, capfd):
    """OpenCV printed '[ WARN:0@1.1] ... PNG input buffer is incomplete' beside our one report of the file."""
    _images(tmp_path / 'in', ['a.png'], size=(64, 64))
    data = (tmp_path / 'in' / 'a.png').read_bytes()
    (tmp_path / 'in' / 'a.png').write_bytes(data[:len(data) // 2])
    assert _infer('-i', tmp_path / 'in', '-o', tmp_path / 'out', *net_args) == 1
    err = capfd.readouterr().err
    assert 'a.png: cannot decode image' in err and 'WARN' not in err and '[ERROR' not in err, err
