"""The CSR degradation functions and robust image decoding (mambacsr_arch.data.degradations / image_io)."""
import os

import cv2
import numpy as np
import pytest

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from basicsr.utils import imfrombytes
from basicsr.utils.matlab_functions import imresize
from helpers_images import make_image_folder, photo_bgr
from mambacsr_arch.data.degradations import (bicubic_downsample, check_quality, degrade_csr, jpeg_round_trip,
                                             mod_crop)
from mambacsr_arch.data.image_io import ImageReadError, list_image_files, read_image_bgr8


def independent_csr(gt_u8, scale, quality, method='matlab_bicubic'):
    """The documented pipeline written out directly with cv2 + BasicSR imresize."""
    h, w = gt_u8.shape[:2]
    img = gt_u8[:h - h % scale, :w - w % scale].astype(np.float32) / 255.
    if method == 'matlab_bicubic':
        lr = imresize(img, 1 / scale)
    else:
        lr = cv2.resize(img, (img.shape[1] // scale, img.shape[0] // scale), interpolation=cv2.INTER_CUBIC)
    lr = np.round(np.clip(lr, 0, 1) * 255.).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', lr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


@pytest.mark.parametrize('method', ['matlab_bicubic', 'cv2_bicubic'])
@pytest.mark.parametrize('scale,quality', [(4, 10), (2, 40), (3, 75)])
def test_degrade_csr_matches_independent_pipeline(method, scale, quality):
    gt = photo_bgr('chelsea', (101, 130))
    lq = degrade_csr(mod_crop(gt, scale), scale, quality, method)
    expected = independent_csr(gt, scale, quality, method)
    assert lq.dtype == np.uint8 and lq.shape == (101 // scale, 130 // scale, 3)
    np.testing.assert_array_equal(lq, expected)


def test_quality_and_method_change_the_output():
    gt = mod_crop(photo_bgr('astronaut', (96, 96)), 4)
    q10, q40 = degrade_csr(gt, 4, 10), degrade_csr(gt, 4, 40)
    assert not np.array_equal(q10, q40)
    assert not np.array_equal(bicubic_downsample(gt, 4, 'matlab_bicubic'), bicubic_downsample(gt, 4, 'cv2_bicubic'))
    # a lower quality loses more: further from the uncompressed LR
    lr = bicubic_downsample(gt, 4).astype(np.float64)
    assert np.abs(q10 - lr).mean() > np.abs(q40 - lr).mean()


def test_mod_crop_and_argument_checks():
    img = np.zeros((10, 13, 3), np.uint8)
    assert mod_crop(img, 4).shape == (8, 12, 3)
    with pytest.raises(ValueError, match='multiple of scale'):
        bicubic_downsample(img, 4)
    with pytest.raises(ValueError, match='Unknown downsample'):
        bicubic_downsample(mod_crop(img, 4), 4, 'nearest')
    for bad in (0, 101, 10.5, True, '10'):
        with pytest.raises(ValueError, match=r'\[1, 100\]'):
            check_quality(bad)
    assert jpeg_round_trip(mod_crop(img, 4), 1).shape == (8, 12, 3)


def test_read_matches_basicsr_for_ordinary_images(tmp_path):
    for path in make_image_folder(tmp_path, names=['astronaut', 'coffee'], size=(40, 56), ext='.jpg'):
        with open(path, 'rb') as f:
            content = f.read()
        np.testing.assert_array_equal(read_image_bgr8(path), imfrombytes(content))
        np.testing.assert_array_equal(read_image_bgr8(content), imfrombytes(content))


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = cv2.cvtColor(photo_bgr('camera', (32, 40)), cv2.COLOR_BGR2GRAY)
    path = str(tmp_path / 'gray.png')
    cv2.imwrite(path, gray)
    img = read_image_bgr8(path)
    assert img.shape == (32, 40, 3) and img.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], gray)


def test_16bit_is_scaled_with_rounding(tmp_path):
    rng = np.random.default_rng(0)
    img16 = rng.integers(0, 65536, size=(16, 20, 3), dtype=np.uint16)
    img16[0, :3, 0] = [0, 65535, 128]
    path = str(tmp_path / 'deep.png')
    cv2.imwrite(path, img16)
    img = read_image_bgr8(path)
    expected = np.round(img16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, expected)
    assert list(img[0, :3, 0]) == [0, 255, 0]


def test_alpha_is_dropped(tmp_path):
    bgr = photo_bgr('rocket', (24, 30))
    alpha = np.linspace(0, 255, 24 * 30).reshape(24, 30, 1).astype(np.uint8)
    path = str(tmp_path / 'rgba.png')
    cv2.imwrite(path, np.concatenate([bgr, alpha], axis=2))
    np.testing.assert_array_equal(read_image_bgr8(path), bgr)


def test_bad_files_raise_one_clear_error(tmp_path):
    corrupt = tmp_path / 'corrupt.png'
    corrupt.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 10)
    with pytest.raises(ImageReadError, match='corrupt.png'):
        read_image_bgr8(str(corrupt))
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    with pytest.raises(ImageReadError, match='empty.png.*empty'):
        read_image_bgr8(str(empty))
    ok, jpg = cv2.imencode('.jpg', photo_bgr('coffee', (120, 160)))
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(jpg.tobytes()[:len(jpg) * 2 // 3])
    with pytest.raises(ImageReadError, match='truncated.jpg.*truncated'):
        read_image_bgr8(str(truncated))
    with pytest.raises(ImageReadError, match='missing.png'):
        read_image_bgr8(str(tmp_path / 'missing.png'))
    ok, tif = cv2.imencode('.tiff', np.random.rand(8, 8, 3).astype(np.float32))
    with pytest.raises(ImageReadError, match='float.tif.*float32'):
        read_image_bgr8(tif.tobytes(), name='float.tif')


def test_list_image_files_sorted_and_filtered(tmp_path):
    make_image_folder(tmp_path, names=['coffee', 'astronaut'], size=(8, 8))
    (tmp_path / 'meta_info.txt').write_text('x')
    (tmp_path / '.coffee.png.tmp').write_bytes(b'partial')
    cv2.imwrite(str(tmp_path / 'b.JPG'), np.zeros((8, 8, 3), np.uint8))
    names = [os.path.basename(p) for p in list_image_files(tmp_path)]
    assert names == ['astronaut.png', 'b.JPG', 'coffee.png']
