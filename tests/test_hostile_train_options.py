"""Hostile ``basicsr train`` / ``basicsr test`` options: one line, exit 2, no traceback, nothing made or moved.

Each case once printed a Python traceback, several after the experiment folder was created (or an
existing one archived): ``--force_yml`` roots ignored, ``--force_yml`` values kept as text and
misspelt keys, tile typos, non-positive loader/optimiser/logger numbers, fp16 on the CPU, a
missing / truncated / refused / other-architecture ``pretrain_network_g`` and a resume state of the
other architecture. They now stop in the one option validation (``check_options``, run while
BasicSR parses the options), before any folder exists. Dataset-content cases (images too small for
SSIM or for ``gt_size``) stop when the datasets are built, still with one line.
"""
from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

import mambacsr_arch  # noqa: F401  (registers the archs before basicsr builds anything)
from basicsr.utils import options as basicsr_options
from helpers_images import make_image_folder
from mambacsr_arch.archs.hat.arch import HAT
from mambacsr_arch.archs.mambacsr.arch import MambaCSR
from mambacsr_arch.cli import runtime
from mambacsr_arch.cli.main import main as cli_main
from test_hostile_options import TINY_HAT, TINY_MAMBACSR, options, write

pytestmark = pytest.mark.hostile


def tree(root) -> list:
    """Every path under ``root`` (relative), to prove nothing was created, moved or archived."""
    found = []
    for folder, dirs, files in os.walk(root):
        found += [osp.relpath(osp.join(folder, name), root) for name in dirs + files]
    return sorted(found)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """cwd is tmp_path, where the options' relative dataroot 'data/gt' exists (empty: nothing here reads it)."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / 'data' / 'gt')


def tiny_weights(folder, arch='MambaCSR') -> str:
    path = osp.join(folder, f'{arch}.pth')
    torch.save({'params': _tiny(arch).state_dict()}, path)
    return path


@pytest.fixture()
def cli(tmp_path, monkeypatch, capsys):
    """``cli(command, opt, *extra)`` -> (exit code, the error lines, stderr); cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))  # the command sets sys.argv for BasicSR; restored after

    def run(command, opt, *extra):
        path = opt if isinstance(opt, str) else write(tmp_path / 'o.yml', opt)
        code = cli_main([command, '-opt', path, *extra])
        err = capsys.readouterr().err
        return code, [line for line in err.splitlines() if line.startswith(f'basicsr {command}: error:')], err

    return run


def refused(result, *fragments):
    code, errors, err = result
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and 'Traceback' not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_option_errors_create_move_or_archive_nothing_and_force_yml_roots_are_honoured(tmp_path, cli, monkeypatch):
    # an existing run of the file's name, and the forced root: BasicSR archived the first (the forced root
    # was ignored) and then crashed on the text lr
    os.makedirs(tmp_path / 'experiments' / 'hostile' / 'models')
    (tmp_path / 'experiments' / 'hostile' / 'models' / 'keep.txt').write_text('x')
    os.makedirs(tmp_path / 'runs' / 'x' / 'models')
    before = tree(tmp_path)
    refused(cli('train', options(), '--force_yml', f'path:experiments_root={tmp_path}/runs/x', 'train:optim_g:lr=-1'),
            'train.optim_g.lr must be a positive number, got -1')
    assert tree(tmp_path) == sorted(before + ['o.yml'])
    refused(cli('test', options(), '--force_yml', f'path:results_root={tmp_path}/runs/x', 'val:tile={szie: 8}'),
            'val.tile')
    assert tree(tmp_path) == sorted(before + ['o.yml'])
    # the forced roots are the ones the pipelines use (BasicSR 1.4.2 forces ./experiments/<name>)
    opt = options()
    opt['path']['pretrain_network_g'] = tiny_weights(tmp_path)  # test needs weights; train starts from them
    path = write(tmp_path / 'o.yml', opt)
    for is_train, key in ((True, 'experiments_root'), (False, 'results_root')):
        monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', path, '--force_yml', f'path:{key}=runs/y', 'name=z'])
        opt = runtime.wrap_parse_options(basicsr_options.parse_options)(str(tmp_path), is_train=is_train)[0]
        assert opt['path'][key] == str(tmp_path / 'runs' / 'y') and opt['path']['log'] == opt['path'][key]
        assert opt['name'] == 'z'


def test_force_yml_values_are_typed_as_yaml(tmp_path, monkeypatch):
    path = write(tmp_path / 'o.yml', options())
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', path, '--force_yml', 'train:optim_g:lr=2e-4',
                                      'train:ema_decay=0.999', 'train:scheduler:milestones=[3, 6]',
                                      'datasets:val:filename_tmpl={}_x4', 'val:save_img=true', '--force_yml',
                                      'train:warmup_iter=none'])
    opt = runtime.wrap_parse_options(basicsr_options.parse_options)(str(tmp_path), is_train=True)[0]
    assert opt['train']['optim_g']['lr'] == 2e-4 and isinstance(opt['train']['optim_g']['lr'], float)
    assert opt['train']['ema_decay'] == 0.999 and opt['train']['scheduler']['milestones'] == [3, 6]
    assert opt['datasets']['val']['filename_tmpl'] == '{}_x4' and opt['val']['save_img'] is True
    assert opt['train']['warmup_iter'] is None  # both --force_yml flags apply (BasicSR kept the last only)


@pytest.mark.parametrize('entry, fragments', [
    ('trian:ema_decay=0.9', ("--force_yml 'trian:ema_decay=0.9'", "no key trian (did you mean 'train'?)")),
    ('train:optim_g:lr', ("--force_yml 'train:optim_g:lr': expected <key>[:<key>...]=<value>", )),
    ('train:ema_decy=0.9', ("train has no option 'ema_decy' (did you mean 'ema_decay'?)", )),
    ('train:optim_g:lrr=1', ("no key train:optim_g:lrr (did you mean 'lr'?)", )),
])
def test_misspelt_force_yml_keys_are_named(cli, entry, fragments):
    refused(cli('train', options(), '--force_yml', entry), *fragments)


def test_unknown_train_key_in_the_file_is_named(cli):
    opt = options()
    opt['train']['ema_decy'] = 0.999
    refused(cli('train', opt), "train has no option 'ema_decy' (did you mean 'ema_decay'?)")


@pytest.mark.parametrize('command', ['train', 'test'])
@pytest.mark.parametrize('entry, fragments', [
    ('val:tile={size: 64, overlpa: 8}', ('val.tile', 'overlpa')),
    ('tile={tile_size: 64, tile_pad: 8}', ('both val.tile', 'top-level tile')),
    ('padding_size=0', ('padding_size', )),
])
def test_tile_typos_and_conflicts_are_refused_by_the_infer_resolver(cli, command, entry, fragments):
    opt = options()
    opt['val']['tile'] = {'size': 64}
    if command == 'test':
        opt['datasets'] = {'test': opt['datasets']['val']}
    refused(cli(command, opt, '--force_yml', entry), *fragments)
    assert not osp.exists('experiments') and not osp.exists('results')


@pytest.mark.parametrize('entry, fragments', [
    ('datasets:train:batch_size_per_gpu=0', ('datasets.train.batch_size_per_gpu must be an integer >= 1, got 0', )),
    ('datasets:train:batch_size_per_gpu=1.5', ('batch_size_per_gpu must be an integer >= 1, got 1.5', )),
    ('datasets:train:num_worker_per_gpu=-1', ('num_worker_per_gpu must be an integer >= 0, got -1', )),
    ('train:optim_g:lr=0', ('train.optim_g.lr must be a positive number, got 0', )),
    ('train:total_iter=0', ('train.total_iter must be an integer >= 1, got 0', 'train nothing')),
    ('val:val_freq=0', ('val.val_freq must be an integer >= 1, got 0', )),
    ('logger:save_checkpoint_freq=0', ('logger.save_checkpoint_freq must be an integer >= 1, got 0', )),
    ('datasets:train:gt_size=30', ('gt_size is 30, not a multiple of scale 4', 'Use 28 or 32')),
    ('num_gpu=1', ('num_gpu is 1 but CUDA is not available', )),
])
def test_impossible_numbers_are_refused_before_anything_is_built(cli, entry, fragments):
    if entry == 'num_gpu=1' and torch.cuda.is_available():
        pytest.skip('needs a machine without CUDA')
    refused(cli('train', options(), '--force_yml', entry), *fragments)
    assert not osp.exists('experiments')


def test_text_learning_rate_in_the_file_says_how_to_write_it(cli):
    opt = options()
    opt['train']['optim_g']['lr'] = '2e-4'  # what PyYAML reads from `lr: 2e-4`
    refused(cli('train', opt), "train.optim_g.lr must be a positive number, got '2e-4'", '!!float 2e-4')


@pytest.mark.skipif(torch.cuda.is_available(), reason='fp16 training is refused only without CUDA')
def test_fp16_training_on_the_cpu_is_one_line_and_bf16_passes(cli, tmp_path, monkeypatch):
    refused(cli('train', options(), '--force_yml', 'train:use_amp=fp16'), 'train.use_amp: fp16 needs CUDA', 'bf16')
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', write(tmp_path / 'b.yml', options()), '--force_yml',
                                      'train:use_amp=bf16'])
    opt = runtime.wrap_parse_options(basicsr_options.parse_options)(str(tmp_path), is_train=True)[0]
    assert opt['train']['use_amp'] == 'bf16'


def test_save_img_without_suffix_defaults_with_a_note(tmp_path, monkeypatch, capsys):
    opt = options()
    opt['datasets'] = {'test': opt['datasets']['val']}
    opt['val'] = {'save_img': True}
    opt['path']['pretrain_network_g'] = tiny_weights(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', write(tmp_path / 'o.yml', opt)])
    parsed = runtime.wrap_parse_options(basicsr_options.parse_options)(str(tmp_path), is_train=False)[0]
    assert 'suffix' in parsed['val'] and parsed['val']['suffix'] is None  # BasicSR indexes it
    assert 'val.suffix is not set: images are saved as <image>_hostile.png' in capsys.readouterr().err


def _tiny(arch):
    cfg = TINY_MAMBACSR if arch == 'MambaCSR' else TINY_HAT
    return (MambaCSR if arch == 'MambaCSR' else HAT)(**{k: v for k, v in cfg.items() if k != 'type'})


class Payload:  # pickled object: torch.load(weights_only=True) refuses it
    def __reduce__(self):
        return (print, ('code ran',))


@pytest.mark.parametrize('command', ['train', 'test'])
@pytest.mark.parametrize('kind, fragments', [
    ('missing', ('does not exist', )),
    ('truncated', ('cannot read checkpoint', )),
    ('pickled code', ()),  # the weights loader's own words: refused, no code run
    ('other arch', ("this is a HAT checkpoint", 'strict_load_g: false')),
])
def test_bad_pretrain_network_g_is_refused_before_anything_is_built(tmp_path, cli, capsys, command, kind, fragments):
    weights = tmp_path / 'net.pth'
    if kind == 'truncated':
        torch.save({'params': _tiny('MambaCSR').state_dict()}, weights)
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == 'pickled code':
        torch.save({'params': Payload()}, weights)
    elif kind == 'other arch':
        torch.save({'params': _tiny('HAT').state_dict()}, weights)
    opt = options(path={'pretrain_network_g': str(weights), 'strict_load_g': True})
    if command == 'test':
        opt['datasets'] = {'test': opt['datasets']['val']}
    error = refused(cli(command, opt), 'path.pretrain_network_g', *fragments)
    assert 'code ran' not in capsys.readouterr().out and str(weights) in error
    assert not osp.exists('experiments') and not osp.exists('results')


def test_resume_state_of_the_other_architecture_is_one_line(tmp_path, cli):
    root = tmp_path / 'runs' / 'r'
    os.makedirs(root / 'models')
    os.makedirs(root / 'training_states')
    torch.save({'params': _tiny('HAT').state_dict()}, root / 'models' / 'net_g_1.pth')
    torch.save({'iter': 1, 'epoch': 0, 'optimizers': [], 'schedulers': []}, root / 'training_states' / '1.state')
    before = tree(tmp_path)
    opt = options(path={'pretrain_network_g': None, 'strict_load_g': True, 'experiments_root': str(root),
                        'resume_state': str(root / 'training_states' / '1.state')})
    refused(cli('train', opt), 'path.resume_state', 'net_g_1.pth', 'this is a HAT checkpoint')
    assert tree(tmp_path) == sorted(before + ['o.yml'])


def cli_process(command, opt, cwd):
    """The CLI in a fresh process (datasets are built: BasicSR's logger must not outlive a test)."""
    proc = subprocess.run([sys.executable, '-m', 'mambacsr_arch.cli.main', command, '-opt', write(cwd / 'o.yml', opt)],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE'))
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f'basicsr {command}: error:')]
    return proc.returncode, errors, proc.stderr


def test_images_too_small_for_ssim_are_named_with_the_fix(tmp_path):
    make_image_folder(tmp_path / 'gt', names=('astronaut', 'chelsea'), size=(16, 16))
    make_image_folder(tmp_path / 'gt', names=('coffee', ), size=(48, 48))
    opt = options()
    opt['datasets'] = {'test': dict(opt['datasets']['val'], dataroot_gt=str(tmp_path / 'gt'))}
    opt['path']['pretrain_network_g'] = tiny_weights(tmp_path)
    opt['val']['metrics'] = {'ssim': {'type': 'calculate_ssim', 'crop_border': 4, 'test_y_channel': True}}
    error = refused(cli_process('test', opt, tmp_path), '2 image(s) too small for the SSIM metric',
                    "astronaut.png' (evaluated at 16x16, 8x8 after crop_border 4", 'Drop the ssim metric')
    assert 'coffee' not in error


def test_a_crop_border_leaving_no_pixel_is_named_not_scored_as_nan(tmp_path):
    make_image_folder(tmp_path / 'gt', names=('astronaut', ), size=(16, 16))
    opt = options()
    opt['datasets'] = {'test': dict(opt['datasets']['val'], dataroot_gt=str(tmp_path / 'gt'))}
    opt['path']['pretrain_network_g'] = tiny_weights(tmp_path)
    opt['val']['metrics'] = {'psnr': {'type': 'calculate_psnr', 'crop_border': 8}}
    refused(cli_process('test', opt, tmp_path), "1 image(s) smaller than twice the metrics' crop_border",
            'evaluated at 16x16, 0x0 after crop_border 8: no pixel is left to score', 'Lower crop_border')


def test_gt_size_larger_than_the_training_images_says_how_many_and_the_largest(tmp_path):
    make_image_folder(tmp_path / 'gt', names=('astronaut', 'chelsea'), size=(24, 24))
    make_image_folder(tmp_path / 'gt', names=('coffee', ), size=(28, 40))
    opt = options()
    opt['datasets']['train']['dataroot_gt'] = str(tmp_path / 'gt')
    opt['datasets']['val']['dataroot_gt'] = str(tmp_path / 'gt')
    os.makedirs(tmp_path / 'experiments' / 'hostile' / 'models')  # an earlier run: BasicSR archives it at start
    (tmp_path / 'experiments' / 'hostile' / 'models' / 'net_g_5.pth').write_bytes(b'weights')
    result = cli_process('train', opt, tmp_path)
    refused(result, '3 of 3 GT images are smaller than gt_size 32', 'the largest image is 28x40',
            'lower datasets.train.gt_size to 28 or less')
    # the failed start's own folder is gone and the earlier run has its name back (a retry archived it again)
    assert os.listdir(tmp_path / 'experiments') == ['hostile'], result[2]
    assert (tmp_path / 'experiments' / 'hostile' / 'models' / 'net_g_5.pth').read_bytes() == b'weights'
    assert 'has its name back' in result[2]


def test_a_checkpoint_given_as_the_option_file(tmp_path, cli):
    torch.save({'params': {'w': torch.ones(3)}}, tmp_path / 'net_g.pth')
    before = tree(tmp_path)
    for command in ('train', 'test'):
        refused(cli(command, str(tmp_path / 'net_g.pth')), 'not UTF-8 text', 'is -opt a YAML option file?')
    assert tree(tmp_path) == before


def test_ctrl_c_before_a_command_runs_is_one_line(monkeypatch, capsys):
    """Ctrl-C while a command starts (imports, model build): exit 130, no traceback."""
    from mambacsr_arch.cli import env

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(env, 'run', interrupted)
    assert cli_main(['env']) == 130
    err = capsys.readouterr().err
    assert err.strip() == 'basicsr env: interrupted.' and 'Traceback' not in err


@pytest.mark.parametrize('entry, fragment', [
    ('datasets:train:dataset_enlarge_ratio=-1', 'datasets.train.dataset_enlarge_ratio must be an integer >= 1'),
    ('datasets:train:dataset_enlarge_ratio=0', 'datasets.train.dataset_enlarge_ratio must be an integer >= 1'),
    ('train:ema_decay=2', 'train.ema_decay must be a number in [0, 1)'),
    ('train:scheduler:milestones=abc', 'train.scheduler.milestones must be a list of integers >= 0'),
    ('train:scheduler:gamma=abc', 'train.scheduler.gamma must be a positive number'),
    ('train:scheduler:type=MultiStepLRR', "no scheduler 'MultiStepLRR' (did you mean 'MultiStepLR'?)"),
    ('train:optim_g:type=Adamm', 'train.optim_g (Adamm) cannot be built'),
    ('train:optim_g:betas=abc', 'train.optim_g (Adam) cannot be built'),
    ('train:pixel_opt:type=L1Losss', "unknown loss 'L1Losss' (did you mean 'L1Loss'?)"),
    ('train:pixel_opt=~', 'train has no loss: add pixel_opt'),
    ('val:metrics={psnr: {type: calculate_psnrr}}', "metric 'calculate_psnrr' (did you mean 'calculate_psnr'?)"),
    ('val:metrics={psnr: {type: calculate_psnr, crop_border: -4}}', 'val.metrics.psnr.crop_border must be an integer'),
    ('num_gpu=-1', 'num_gpu must be an integer >= 0'),
    ('num_gpu=two', 'num_gpu must be an integer >= 0'),
    ('manual_seed=abc', "manual_seed must be an integer >= 0, got 'abc'"),
    ('train:total_iter="2"', "train.total_iter must be an integer >= 1, got '2' (YAML reads '2' as text: remove the"),
    ('scale="4"', "scale is '4' but network_g upscales x4"),
    ('val:suffix=/../../x', "val.suffix '/../../x' contains a path separator"),
    ('datasets:train:use_hflip=maybe', "datasets.train.use_hflip must be true or false, got 'maybe'"),
    ('path:strict_load_g=maybe', "path.strict_load_g must be true or false, got 'maybe'"),
    ('path:resume_state=missing.state', "path.resume_state: 'missing.state' is not a file"),
    ('datasets:train:dataroot_gt=nowhere', "datasets.train.dataroot_gt: 'nowhere' is not a folder (it does not exist)"),
    ('datasets:val:dataroot_gt=~', 'datasets.val.dataroot_gt is None'),
    ('datasets:train:jpeg_quality=101', 'jpeg_quality'),
    ('datasets:train:io_backend={type: lmdb}', "'data/gt' is not an LMDB (no data.mdb) but io_backend is lmdb"),
])
def test_values_basicsr_reads_late_stop_before_anything_is_made(cli, tmp_path, entry, fragment):
    """Each was silently wrong (a negative enlarge ratio trained nothing, ema_decay 2 extrapolated, text milestones
    never decayed) or a traceback after the experiment folder was made or an existing one archived."""
    os.makedirs(tmp_path / 'experiments' / 'hostile' / 'models')
    before = tree(tmp_path)
    refused(cli('train', options(), '--force_yml', entry), fragment)
    assert tree(tmp_path) == sorted(before + ['o.yml'])


def test_misspelt_sections_a_misspelt_dataroot_and_test_without_weights(cli):
    opt = options()
    opt['vall'] = opt.pop('val')
    refused(cli('train', opt), "unknown top-level key 'vall' (did you mean 'val'?)")
    opt = options()
    opt['datasets']['train']['dataroot_gtt'] = opt['datasets']['train'].pop('dataroot_gt')
    refused(cli('train', opt), "datasets.train.dataroot_gt is missing ('dataroot_gtt' is misspelt)")
    opt = options()
    opt['datasets'] = {'test': opt['datasets']['val']}
    refused(cli('test', opt), 'path.pretrain_network_g is not set: basicsr test would score an untrained')


@pytest.mark.parametrize('entry, fragment', [('network_g:embed_dim="24"', 'MambaCSR cannot be built with these values'),
                                             ('network_g:scan_size=0', 'MambaCSR cannot be built with these values')])
def test_network_values_its_constructor_refuses(cli, entry, fragment):
    refused(cli('train', options(), '--force_yml', entry), 'network_g: ', fragment)


def test_a_resume_state_holding_python_objects_is_refused_without_suggesting_an_unsafe_load(cli, tmp_path):
    torch.save({'iter': Payload()}, tmp_path / 'x.state')
    error = refused(cli('train', options(), '--force_yml', f'path:resume_state={tmp_path}/x.state'),
                    'holds pickled Python objects', 'refused, as loading it could run code')
    assert 'weights_only' not in error
    (tmp_path / 'y.state').write_bytes(b'x\n')
    error = refused(cli('train', options(), '--force_yml', f'path:resume_state={tmp_path}/y.state'),
                    'is not a file torch.save wrote')
    assert 'weights_only' not in error


def test_the_constructor_check_leaves_the_seeded_random_stream_alone():
    """check_options builds our networks once; the seeded network BasicSR builds next must get the same weights."""
    from mambacsr_arch.cli.option_checks import check_network

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_network(dict(TINY_MAMBACSR), build=True)
    assert torch.equal(torch.rand(3), expected)
