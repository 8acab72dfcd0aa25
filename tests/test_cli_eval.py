"""``basicsr eval``: scores equal BasicSR's metric functions; pairing and size errors; CSV/JSON."""
import csv
import json
import math

import mambacsr_arch  # noqa: F401  (shims before basicsr)
import cv2
import numpy as np
import pytest
from basicsr.metrics import calculate_psnr, calculate_ssim
from skimage import data as skdata

from mambacsr_arch.cli import main as cli_main
from mambacsr_arch.cli.evaluate import EvalError, evaluate_folders, pair_files

PHOTOS = {'astronaut': skdata.astronaut, 'coffee': skdata.coffee, 'chelsea': skdata.chelsea}


def _degrade(bgr: np.ndarray, seed: int) -> np.ndarray:
    """A plausible restoration: blurred, noisy, JPEG round trip."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(bgr, (5, 5), 1.0).astype(np.float64) + rng.normal(0, 3, bgr.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 40])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """GT as PNG, restored as '<name>_x4.png'; returns (restored_dir, gt_dir, {name: (restored, gt)})."""
    root = tmp_path_factory.mktemp('eval')
    gt_dir, sr_dir = root / 'gt', root / 'sr'
    gt_dir.mkdir()
    sr_dir.mkdir()
    arrays = {}
    for seed, (name, load) in enumerate(PHOTOS.items()):
        gt = cv2.cvtColor(load(), cv2.COLOR_RGB2BGR)[40:136, 60:188]  # 96x128 crop keeps it fast
        sr = _degrade(gt, seed)
        cv2.imwrite(str(gt_dir / f'{name}.png'), gt)
        cv2.imwrite(str(sr_dir / f'{name}_x4.png'), sr)
        arrays[name] = (sr, gt)
    return sr_dir, gt_dir, arrays


@pytest.mark.parametrize('crop_border,y', [(0, False), (4, True), (7, False)])
def test_scores_equal_basicsr_metrics(folders, crop_border, y):
    sr_dir, gt_dir, arrays = folders
    result = evaluate_folders(str(sr_dir), str(gt_dir), suffix='_x4', crop_border=crop_border, test_y_channel=y)
    assert [r.name for r in result.records] == sorted(PHOTOS)
    for record in result.records:
        sr, gt = arrays[record.name]
        assert record.psnr == calculate_psnr(sr, gt, crop_border, test_y_channel=y)
        assert record.ssim == calculate_ssim(sr, gt, crop_border, test_y_channel=y)
    assert result.mean_psnr == pytest.approx(np.mean([r.psnr for r in result.records]), abs=1e-12)
    assert result.mean_ssim == pytest.approx(np.mean([r.ssim for r in result.records]), abs=1e-12)


def test_y_and_crop_border_change_the_scores(folders):
    sr_dir, gt_dir, _ = folders
    base = evaluate_folders(str(sr_dir), str(gt_dir), suffix='_x4')
    y = evaluate_folders(str(sr_dir), str(gt_dir), suffix='_x4', test_y_channel=True)
    cropped = evaluate_folders(str(sr_dir), str(gt_dir), suffix='_x4', crop_border=4)
    assert base.mean_psnr != y.mean_psnr
    assert base.mean_psnr != cropped.mean_psnr


def test_cli_writes_table_csv_json(folders, tmp_path, capsys):
    sr_dir, gt_dir, arrays = folders
    csv_path, json_path = tmp_path / 'out' / 'scores.csv', tmp_path / 'scores.json'
    code = cli_main.main(['eval', '--restored', str(sr_dir), '--gt', str(gt_dir), '--suffix', '_x4',
                          '--crop-border', '4', '--y', '--csv', str(csv_path), '--json', str(json_path)])
    assert code == 0
    table = capsys.readouterr().out
    assert 'on Y, crop_border=4' in table and 'mean (3)' in table
    expected = {name: calculate_psnr(sr, gt, 4, test_y_channel=True) for name, (sr, gt) in arrays.items()}
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert [row['name'] for row in rows] == sorted(PHOTOS) + ['mean']
    for row in rows[:-1]:
        assert float(row['psnr']) == expected[row['name']]
    assert float(rows[-1]['psnr']) == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
    payload = json.loads(json_path.read_text())
    assert payload['crop_border'] == 4 and payload['test_y_channel'] is True and payload['suffix'] == '_x4'
    assert {item['name']: item['psnr'] for item in payload['images']} == expected
    assert payload['mean']['count'] == 3 and payload['failures'] == []


def test_identical_images_give_inf_psnr_in_json(folders, tmp_path):
    _, gt_dir, _ = folders
    json_path = tmp_path / 's.json'
    code = cli_main.main(['eval', '--restored', str(gt_dir), '--gt', str(gt_dir), '--json', str(json_path)])
    assert code == 0
    payload = json.loads(json_path.read_text())
    assert payload['mean']['psnr'] == 'inf'
    assert payload['mean']['ssim'] == pytest.approx(1.0)


def test_unpaired_files_listed(folders, tmp_path, capsys):
    sr_dir, gt_dir, arrays = folders
    partial = tmp_path / 'sr'
    partial.mkdir()
    cv2.imwrite(str(partial / 'coffee_x4.png'), arrays['coffee'][0])
    cv2.imwrite(str(partial / 'stray_x4.png'), arrays['coffee'][0])
    with pytest.raises(EvalError) as err:
        pair_files(str(partial), str(gt_dir), '_x4')
    message = str(err.value)
    assert '\n' not in message
    assert 'stray_x4.png' in message and 'astronaut.png' in message and 'chelsea.png' in message
    assert 'coffee' not in message
    code = cli_main.main(['eval', '--restored', str(sr_dir), '--gt', str(gt_dir)])  # forgot --suffix
    assert code == 2
    assert 'unpaired files' in capsys.readouterr().err


def test_size_mismatch_names_both_files(folders, tmp_path, capsys):
    _, gt_dir, arrays = folders
    sr_dir = tmp_path / 'sr'
    sr_dir.mkdir()
    for name, (sr, _) in arrays.items():
        cv2.imwrite(str(sr_dir / f'{name}_x4.png'), sr[:-1] if name == 'chelsea' else sr)
    with pytest.raises(EvalError, match=r'size mismatch: .*chelsea_x4\.png is 128x95 .* .*chelsea\.png is 128x96'):
        evaluate_folders(str(sr_dir), str(gt_dir), suffix='_x4')
    code = cli_main.main(['eval', '--restored', str(sr_dir), '--gt', str(gt_dir), '--suffix', '_x4'])
    captured = capsys.readouterr()
    assert code == 1
    assert 'chelsea_x4.png' in captured.err and 'mean (2)' in captured.out


def test_unreadable_file_reported(folders, tmp_path):
    _, gt_dir, arrays = folders
    sr_dir = tmp_path / 'sr'
    sr_dir.mkdir()
    for name, (sr, _) in arrays.items():
        cv2.imwrite(str(sr_dir / f'{name}_x4.png'), sr)
    (sr_dir / 'coffee_x4.png').write_bytes(b'not an image')
    result = evaluate_folders(str(sr_dir), str(gt_dir), suffix='_x4', strict=False)
    assert [r.name for r in result.records] == ['astronaut', 'chelsea']
    assert len(result.failures) == 1 and 'coffee_x4.png' in result.failures[0]
    assert not math.isnan(result.mean_psnr)


def test_missing_folder_and_oversized_crop(folders):
    sr_dir, gt_dir, _ = folders
    with pytest.raises(EvalError, match='does not exist'):
        evaluate_folders(str(sr_dir / 'nope'), str(gt_dir))
    with pytest.raises(EvalError, match='too small for --crop-border 48'):
        evaluate_folders(str(sr_dir), str(gt_dir), suffix='_x4', crop_border=48)


def test_pairing_is_the_datasets_pairing_by_stem(folders, tmp_path, capsys):
    """eval pairs through data/pairing.py: any extension on either side, ambiguous stems named, odd suffixes."""
    _, gt_dir, arrays = folders
    sr_dir = tmp_path / 'sr'
    sr_dir.mkdir()
    for name, (sr, _) in arrays.items():
        cv2.imwrite(str(sr_dir / f'{name}_{{x4}}.bmp'), sr)  # braces in the suffix are not a template
    (sr_dir / 'notes.txt').write_text('not an image: ignored')
    assert [p[0] for p in pair_files(str(sr_dir), str(gt_dir), '_{x4}')] == sorted(arrays)
    cv2.imwrite(str(sr_dir / 'coffee_{x4}.png'), arrays['coffee'][0])  # a second file with one stem
    code = cli_main.main(['eval', '--restored', str(sr_dir), '--gt', str(gt_dir), '--suffix', '_{x4}'])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    assert "'coffee_{x4}.bmp' and 'coffee_{x4}.png'" in err and '--restored' in err, err


def test_images_too_small_for_ssim_fail_instead_of_scoring_nan(tmp_path):
    """A 3x3 pair (or a crop_border leaving less than 11x11) gave SSIM nan and exit 0."""
    from mambacsr_arch.cli.evaluate import score_pair

    gt = np.arange(27, dtype=np.uint8).reshape(3, 3, 3) * 9
    cv2.imwrite(str(tmp_path / 'gt.png'), gt)
    cv2.imwrite(str(tmp_path / 'sr.png'), 255 - gt)
    with pytest.raises(EvalError, match='SSIM needs at least 11x11 after --crop-border 0'):
        score_pair(str(tmp_path / 'sr.png'), str(tmp_path / 'gt.png'))
    big = cv2.resize(gt, (24, 24), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(tmp_path / 'gt.png'), big)
    cv2.imwrite(str(tmp_path / 'sr.png'), 255 - big)
    assert math.isfinite(score_pair(str(tmp_path / 'sr.png'), str(tmp_path / 'gt.png'), crop_border=6)[1])
    with pytest.raises(EvalError, match='after --crop-border 7'):
        score_pair(str(tmp_path / 'sr.png'), str(tmp_path / 'gt.png'), crop_border=7)
