"""The authors' option files pass our option checks through BasicSR's parse_options, unchanged.

Replicas of the official files live in tests/data/official/ (see their first lines). Before the
checks, BasicSR 1.4.2 stopped the MambaCSR test files at ``Wrong dataset phase: val1`` and the
MambaCSR train files at ``TypeError: expected str, bytes or os.PathLike object, not list``.
"""
from __future__ import annotations

import glob
import os.path as osp
import sys

import pytest

import mambacsr_arch  # noqa: F401  (registers the archs before basicsr builds anything)
from basicsr.data import build_dataloader
from basicsr.utils import options as basicsr_options
from mambacsr_arch.cli import option_checks, runtime

pytestmark = pytest.mark.official

OFFICIAL = osp.join(osp.dirname(osp.abspath(__file__)), 'data', 'official')
REPLICAS = sorted(glob.glob(osp.join(OFFICIAL, '*', '*.y*ml')))
MAMBACSR_TEST = osp.join(OFFICIAL, 'mambacsr', 'test_MambaCSR_Q10_Final.yml')
MAMBACSR_TRAIN = osp.join(OFFICIAL, 'mambacsr', 'MambaCSR_Q10_Final.yaml')


def parse(path, monkeypatch, tmp_path, *force):
    """Our CLI's parse_options on ``path`` (train files as train, the others as test), CPU."""
    is_train = not osp.basename(path).startswith(('test_', 'HAT'))
    # nor are the authors' data folders: the existence checks are tested in test_hostile_train_options.py
    monkeypatch.setattr(option_checks, 'check_sources', lambda *args: None)
    # the released checkpoints are not here: a missing path.pretrain_network_g is (rightly) an error
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', path, '--force_yml', 'num_gpu=0',
                                      'path:pretrain_network_g=~', *force])
    return runtime.wrap_parse_options(basicsr_options.parse_options)(str(tmp_path), is_train=is_train)[0]


def test_the_replicas_are_there():
    names = {osp.basename(p) for p in REPLICAS}
    assert {'test_MambaCSR_Q10_Final.yml', 'test_MambaCSR_Q10_wo.yml', 'MambaCSR_Q10_Final.yaml'} <= names, names


@pytest.mark.parametrize('path', REPLICAS, ids=[osp.basename(p) for p in REPLICAS])
def test_every_official_file_passes_the_checks(path, monkeypatch, tmp_path):
    opt = parse(path, monkeypatch, tmp_path)
    assert opt['network_g']['type'] in ('MambaCSR', 'HAT') and opt['network_g']['upscale'] == opt['scale']
    for key, dataset in opt['datasets'].items():
        assert dataset['phase'] == key.split('_')[0]  # what BasicSR's pipelines read
        assert all(isinstance(dataset.get(k, ''), str) for k in ('dataroot_gt', 'dataroot_lq'))


def test_val1_to_val5_become_basicsr_phases_and_force_yml_keeps_the_official_names(monkeypatch, tmp_path):
    opt = parse(MAMBACSR_TEST, monkeypatch, tmp_path, 'datasets:val1:dataroot_gt=/data/Set5/HR',
                'datasets:val5:filename_tmpl={}_x4')
    assert list(opt['datasets']) == ['val_1', 'val_2', 'val_3', 'val_4', 'val_5']
    assert [d['name'] for d in opt['datasets'].values()] == ['Set5', 'Set14', 'Urban100', 'Manga109', 'DIV2K_Test']
    assert opt['datasets']['val_1']['dataroot_gt'] == '/data/Set5/HR'
    assert opt['datasets']['val_5']['filename_tmpl'] == '{}_x4'
    assert opt['datasets']['val_2']['dataroot_lq'] == 'Testsets/Set14/LR_q10'
    for dataset_opt in opt['datasets'].values():  # BasicSR raised "Wrong dataset phase: val1" here
        loader = build_dataloader(list(range(3)), dataset_opt, num_gpu=0, dist=False, sampler=None, seed=10)
        assert loader.batch_size == 1 and len(loader) == 3


def test_one_element_list_dataroots_are_their_folder(monkeypatch, tmp_path):
    opt = parse(MAMBACSR_TRAIN, monkeypatch, tmp_path)
    train = opt['datasets']['train']
    assert (train['dataroot_gt'], train['dataroot_lq']) == ('CSR_dataset/DF2K_HR_sub', 'CSR_dataset/LR_10_sub')
    assert opt['datasets']['val']['dataroot_gt'] == 'Testsets/Manga109/HR/'
    # --force_yml still replaces them (BasicSR applies it after our normalisation)
    opt = parse(MAMBACSR_TRAIN, monkeypatch, tmp_path, 'datasets:train:dataroot_lq=/data/LR_20_sub')
    assert opt['datasets']['train']['dataroot_lq'] == '/data/LR_20_sub'


def test_official_test_files_keep_their_own_test_keys(monkeypatch, tmp_path):
    opt = parse(osp.join(OFFICIAL, 'hat', 'HAT-S_SRx4.yml'), monkeypatch, tmp_path)
    assert list(opt['datasets']) == [f'test_{i}' for i in range(1, 6)]
    assert {d['phase'] for d in opt['datasets'].values()} == {'test'}
