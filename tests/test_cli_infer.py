"""`basicsr infer`: mixed inputs, tiling, skip/overwrite, config errors, and agreement with `basicsr test`.

Networks are tiny, with seeded random weights saved in BasicSR's checkpoint format
(``{'params': state_dict}``): infer is arch-agnostic, so the tests check the I/O, tiling and
loading, not image quality. HAT (a window arch that pads itself) covers odd sizes; BasicSR's
MSRResNet (bilinear skip, so its output looks like the photo) makes PSNR comparisons meaningful.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

import mambacsr_arch  # noqa: F401  (registers HAT before basicsr is used)
from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr, calculate_ssim
from mambacsr_arch.cli.evaluate import evaluate_folders
from mambacsr_arch.cli.main import main as cli_main

sys.path.insert(0, osp.dirname(__file__))
from helpers_images import photo_bgr  # noqa: E402

BIN = osp.dirname(sys.executable)
HAT_TINY = {'type': 'HAT', 'img_size': 16, 'embed_dim': 12, 'depths': [2], 'num_heads': [2], 'window_size': 8,
            'compress_ratio': 3, 'squeeze_factor': 4, 'mlp_ratio': 2, 'upscale': 4, 'upsampler': 'pixelshuffle'}
MSRRESNET_TINY = {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 4}


def _save_checkpoint(path, network_opt, seed=0, key='params'):
    torch.manual_seed(seed)
    net = build_network(network_opt)
    torch.save({key: net.state_dict()}, path)
    return str(path)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    return {'HAT': _save_checkpoint(root / 'hat.pth', HAT_TINY),
            'MSRResNet': _save_checkpoint(root / 'msrresnet.pth', MSRRESNET_TINY)}


def _arch_args(name, ckpts):
    opt = HAT_TINY if name == 'HAT' else MSRRESNET_TINY
    kwargs = [f'{k}={v}' for k, v in opt.items() if k != 'type']
    return ['--arch', name, '--weights', ckpts[name], '--device', 'cpu', '--no-progress', '--arch-opt'] + kwargs


def _infer(args):
    return cli_main(['infer'] + [str(a) for a in args])


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def test_mixed_folder_sizes_layouts_and_one_corrupt_file(tmp_path, ckpts, capsys):
    src = tmp_path / 'lq'
    src.mkdir()
    rgb = photo_bgr('astronaut', (17, 23))
    cv2.imwrite(str(src / 'rgb.png'), rgb)
    cv2.imwrite(str(src / 'gray.png'), cv2.cvtColor(photo_bgr('camera', (20, 16)), cv2.COLOR_BGR2GRAY))
    rgba = np.dstack([photo_bgr('chelsea', (9, 31)), np.full((9, 31), 128, np.uint8)])
    cv2.imwrite(str(src / 'rgba.png'), rgba)
    cv2.imwrite(str(src / 'deep.png'), rgb.astype(np.uint16) * 257)  # 16-bit, same content as rgb.png
    cv2.imwrite(str(src / 'photo.jpg'), photo_bgr('coffee', (24, 24)), [cv2.IMWRITE_JPEG_QUALITY, 40])
    (src / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    (src / 'notes.txt').write_text('not an image: ignored')
    out = tmp_path / 'out'

    code = _infer(['-i', src, '-o', out, '--suffix', '_x4'] + _arch_args('HAT', ckpts))

    assert code == 1  # one image failed, the others were written
    captured = capsys.readouterr()
    assert 'broken.png' in captured.err and '1 failed' in captured.out and '5 written' in captured.out
    expected = {'rgb_x4.png': (68, 92), 'gray_x4.png': (80, 64), 'rgba_x4.png': (36, 124),
                'deep_x4.png': (68, 92), 'photo_x4.png': (96, 96)}
    # no temp files, nothing for the corrupt file; the manifest of what infer wrote (see infer's module doc)
    assert sorted(os.listdir(out)) == sorted(list(expected) + ['.basicsr-infer.json'])
    for name, size in expected.items():
        img = _read(out / name)
        assert img.dtype == np.uint8 and img.shape == size + (3,), (name, img.shape)
    # 16-bit input scaled to 8 bits exactly as the dataset does: same result as the 8-bit twin
    np.testing.assert_array_equal(_read(out / 'deep_x4.png'), _read(out / 'rgb_x4.png'))


def test_single_file_input_and_exit_code_zero(tmp_path, ckpts):
    path = tmp_path / 'one.png'
    cv2.imwrite(str(path), photo_bgr('rocket', (13, 11)))
    code = _infer(['-i', path, '-o', tmp_path / 'out', '--ext', 'jpg'] + _arch_args('MSRResNet', ckpts))
    assert code == 0
    assert _read(tmp_path / 'out' / 'one.jpg').shape == (52, 44, 3)


@pytest.mark.parametrize('arch', ['HAT', 'MSRResNet'])
def test_tiled_and_whole_image_agree_on_a_photo(tmp_path, ckpts, arch):
    gt = photo_bgr('astronaut', (192, 192))
    lq = cv2.resize(gt, (48, 48), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(tmp_path / 'photo.png'), lq)
    common = ['-i', tmp_path / 'photo.png'] + _arch_args(arch, ckpts)
    assert _infer(common + ['-o', tmp_path / 'whole', '--tile', '0']) == 0
    assert _infer(common + ['-o', tmp_path / 'tiled', '--tile', '24', '--tile-overlap', '8']) == 0
    whole, tiled = _read(tmp_path / 'whole' / 'photo.png'), _read(tmp_path / 'tiled' / 'photo.png')
    psnr_whole = calculate_psnr(whole, gt, crop_border=4, test_y_channel=True)
    psnr_tiled = calculate_psnr(tiled, gt, crop_border=4, test_y_channel=True)
    assert abs(psnr_whole - psnr_tiled) < 0.05, (psnr_whole, psnr_tiled)
    # and the tiled image itself is close to the whole-image result (seams would show here)
    assert calculate_psnr(tiled, whole, crop_border=0) > 45


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, ckpts, capsys):
    src = tmp_path / 'lq'
    src.mkdir()
    for name in ('a', 'b'):
        cv2.imwrite(str(src / f'{name}.png'), photo_bgr('chelsea' if name == 'a' else 'coffee', (12, 16)))
    out = tmp_path / 'out'
    args = ['-i', src, '-o', out] + _arch_args('MSRResNet', ckpts)
    assert _infer(args) == 0
    first = _read(out / 'a.png')
    sentinel = np.zeros_like(first)
    cv2.imwrite(str(out / 'a.png'), sentinel)
    os.remove(out / 'b.png')
    capsys.readouterr()

    assert _infer(args) == 0
    summary = capsys.readouterr().out
    assert '1 written' in summary and '1 skipped' in summary, summary
    np.testing.assert_array_equal(_read(out / 'a.png'), sentinel)  # kept
    assert (out / 'b.png').is_file()  # redone

    assert _infer(args + ['--overwrite']) == 0
    assert '2 written' in capsys.readouterr().out
    np.testing.assert_array_equal(_read(out / 'a.png'), first)


def test_inputs_are_never_overwritten(tmp_path, ckpts, capsys):
    src = tmp_path / 'lq'
    src.mkdir()
    cv2.imwrite(str(src / 'a.png'), photo_bgr('chelsea', (8, 8)))
    before = (src / 'a.png').read_bytes()
    assert _infer(['-i', src, '-o', src, '--overwrite'] + _arch_args('MSRResNet', ckpts)) == 2  # refused, unrun
    assert 'is this input itself' in capsys.readouterr().err
    assert (src / 'a.png').read_bytes() == before
    assert _infer(['-i', src, '-o', src, '--suffix', '_x4'] + _arch_args('MSRResNet', ckpts)) == 0
    assert _read(src / 'a_x4.png').shape == (32, 32, 3)


def test_configuration_errors_exit_2_with_a_fix(tmp_path, ckpts, capsys):
    img = tmp_path / 'x.png'
    cv2.imwrite(str(img), photo_bgr('rocket', (8, 8)))
    base = ['-i', img, '-o', tmp_path / 'out']
    assert _infer(base + ['--arch', 'MSRResNet', '--no-progress']) == 2
    assert '--weights' in capsys.readouterr().err
    assert _infer(base + ['--arch', 'NoSuchNet', '--weights', ckpts['HAT'], '--scale', '4']) == 2
    assert "unknown arch 'NoSuchNet'" in capsys.readouterr().err
    wrong = _arch_args('HAT', ckpts)
    wrong[wrong.index('--weights') + 1] = ckpts['MSRResNet']
    assert _infer(base + wrong) == 2
    err = capsys.readouterr().err
    assert 'error:' in err and 'msrresnet.pth' in err and 'Traceback' not in err, err
    assert not (tmp_path / 'out').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message shown when CUDA is missing')
def test_cuda_request_without_cuda_is_one_clear_error(tmp_path, ckpts, capsys):
    img = tmp_path / 'x.png'
    cv2.imwrite(str(img), photo_bgr('rocket', (8, 8)))
    args = _arch_args('MSRResNet', ckpts)
    args[args.index('--device') + 1] = 'cuda'
    assert _infer(['-i', img, '-o', tmp_path / 'out'] + args) == 2
    err = capsys.readouterr().err
    assert 'CUDA is not available' in err and '--device cpu' in err and 'Traceback' not in err


def _write_pairs(root, names=('astronaut', 'chelsea', 'coffee'), gt_size=(64, 88), scale=4):
    for sub in ('gt', 'lq'):
        os.makedirs(osp.join(root, sub), exist_ok=True)
    for name in names:
        gt = photo_bgr(name, gt_size)
        lq = cv2.resize(gt, (gt_size[1] // scale, gt_size[0] // scale), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(osp.join(root, 'gt', f'{name}.png'), gt)
        cv2.imwrite(osp.join(root, 'lq', f'{name}.png'), lq)


@pytest.mark.slow
def test_infer_then_eval_matches_basicsr_test(tmp_path, ckpts):
    """Round trip: `basicsr test -opt X` == `basicsr infer --opt X` + `basicsr eval`'s scoring == basicsr.metrics.

    HATModel with tiles (LR 16x22, 12 px tiles) so infer must read the same `val` settings as the model.
    """
    _write_pairs(str(tmp_path / 'data'))
    metric = {'crop_border': 4, 'test_y_channel': True}
    opt = {
        'name': 'roundtrip', 'model_type': 'HATModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'test_1': {'name': 'pairs', 'type': 'PairedImageDataset', 'dataroot_gt': 'data/gt',
                                'dataroot_lq': 'data/lq', 'io_backend': {'type': 'disk'}}},
        'network_g': dict(HAT_TINY),
        'path': {'pretrain_network_g': ckpts['HAT'], 'param_key_g': 'params', 'strict_load_g': True},
        'val': {'save_img': True, 'suffix': None, 'tile': {'size': 12, 'overlap': 4},
                'metrics': {'psnr': dict(type='calculate_psnr', **metric)}},
    }
    yml = tmp_path / 'test.yml'
    yml.write_text(yaml.safe_dump(opt))
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([osp.join(BIN, 'basicsr'), 'test', '-opt', str(yml)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    log_dir = tmp_path / 'results' / 'roundtrip'
    logs = [f for f in os.listdir(log_dir) if f.startswith('test_') and f.endswith('.log')]
    match = re.search(r'# psnr: ([0-9.]+)', (log_dir / logs[0]).read_text())
    assert match, logs
    psnr_test = float(match.group(1))

    assert _infer(['-i', tmp_path / 'data' / 'lq', '-o', tmp_path / 'sr', '--opt', yml, '--device', 'cpu',
                   '--no-progress']) == 0
    result = evaluate_folders(str(tmp_path / 'sr'), str(tmp_path / 'data' / 'gt'), **metric)
    assert result.count == 3 and not result.failures
    assert abs(result.mean_psnr - psnr_test) < 2e-4, (result.mean_psnr, psnr_test)
    for record in result.records:  # eval's numbers are basicsr.metrics' numbers
        restored, gt = _read(record.restored), _read(record.gt)
        assert record.psnr == pytest.approx(calculate_psnr(restored, gt, **metric), abs=1e-9)
        assert record.ssim == pytest.approx(calculate_ssim(restored, gt, **metric), abs=1e-9)
        # and the pixels are the ones `basicsr test` saved (same tiles, padding, rounding)
        saved = _read(log_dir / 'visualization' / 'pairs' / f'{record.name}_roundtrip.png')
        assert np.abs(saved.astype(int) - restored.astype(int)).max() <= 1, record.name


def test_output_conversion_equals_basicsr_tensor2img():
    from basicsr.utils import tensor2img

    from mambacsr_arch.cli.infer import tensor_to_bgr8

    torch.manual_seed(0)
    out = torch.rand(1, 3, 7, 9) * 1.4 - 0.2  # out-of-range values are clamped
    out[0, 0, 0, :5] = torch.tensor([0.5, 1.5, 2.5, 253.5, 254.5]) / 255  # rounding ties
    expected = tensor2img(out.clone(), rgb2bgr=True, min_max=(0, 1))
    result = tensor_to_bgr8(out.clone())
    assert result.dtype == np.uint8 and result.shape == (7, 9, 3) and result.flags['C_CONTIGUOUS']
    np.testing.assert_array_equal(result, expected)
