"""Hostile use of `basicsr infer`'s output folder and of unusual networks/images (issue: infer's record under
concurrency, images of any channel count).

* two runs writing into one ``-o`` at once: every output recorded in the manifest (no lost update),
  so a later ``-i o -o o --suffix _x4`` does not restore infer's own outputs again;
* a recorded output cut short (a copy, a full disk) is restored again and said once; one edited into
  another whole image is kept;
* a 1-channel network (``--arch MambaCSR --arch-opt in_chans=1``) restores gray files into gray files;
  a colour file fails with a message naming it and the fix; alpha / 16-bit / gray conversions are
  said once per run.
"""
import hashlib
import json
import os
import os.path as osp
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (registers the archs before basicsr is used)
from basicsr.archs import build_network
from mambacsr_arch.cli.infer_outputs import MANIFEST_NAME, record_outputs
from mambacsr_arch.cli.main import main as cli_main

sys.path.insert(0, osp.dirname(__file__))
from helpers_images import photo_bgr  # noqa: E402

pytestmark = pytest.mark.hostile

NET = {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 4}
GRAY_MAMBACSR = {'type': 'MambaCSR', 'in_chans': 1, 'upscale': 2, 'img_size': 16, 'embed_dim': 24, 'depths': [1],
                 'depths2': [1], 'd_state': 4, 'mlp_ratio': 1.0}


def _args(path, opt):
    kwargs = [f'{k}={v}' for k, v in opt.items() if k != 'type']
    return ['--arch', opt['type'], '--weights', str(path), '--device', 'cpu', '--no-progress', '--arch-opt'] + kwargs


@pytest.fixture(scope='module')
def net_args(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt') / 'net.pth'
    torch.save({'params': build_network(NET).state_dict()}, path)
    return _args(path, NET)


def _infer(*args):
    return cli_main(['infer'] + [str(a) for a in args])


def _manifest(folder):
    return json.loads((folder / MANIFEST_NAME).read_text())['outputs']


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- concurrent writers

_WORKER = r'''
import os, sys, time
go = sys.argv[1]
from mambacsr_arch.cli.main import main
open(go + '.ready.' + str(os.getpid()), 'w').close()
while not os.path.exists(go):
    time.sleep(0.01)
sys.exit(main(['infer'] + sys.argv[2:]))
'''


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder_record_every_output(tmp_path, net_args):
    names = {'a': [f'a{i:02d}.png' for i in range(14)], 'b': [f'b{i:02d}.png' for i in range(14)]}
    for group, files in names.items():
        (tmp_path / group).mkdir()
        for index, name in enumerate(files):
            cv2.imwrite(str(tmp_path / group / name), photo_bgr(('chelsea', 'coffee')[index % 2], (8, 8)))
    out, go = tmp_path / 'out', str(tmp_path / 'go')
    procs = [subprocess.Popen([sys.executable, '-c', _WORKER, go, '-i', str(tmp_path / group), '-o', str(out)]
                              + net_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for group in names]
    deadline = time.time() + 120
    while len([n for n in os.listdir(tmp_path) if n.startswith('go.ready.')]) < 2 and time.time() < deadline:
        time.sleep(0.05)
    open(go, 'w').close()  # both imported: start them together
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    written = sorted(n for n in os.listdir(out) if n.endswith('.png'))
    assert written == sorted(names['a'] + names['b'])
    recorded = _manifest(out)
    assert sorted(recorded) == written  # no record lost (today: 12 of 28 kept)
    for name in written:
        assert recorded[name]['sha256'] == _sha(out / name) and recorded[name]['input'] == name
    # infer's own outputs are recognised: -i out -o out restores nothing again
    assert _infer('-i', out, '-o', out, '--suffix', '_x4', *net_args) == 2
    assert sorted(n for n in os.listdir(out) if n.endswith('.png')) == written


def _record_many(out_dir, prefix, count):
    for index in range(count):
        name = f'{prefix}{index:03d}.png'
        with open(osp.join(out_dir, name), 'wb') as f:
            f.write(name.encode())
        record_outputs(out_dir, {name: {'input': name, 'sha256': hashlib.sha256(name.encode()).hexdigest()}})


def test_record_outputs_merges_concurrent_writers(tmp_path):
    """The read-merge-write itself, hammered by four writers (flock excludes separate opens, threads too)."""
    threads = [threading.Thread(target=_record_many, args=(str(tmp_path), prefix, 40)) for prefix in 'wxyz']
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_manifest(tmp_path)) == 160
    assert sorted(os.listdir(tmp_path)) == sorted([MANIFEST_NAME] + list(_manifest(tmp_path)))  # no lock file left


# ----------------------------------------------------------------------------- damaged / edited outputs


def test_truncated_recorded_output_is_restored_again(tmp_path, net_args, capsys):
    src = tmp_path / 'lq'
    src.mkdir()
    for name, photo in (('a.png', 'chelsea'), ('b.png', 'coffee'), ('c.png', 'rocket')):
        cv2.imwrite(str(src / name), photo_bgr(photo, (12, 12)))
    out = tmp_path / 'out'
    assert _infer('-i', src, '-o', out, *net_args) == 0
    good = {name: (out / name).read_bytes() for name in ('a.png', 'b.png')}
    (out / 'a.png').write_bytes(good['a.png'][:len(good['a.png']) // 2])  # a copy cut short
    edited = cv2.GaussianBlur(cv2.imread(str(out / 'b.png')), (3, 3), 0)
    cv2.imwrite(str(out / 'b.png'), edited)  # edited on purpose: still a whole image
    edited_bytes = (out / 'b.png').read_bytes()
    (out / 'd.png').write_bytes(b'not ours, not an image')  # never recorded: left alone
    capsys.readouterr()

    assert _infer('-i', src, '-o', out, *net_args) == 0
    captured = capsys.readouterr()
    assert (out / 'a.png').read_bytes() == good['a.png']  # redone, same bytes as the first run
    assert (out / 'b.png').read_bytes() == edited_bytes  # kept
    assert (out / 'd.png').read_bytes() == b'not ours, not an image'
    assert '1 written' in captured.out and '2 skipped' in captured.out, captured.out
    assert captured.err.count('damaged') == 1 and "restored again: 'a.png'" in captured.err, captured.err
    assert captured.err.count('edited') == 1 and "kept, --overwrite to restore them: 'b.png'" in captured.err
    assert _manifest(out)['a.png']['sha256'] == _sha(out / 'a.png')


# ----------------------------------------------------------------------------- channels


@pytest.fixture(scope='module')
def gray_net_args(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt_gray') / 'gray.pth'
    torch.save({'params': build_network(dict(GRAY_MAMBACSR)).state_dict()}, path)
    return _args(path, GRAY_MAMBACSR)


@pytest.mark.slow
def test_one_channel_network_restores_gray_and_names_colour_files(tmp_path, gray_net_args, capsys):
    src = tmp_path / 'lq'
    src.mkdir()
    gray = cv2.cvtColor(photo_bgr('camera', (16, 12)), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(src / 'gray.png'), gray)
    cv2.imwrite(str(src / 'gray_rgb.png'), np.dstack([gray] * 3))  # colour file, equal channels
    cv2.imwrite(str(src / 'photo.png'), photo_bgr('chelsea', (16, 12)))  # real colour
    out = tmp_path / 'out'

    assert _infer('-i', src, '-o', out, *gray_net_args) == 1  # the colour file fails, the others are written
    captured = capsys.readouterr()
    assert 'photo.png' in captured.err and 'takes 1 channel' in captured.err and 'grayscale' in captured.err
    assert 'Traceback' not in captured.err and 'conv2d' not in captured.err.lower() and 'groups' not in captured.err
    assert '2 written' in captured.out and '1 failed' in captured.out, captured.out
    first = cv2.imread(str(out / 'gray.png'), cv2.IMREAD_UNCHANGED)
    assert first.shape == (32, 24) and first.dtype == np.uint8  # one channel in, one channel out
    np.testing.assert_array_equal(cv2.imread(str(out / 'gray_rgb.png'), cv2.IMREAD_UNCHANGED), first)
    assert 'equal: fed to the 1-channel network as gray (gray_rgb.png)' in captured.err
    assert not (out / 'photo.png').exists()


def test_alpha_16bit_and_gray_are_said_once_per_run(tmp_path, net_args, capsys):
    src = tmp_path / 'lq'
    src.mkdir()
    for index in range(2):
        photo = photo_bgr(('chelsea', 'coffee')[index], (8, 8))
        cv2.imwrite(str(src / f'alpha{index}.png'), np.dstack([photo, np.full((8, 8), 200, np.uint8)]))
        cv2.imwrite(str(src / f'deep{index}.png'), photo.astype(np.uint16) * 257)
        cv2.imwrite(str(src / f'gray{index}.png'), cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))
    assert _infer('-i', src, '-o', tmp_path / 'out', *net_args) == 0
    err = capsys.readouterr().err
    assert err.count('note: 2 image(s) with an alpha channel: restored RGB, alpha dropped') == 1, err
    assert err.count('note: 2 16-bit image(s): read as 8 bits') == 1, err
    assert err.count('note: 2 gray image(s): restored as RGB') == 1, err
