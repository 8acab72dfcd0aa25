"""Process-level fixes applied by ``basicsr train|test`` before BasicSR's pipelines run.

BasicSR (1.4.2 and git master) assumes CUDA + NCCL in a few places. Each fix below replaces
exactly one BasicSR function, only inside our CLI process, and only changes behaviour where
BasicSR would fail or ignore an option:

* ``init_dist``: torchrun/slurm on CPU (gloo, no ``torch.cuda.set_device``); device from
  ``LOCAL_RANK`` instead of ``RANK % num_gpus`` (which is wrong on multi-node jobs).
* ``load_resume_state``: BasicSR maps the state with ``torch.cuda.current_device()``, which
  raises on CPU; we map to the process's device. It also reads states from ``./experiments``
  even when ``path.experiments_root`` says otherwise; we read ``path.training_states``.
* ``BaseModel.model_to_device``: BasicSR always passes ``device_ids=[cuda device]`` to DDP;
  we use :func:`mambacsr_arch.models.distributed.model_to_device` (CPU DDP without ids).
* ``parse_options``: honours ``path.experiments_root`` / ``path.results_root`` (as BasicSR
  master does) on BasicSR 1.4.2, and accepts torch.distributed.launch's ``--local-rank``.
"""
from __future__ import annotations

import functools
import logging
import os
import os.path as osp
import subprocess
import sys
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

logger = logging.getLogger('basicsr')
PLUGIN_GROUP = 'basicsr.plugins'


def load_plugins() -> List[str]:
    """Import every other installed ``basicsr.plugins`` entry point (this package is already imported).

    The result is the same as loading the others first: a package that owns a bare registry name (the
    official ``hat`` package's ``HAT``, a BasicSR fork) gets it even when it registers after us, and ours
    stays reachable as ``mambacsr_arch.<Name>`` (see :mod:`mambacsr_arch.registry`). A plugin that fails
    to import does not stop the command (one broken package must not block training with the others),
    but it is reported loudly on stderr, naming the package and the exception, because the names it
    would have registered may now resolve to our classes. Returns the names of the entry points loaded.
    """
    loaded = []
    try:
        entry_points = metadata.entry_points(group=PLUGIN_GROUP)
    except TypeError:  # Python < 3.10
        entry_points = metadata.entry_points().get(PLUGIN_GROUP, [])
    for entry_point in entry_points:
        if entry_point.value.split(':')[0].split('.')[0] == 'mambacsr_arch':
            loaded.append(entry_point.name)  # ours: imported with this module
            continue
        try:
            entry_point.load()
        except Exception as err:  # noqa: BLE001 - any plugin error is reported, never hidden
            message = (f"basicsr plugin '{entry_point.name}' ({entry_point.value}) failed to import: "
                       f'{type(err).__name__}: {err}. Its archs/datasets/models are NOT registered; a type: '
                       f'name it provides may now resolve to another package (mambacsr_arch registers HAT, '
                       f'MambaCSR, HATModel, MambaCSRModel, JPEGDegradedPairedDataset). Fix or uninstall it.')
            print(f'basicsr: WARNING: {message}', file=sys.stderr, flush=True)
            continue
        loaded.append(entry_point.name)
    return loaded


def process_device() -> torch.device:
    """The device this process trains on: its CUDA device if CUDA is usable, else CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def init_dist(launcher: str, backend: str = 'nccl', **kwargs: Any) -> None:
    """CPU-aware replacement for ``basicsr.utils.dist_util.init_dist``.

    ``backend`` is honoured on CUDA; without CUDA the only usable backend, gloo, is used.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if not use_cuda:
        backend = 'gloo'
    if launcher == 'pytorch':
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))
    elif launcher == 'slurm':
        local_rank = _export_slurm_env(kwargs.pop('port', None))
    else:
        raise ValueError(f"Invalid launcher '{launcher}': expected 'pytorch' or 'slurm'.")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, **kwargs)


def _export_slurm_env(port: Optional[int]) -> int:
    """Set the torch.distributed env variables from slurm's; return the local rank."""
    proc_id = int(os.environ['SLURM_PROCID'])
    node_list = os.environ['SLURM_NODELIST']
    local_rank = int(os.environ.get('SLURM_LOCALID', proc_id % max(torch.cuda.device_count(), 1)))
    os.environ.setdefault('MASTER_ADDR',
                          subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1'))
    if port is not None:
        os.environ['MASTER_PORT'] = str(port)
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['LOCAL_RANK'] = str(local_rank)
    os.environ['RANK'] = str(proc_id)
    return local_rank


def find_latest_state(training_states_dir: str) -> Optional[str]:
    """Path of the highest-iteration ``<iter>.state`` in a folder, or None.

    Only names that are exactly an integer plus ``.state`` count, so temporary files written
    by an interrupted save are never picked.
    """
    if not osp.isdir(training_states_dir):
        return None
    iters = []
    for name in os.listdir(training_states_dir):
        stem, ext = osp.splitext(name)
        if ext == '.state' and stem.isdigit():
            iters.append(int(stem))
    return osp.join(training_states_dir, f'{max(iters)}.state') if iters else None


def load_resume_state(opt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Replacement for ``basicsr.train.load_resume_state`` that works on CPU."""
    from basicsr.utils import check_resume

    if opt.get('auto_resume'):
        resume_state_path = find_latest_state(opt['path']['training_states'])
        if resume_state_path is not None:
            opt['path']['resume_state'] = resume_state_path
    else:
        resume_state_path = opt['path'].get('resume_state')
    if not resume_state_path:
        return None
    if not osp.isfile(resume_state_path):
        raise FileNotFoundError(f"path.resume_state: training state '{resume_state_path}' does not exist.")
    resume_state = torch.load(resume_state_path, map_location=process_device(), weights_only=True)
    check_resume(opt, resume_state['iter'])
    return resume_state


def _override_roots(opt: Dict[str, Any], raw_path: Dict[str, Any], is_train: bool) -> None:
    """Apply ``path.experiments_root`` / ``path.results_root`` as BasicSR master does."""
    if is_train:
        root = raw_path.get('experiments_root')
        if root:
            root = osp.abspath(osp.expanduser(root))
            opt['path'].update(experiments_root=root, models=osp.join(root, 'models'),
                               training_states=osp.join(root, 'training_states'), log=root,
                               visualization=osp.join(root, 'visualization'))
    else:
        root = raw_path.get('results_root')
        if root:
            root = osp.abspath(osp.expanduser(root))
            opt['path'].update(results_root=root, log=root, visualization=osp.join(root, 'visualization'))


def wrap_parse_options(parse_options: Callable) -> Callable:
    """Wrap BasicSR's ``parse_options`` to honour explicit result/experiment roots."""
    import yaml

    if getattr(parse_options, '_mambacsr_wrapped', False):
        return parse_options

    @functools.wraps(parse_options)
    def wrapped(root_path: str, is_train: bool = True) -> Tuple[Dict[str, Any], Any]:
        opt, args = parse_options(root_path, is_train=is_train)
        with open(args.opt, encoding='utf-8') as f:
            raw = yaml.safe_load(f) or {}
        _override_roots(opt, raw.get('path') or {}, is_train)
        return opt, args

    wrapped._mambacsr_wrapped = True
    return wrapped


def normalize_argv(argv: List[str]) -> List[str]:
    """Accept ``--local-rank`` (torch.distributed.launch >= 2.0) as BasicSR's ``--local_rank``."""
    return [a.replace('--local-rank', '--local_rank', 1) if a.startswith('--local-rank') else a for a in argv]


def patch_basicsr() -> None:
    """Install the replacements listed in this module's docstring (idempotent)."""
    import basicsr.test as basicsr_test
    import basicsr.train as basicsr_train
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options as options
    from basicsr.models.base_model import BaseModel

    from mambacsr_arch.models.distributed import model_to_device

    dist_util.init_dist = init_dist
    options.init_dist = init_dist
    basicsr_train.load_resume_state = load_resume_state
    basicsr_train.parse_options = wrap_parse_options(basicsr_train.parse_options)
    basicsr_test.parse_options = wrap_parse_options(basicsr_test.parse_options)
    BaseModel.model_to_device = model_to_device
