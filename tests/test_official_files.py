"""The authors' own option files, run unchanged on their folder layouts (issue 11 acceptance).

tests/data/official/ holds hand-typed replicas of renyulin-f/MambaCSR's test and train option files
and XPixelGroup/HAT's test files (every key and quirk of the originals; first line names the source
commit). Each test builds the folder layout the file expects (relative paths, so the commands run
in that folder and no path is overridden) from scikit-image photos, writes a "released checkpoint"
of a tiny network where the file looks for one, and runs ``basicsr test|train|infer`` in a
subprocess. Only ``num_gpu`` and sizes change, through BasicSR's own ``--force_yml``.

The results are checked against implementations written here, from a reading of the official code,
independent of mambacsr_arch.models.inference:

* MambaCSR: ``MambaCSRModel.test`` of renyulin-f/MambaCSR (chops of about 192 LR px overlapping by a
  quarter, each mirror-padded to the next multiple of ``padding_size`` beyond its size, centres
  pasted); PSNR/SSIM by BasicSR's metric functions with the file's metric options, to 1e-3 dB.
* HAT: ``HATModel.pre_process`` + ``tile_process`` (hard-cropped tiles with ``tile_pad`` context) +
  ``post_process``; saved images within 1/255 per pixel.

Each image comparison is shown to be able to fail: the reference is also computed the plain way
(whole image, no chop / no tiles) and must differ visibly from what is checked. (The PSNR checks
pin the metric pipeline and the pairing; with random weights a protocol change moves PSNR by only
~1e-3 dB, so the images carry the protocol check.)
"""
from __future__ import annotations

import glob
import math
import os
import os.path as osp
import re
import subprocess
import sys
from typing import Dict, List, Optional

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import mambacsr_arch  # noqa: F401  (registers MambaCSR / HAT for build_network)
from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img
from basicsr.utils.options import ordered_yaml

from official_layouts import (MAMBACSR_TESTSETS, build_hat_testsets, build_mambacsr_testsets, build_mambacsr_train_set,
                              read_rgb_tensor)

pytestmark = [pytest.mark.official, pytest.mark.slow]

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
OFFICIAL = osp.join(REPO, 'tests', 'data', 'official')
BASICSR = osp.join(osp.dirname(sys.executable), 'basicsr')
TIMEOUT = 300
SCALE = 4

MAMBACSR_TINY = {'embed_dim': 24, 'd_state': 4, 'depths': [1], 'depths2': [1]}
HAT_TINY = {'embed_dim': 12, 'depths': [2], 'num_heads': [2], 'squeeze_factor': 4}
HAT_S_TINY = dict(HAT_TINY, embed_dim=24, depths=[1])  # HAT-S keeps compress_ratio 24: 24 // 24 = 1 channel
# HAT scales its channel-attention branch by conv_scale (0.01); at random init that branch is too weak for
# its image-wide pooling to show, and every other path of a 1-group HAT sees less than tile_pad (32 px), so
# tiled and whole-image outputs would agree and the tile check could not fail. The "released" weights
# therefore carry a strong channel-attention branch.
HAT_CAB_GAIN = 300.0


# ----------------------------------------------------------------------------- running the CLI


def run_cli(args: List[str], cwd: str) -> subprocess.CompletedProcess:
    # one thread and PASSIVE waits: 2 shared cores; the in-process references below use one thread too
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + osp.join(REPO, 'tests'), OMP_NUM_THREADS='1',
               NUMBA_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([BASICSR] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(f'`basicsr {" ".join(args)}` in {cwd} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}')
    return proc


def force_yml(network: Dict, *extra: str) -> List[str]:
    """BasicSR's ``--force_yml`` entries: CPU, the tiny network, then ``extra`` (``a:b=value``)."""
    entries = ['num_gpu=0'] + [f'network_g:{key}={value}' for key, value in network.items()]
    return ['--force_yml'] + entries + list(extra)


def validation_metrics(log_dir: str) -> Dict[str, List[Dict[str, float]]]:
    """{dataset name: [{metric: value}, ...] in log order} from the BasicSR log(s) in ``log_dir``."""
    logs = sorted(glob.glob(osp.join(log_dir, '*.log')))
    assert logs, f'no BasicSR log in {log_dir}'
    found: Dict[str, List[Dict[str, float]]] = {}
    current: Optional[Dict[str, float]] = None
    for line in open(logs[-1], encoding='utf-8').read().splitlines():
        head = re.search(r'Validation (\S+)\s*$', line)
        value = re.match(r'\s*# (\w+): ([-0-9.]+)', line)
        if head:
            current = {}
            found.setdefault(head.group(1), []).append(current)
        elif value and current is not None:
            current[value.group(1)] = float(value.group(2))
        else:
            current = None
    return found


# ----------------------------------------------------------------------------- networks and weights


def load_replica(name: str) -> Dict:
    with open(osp.join(OFFICIAL, name), encoding='utf-8') as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def tiny_network(opt: Dict, overrides: Dict) -> torch.nn.Module:
    return build_network(dict(opt['network_g'], **overrides)).eval()


def write_release(path: str, opt: Dict, overrides: Dict, tweak=None) -> Dict[str, torch.Tensor]:
    """Save {'params': A, 'params_ema': B} of two different random tiny networks at ``path``; return B,
    the weights the official files load (param_key_g: params_ema)."""
    nets = {}
    for seed, key in ((1, 'params'), (2, 'params_ema')):
        torch.manual_seed(seed)
        net = tiny_network(opt, overrides)
        if tweak is not None:
            tweak(net)
        nets[key] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    os.makedirs(osp.dirname(path), exist_ok=True)
    torch.save(nets, path)
    return nets['params_ema']


def net_with(opt: Dict, overrides: Dict, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    net = tiny_network(opt, overrides)
    net.load_state_dict(state, strict=True)
    return net


# ----------------------------------------------------------------------------- independent references


def official_mambacsr_test(net, lq: torch.Tensor, scale: int, padding_size: int) -> torch.Tensor:
    """renyulin-f/MambaCSR ``MambaCSRModel.test``, re-derived: (1, 3, h, w) -> (1, 3, h*scale, w*scale)."""
    _, channels, h, w = lq.shape
    parts_h, parts_w = h // 192 + 1, w // 192 + 1
    extra_h = 0 if h % parts_h == 0 else parts_h - h % parts_h
    extra_w = 0 if w % parts_w == 0 else parts_w - w % parts_w
    img = F.pad(lq, (0, extra_w, 0, extra_h), mode='reflect')
    big_h, big_w = img.shape[-2:]
    step_h, step_w = big_h // parts_h, big_w // parts_w
    shave_h, shave_w = step_h // 4, step_w // 4

    def span(index, parts, step, shave):  # chop range in the padded image, and the kept range inside the chop
        start = index * step - (shave if index > 0 else 0)
        stop = (index + 1) * step + (shave if index < parts - 1 else 0)
        keep = shave if index > 0 else 0
        return start, stop, keep

    out = torch.zeros(1, channels, big_h * scale, big_w * scale)
    for i in range(parts_h):
        y0, y1, keep_y = span(i, parts_h, step_h, shave_h)
        for j in range(parts_w):
            x0, x1, keep_x = span(j, parts_w, step_w, shave_w)
            chop = img[..., y0:y1, x0:x1]
            ch, cw = chop.shape[-2:]
            # one mirrored copy appended, then cut to the next multiple beyond the size (official quirk:
            # a full extra padding_size when the size is already a multiple)
            chop = torch.cat([chop, torch.flip(chop, [2])], 2)[:, :, :(ch // padding_size + 1) * padding_size]
            chop = torch.cat([chop, torch.flip(chop, [3])], 3)[:, :, :, :(cw // padding_size + 1) * padding_size]
            res = net(chop)[..., :ch * scale, :cw * scale]
            out[..., i * step_h * scale:(i + 1) * step_h * scale, j * step_w * scale:(j + 1) * step_w * scale] = \
                res[..., keep_y * scale:(keep_y + step_h) * scale, keep_x * scale:(keep_x + step_w) * scale]
    return out[..., :h * scale, :w * scale]


def official_hat_test(net, lq: torch.Tensor, scale: int, window_size: int, tile: Optional[Dict]) -> torch.Tensor:
    """XPixelGroup/HAT ``HATModel`` pre_process + (tile_process | process) + post_process, re-derived."""
    h, w = lq.shape[-2:]
    img = F.pad(lq, (0, (window_size - w % window_size) % window_size,
                     0, (window_size - h % window_size) % window_size), mode='reflect')
    if not tile:
        out = net(img)
    else:
        size, pad = tile['tile_size'], tile['tile_pad']
        big_h, big_w = img.shape[-2:]
        out = img.new_zeros(1, img.shape[1], big_h * scale, big_w * scale)
        for ty in range(math.ceil(big_h / size)):
            for tx in range(math.ceil(big_w / size)):
                y0, x0 = ty * size, tx * size
                y1, x1 = min(y0 + size, big_h), min(x0 + size, big_w)
                cy0, cx0 = max(y0 - pad, 0), max(x0 - pad, 0)  # context cropped at the image border
                cy1, cx1 = min(y1 + pad, big_h), min(x1 + pad, big_w)
                res = net(img[..., cy0:cy1, cx0:cx1])
                out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                    res[..., (y0 - cy0) * scale:(y1 - cy0) * scale, (x0 - cx0) * scale:(x1 - cx0) * scale]
    return out[..., :h * scale, :w * scale]


class one_thread:
    """torch.set_num_threads(1) inside the block (as the CLI subprocesses run), restored after."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def metrics_of(sr: np.ndarray, gt_path: str, metric_opts: Dict) -> Dict[str, float]:
    """The file's val.metrics on uint8 BGR ``sr`` vs the GT (cropped to sr's size as PairedImageDataset does)."""
    gt = cv2.imread(gt_path, cv2.IMREAD_COLOR)[:sr.shape[0], :sr.shape[1]]
    functions = {'calculate_psnr': calculate_psnr, 'calculate_ssim': calculate_ssim}
    result = {}
    for name, metric in metric_opts.items():
        kwargs = {k: v for k, v in metric.items() if k != 'type'}
        result[name] = float(functions[metric['type']](sr, gt, **kwargs))
    return result


def mean_metrics(per_image: List[Dict[str, float]]) -> Dict[str, float]:
    return {key: float(np.mean([m[key] for m in per_image])) for key in per_image[0]}


def read_saved(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert img is not None, f'expected an output image at {path}'
    return img


# ----------------------------------------------------------------------------- MambaCSR test files


@pytest.mark.parametrize('replica, checkpoint', [
    ('mambacsr/test_MambaCSR_Q10_Final.yml', 'Pretrained_weights/Cross-scale-QF10-x4.pth'),
    ('mambacsr/test_MambaCSR_Q10_wo.yml', 'Pretrained_weights/Dual-Interleaved-QF10-x4.pth'),
])
def test_mambacsr_official_test_file(tmp_path, replica, checkpoint):
    root = str(tmp_path)
    opt = load_replica(replica)
    assert opt['path']['pretrain_network_g'] == checkpoint
    pairs = build_mambacsr_testsets(root)
    ema = write_release(osp.join(root, checkpoint), opt, MAMBACSR_TINY)

    run_cli(['test', '-opt', osp.join(OFFICIAL, replica)] + force_yml(MAMBACSR_TINY), cwd=root)

    logged = validation_metrics(osp.join(root, 'results', opt['name']))
    net = net_with(opt, MAMBACSR_TINY, ema)
    names = {osp.basename(ds['dataroot_gt'].rstrip('/').rsplit('/', 1)[0]): ds['name']
             for ds in opt['datasets'].values()}
    assert sorted(logged) == sorted(names.values()), logged
    with torch.no_grad(), one_thread():
        for folder, images in pairs.items():
            per_image = []
            for gt_path, lq_path in images:
                lq = read_rgb_tensor(lq_path)
                sr = tensor2img([official_mambacsr_test(net, lq, SCALE, opt['padding_size'])])
                per_image.append(metrics_of(sr, gt_path, opt['val']['metrics']))
                stem = osp.splitext(osp.basename(lq_path))[0]
                saved = read_saved(osp.join(root, 'results', opt['name'], 'visualization', names[folder],
                                            f'{stem}_{opt["name"]}.png'))
                assert saved.shape == sr.shape and np.abs(saved.astype(int) - sr).max() <= 1, (folder, stem)
                if folder == 'DIV2K':  # 2x2 chops: a whole-image forward must give a visibly different image
                    assert np.abs(tensor2img([net(lq)]).astype(int) - sr).max() > 8, 'the chop check could not fail'
            expected, got = mean_metrics(per_image), logged[names[folder]][-1]
            for metric in ('psnr', 'ssim'):  # the log prints 4 decimals
                tol = 1e-3 if metric == 'psnr' else 1e-4
                assert got[metric] == pytest.approx(expected[metric], abs=tol), (folder, metric, got, expected)


# ----------------------------------------------------------------------------- MambaCSR train file


def test_mambacsr_official_train_file(tmp_path):
    root = str(tmp_path)
    replica = 'mambacsr/MambaCSR_Q10_Final.yaml'
    opt = load_replica(replica)
    assert opt['datasets']['train']['dataroot_gt'] == ['CSR_dataset/DF2K_HR_sub']  # list form kept
    build_mambacsr_train_set(root)
    pairs = build_mambacsr_testsets(root, [s for s in MAMBACSR_TESTSETS if s[0] == 'Manga109'])['Manga109']

    run_cli(['train', '-opt', osp.join(OFFICIAL, replica)] + force_yml(
        MAMBACSR_TINY, 'datasets:train:gt_size=32', 'datasets:train:num_worker_per_gpu=0', 'train:total_iter=2'),
        cwd=root)

    exp = osp.join(root, 'experiments', opt['name'])
    ckpt = torch.load(osp.join(exp, 'models', 'net_g_latest.pth'), map_location='cpu', weights_only=True)
    assert set(ckpt) == {'params', 'params_ema'}
    logged = validation_metrics(exp)
    assert list(logged) == ['Manga109'], logged
    net = net_with(opt, MAMBACSR_TINY, ckpt['params_ema'])  # BasicSR validates with the EMA network
    with torch.no_grad(), one_thread():
        per_image = [metrics_of(tensor2img([official_mambacsr_test(net, read_rgb_tensor(lq), SCALE,
                                                                   opt['padding_size'])]), gt, opt['val']['metrics'])
                     for gt, lq in pairs]
    assert logged['Manga109'][-1]['psnr'] == pytest.approx(mean_metrics(per_image)['psnr'], abs=1e-3)


# ----------------------------------------------------------------------------- HAT test files

HAT_TILE_SETS = (
    ('Set5', (('baby', 'astronaut', (128, 1056)), ('bird', 'chelsea', (1056, 144)))),  # 2 tiles across / down
    ('urban100', (('img_001', 'rocket', (160, 280)),)),  # one tile, sides not multiples of the window
)
HAT_S_SETS = tuple((folder, ((stem, photo, (84, 100)),)) for folder, stem, photo in (
    ('Set5', 'baby', 'astronaut'), ('Set14', 'coffee', 'coffee'), ('urban100', 'img_001', 'rocket'),
    ('BSDS100', '3096', 'camera'), ('manga109', 'AisazuNihaIrarenai', 'chelsea')))


def strong_channel_attention(net: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in net.named_parameters():
            if '.conv_block.cab.2.' in name:
                param.mul_(HAT_CAB_GAIN)


def hat_reference_images(opt: Dict, tiny: Dict, pairs: Dict, ema: Dict, tile: Optional[Dict]):
    """{(folder, stem): (reference uint8 BGR, whole-image uint8 BGR)}."""
    net = net_with(opt, tiny, ema)
    window = opt['network_g']['window_size']
    refs = {}
    with torch.no_grad(), one_thread():
        for folder, images in pairs.items():
            for _, lq_path in images:
                lq = read_rgb_tensor(lq_path)
                ref = tensor2img([official_hat_test(net, lq, SCALE, window, tile)])
                whole = tensor2img([official_hat_test(net, lq, SCALE, window, None)]) if tile else ref
                refs[folder, osp.splitext(osp.basename(lq_path))[0]] = (ref, whole)
    return refs


def test_hat_official_tile_file_test_and_infer(tmp_path):
    root = str(tmp_path)
    replica = 'hat/HAT_tile_example.yml'
    opt = load_replica(replica)
    assert opt['tile'] == {'tile_size': 256, 'tile_pad': 32}  # unchanged: the LR images are wider than a tile
    pairs = build_hat_testsets(root, HAT_TILE_SETS)
    ema = write_release(osp.join(root, opt['path']['pretrain_network_g']), opt, HAT_TINY, strong_channel_attention)

    run_cli(['test', '-opt', osp.join(OFFICIAL, replica)] + force_yml(HAT_TINY), cwd=root)
    # basicsr infer on the tiled set (one run: each costs a process start), same option file, no --tile flags
    infer_out = osp.join(root, 'infer_Set5')
    run_cli(['infer', '-i', osp.join('datasets', 'Set5', 'LRbicx4'), '-o', infer_out, '--opt',
             osp.join(OFFICIAL, replica), '--device', 'cpu', '--no-progress', '--arch-opt']
            + [f'{key}={value}' for key, value in HAT_TINY.items()], cwd=root)

    refs = hat_reference_images(opt, HAT_TINY, pairs, ema, opt['tile'])
    tiled_differs = False
    names = {'Set5': 'Set5', 'urban100': 'Urban100'}
    for (folder, stem), (ref, whole) in refs.items():
        tested = read_saved(osp.join(root, 'results', opt['name'], 'visualization', names[folder],
                                     f'{stem}_{opt["name"]}.png'))
        assert tested.shape == ref.shape and np.abs(tested.astype(int) - ref).max() <= 1, (folder, stem)
        if folder == 'Set5':
            inferred = read_saved(osp.join(infer_out, stem + '.png'))
            assert inferred.shape == ref.shape and np.abs(inferred.astype(int) - tested).max() <= 1, stem
        tiled_differs |= bool(np.abs(whole.astype(int) - ref).max() > 1)
    assert tiled_differs, 'tiled and whole-image references agree: the tile check could not fail'
    logged = validation_metrics(osp.join(root, 'results', opt['name']))
    assert sorted(logged) == ['Set5', 'Urban100'], logged  # test_2, test_4, test_5 are commented out
    for folder, images in pairs.items():
        expected = mean_metrics([metrics_of(refs[folder, osp.splitext(osp.basename(lq))[0]][0], gt,
                                            opt['val']['metrics']) for gt, lq in images])
        assert logged[names[folder]][-1]['psnr'] == pytest.approx(expected['psnr'], abs=1e-3), folder


def test_hat_official_test_file_five_sets(tmp_path):
    root = str(tmp_path)
    replica = 'hat/HAT-S_SRx4.yml'
    opt = load_replica(replica)
    assert 'tile' not in opt
    pairs = build_hat_testsets(root, HAT_S_SETS)
    ema = write_release(osp.join(root, opt['path']['pretrain_network_g']), opt, HAT_S_TINY)

    run_cli(['test', '-opt', osp.join(OFFICIAL, replica)] + force_yml(HAT_S_TINY), cwd=root)

    logged = validation_metrics(osp.join(root, 'results', opt['name']))
    names = {osp.basename(osp.dirname(ds['dataroot_gt'])): ds['name'] for ds in opt['datasets'].values()}
    assert sorted(logged) == sorted(names.values()), logged
    refs = hat_reference_images(opt, HAT_S_TINY, pairs, ema, None)
    for (folder, stem), (ref, _) in refs.items():
        tested = read_saved(osp.join(root, 'results', opt['name'], 'visualization', names[folder],
                                     f'{stem}_{opt["name"]}.png'))
        assert tested.shape == ref.shape and np.abs(tested.astype(int) - ref).max() <= 1, (folder, stem)
        expected = metrics_of(ref, pairs[folder][0][0], opt['val']['metrics'])
        assert logged[names[folder]][-1]['psnr'] == pytest.approx(expected['psnr'], abs=1e-3), folder
