"""Process-level fixes applied by ``basicsr train|test`` before BasicSR's pipelines run.

BasicSR (1.4.2 and git master) assumes CUDA + NCCL in a few places. Each fix below replaces
exactly one BasicSR function, only inside our CLI process, and only changes behaviour where
BasicSR would fail or ignore an option:

* ``init_dist``: torchrun/slurm on CPU (gloo, no ``torch.cuda.set_device``); device from
  ``LOCAL_RANK`` instead of ``RANK % num_gpus`` (which is wrong on multi-node jobs).
* ``load_resume_state``: BasicSR maps the state with ``torch.cuda.current_device()``, which
  raises on CPU; we map to the process's device. It also reads states from ``./experiments``
  even when ``path.experiments_root`` says otherwise; we read ``path.training_states``. With
  ``--auto_resume`` an unusable (e.g. truncated) newest state is skipped with a warning naming it
  and the previous one used; stale temporary files of killed saves are removed at start-up.
* ``BaseModel.model_to_device``: BasicSR always passes ``device_ids=[cuda device]`` to DDP;
  we use :func:`mambacsr_arch.models.distributed.model_to_device` (CPU DDP without ids).
* ``parse_options``: honours ``path.experiments_root`` / ``path.results_root`` (as BasicSR
  master does) on BasicSR 1.4.2, and accepts torch.distributed.launch's ``--local-rank``. It
  validates the option file first (:mod:`mambacsr_arch.cli.option_checks`): BasicSR ignores or
  crashes late on misspelt network keys, scale/upscale mismatches, ``val1`` dataset keys and
  list dataroots (the authors' own files use the last two).
* ``mkdir_and_rename`` (recorded, same behaviour): a start that fails with a user error (e.g. a dataset
  whose images are smaller than ``gt_size``, found once the datasets are built) removes the experiment
  folder it made if it holds only logs and the option file, and gives the archived earlier run its name back.
* dataset pairing and I/O (:func:`patch_datasets`): ``PairedImageDataset`` pairs LQ with GT by stem
  whatever the extension (the authors' ``HR/*.png`` + ``LR_q10/*.jpg``, ``filename_tmpl: '{}x4'``),
  LMDB-backed datasets share one read-only environment per database and process, and every
  val/test dataset is size-checked when it is built, before the first training iteration.

:func:`run_pipeline` runs the pipeline and turns the errors a user fixes in the option file, the
data or the resume state into one ``basicsr <cmd>: error:`` line (exit status 2).
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


def list_states(training_states_dir: str) -> List[str]:
    """Paths of the ``<iter>.state`` files in a folder, newest first.

    Only names that are exactly an integer plus ``.state`` count, so temporary files written
    by an interrupted save are never picked.
    """
    from mambacsr_arch.models.checkpoint_io import saved_iterations

    return [osp.join(training_states_dir, f'{it}.state') for it in saved_iterations(training_states_dir, '', '.state')]


class UnusableStateError(RuntimeError):
    """A training state that cannot be resumed from: unreadable, not a state, or its networks are missing."""


def read_training_state(opt: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Load ``path`` onto this process's device and check the network files a resume needs exist."""
    from mambacsr_arch.models.checkpoint_io import network_files

    try:
        state = torch.load(path, map_location=process_device(), weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, I/O error: all make the file unusable
        text = str(err)
        if 'Weights only load failed' in text:  # torch's text goes on to suggest an unsafe load: not ours
            what = ('holds pickled Python objects, which a training state of BasicSR does not; refused, as loading '
                    'it could run code' if 'Unsupported global' in text else 'is not a file torch.save wrote')
            raise UnusableStateError(f"training state '{path}' {what} (is it a .state file of "
                                     'experiments/<name>/training_states?)') from err
        first = (text.strip().splitlines() or [''])[0]
        raise UnusableStateError(f"training state '{path}' cannot be loaded, it is truncated or corrupt "
                                 f'({type(err).__name__}: {first})') from err
    lacking = [key for key in ('iter', 'epoch', 'optimizers', 'schedulers')
               if not isinstance(state, dict) or key not in state]
    if lacking:
        raise UnusableStateError(f"training state '{path}' is not a BasicSR training state (no {lacking})")
    files = network_files(opt, int(state['iter']))
    missing = [f for f in files if not osp.isfile(f)]
    if missing:
        raise UnusableStateError(f"training state '{path}' has no network file to go with it ({missing} "
                                 f'missing)')
    _check_resumed_arch(opt, path, files)
    return state


def _check_resumed_arch(opt: Dict[str, Any], path: str, files: List[str]) -> None:
    """The ``net_g`` file a resume loads must be of ``network_g.type`` (MambaCSR / HAT), else one error."""
    from mambacsr_arch.archs.state_dict_report import foreign_checkpoint
    from mambacsr_arch.errors import ConfigError
    from mambacsr_arch.models.weights import choose_param_key, open_checkpoint, select_weights

    arch = (opt.get('network_g') or {}).get('type')
    net_g = [f for f in files if osp.basename(f).startswith('net_g_')]
    if arch not in ('MambaCSR', 'HAT') or not net_g:
        return
    try:
        param_key = choose_param_key(None, opt['path'], has_option_file=True)
        state, _ = select_weights(open_checkpoint(net_g[0]), param_key)
    except (ConfigError, OSError, KeyError, RuntimeError) as err:
        raise UnusableStateError(f"training state '{path}': its network file '{net_g[0]}' cannot be read "
                                 f'({err})') from err
    foreign = foreign_checkpoint(arch, state.keys())
    if foreign:
        raise UnusableStateError(f"training state '{path}' resumes '{net_g[0]}', but {foreign}")


def _warn_rank0(opt: Dict[str, Any], message: str) -> None:
    # called before BasicSR sets up its log file: warnings still reach stderr (logging's last-resort handler)
    if int(opt.get('rank', 0)) == 0:
        logger.warning(message)


def _auto_resume_state(opt: Dict[str, Any]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """Newest usable state: each unusable one is reported and the previous one tried."""
    states_dir = opt['path']['training_states']
    candidates = list_states(states_dir)
    problems = []
    for path in candidates:
        try:
            state = read_training_state(opt, path)
        except UnusableStateError as err:
            problems.append(str(err))
            _warn_rank0(opt, f'--auto_resume: skipping {err}; trying the previous state.')
            continue
        explicit = opt['path'].get('resume_state')
        if explicit and osp.abspath(explicit) != osp.abspath(path):
            _warn_rank0(opt, f"--auto_resume resumes from the newest usable state '{path}'; path.resume_state "
                             f"('{explicit}') is ignored. Run without --auto_resume to resume from it.")
        return path, state
    if problems:
        raise UnusableStateError(f'--auto_resume: none of the {len(candidates)} training states in {states_dir} '
                                 'can be used:\n  ' + '\n  '.join(problems) + '\nRestore or remove them, or set '
                                 'path.resume_state to a good state, or start a new run without --auto_resume.')
    return None, None


def _names(paths: List[str], limit: int = 4) -> str:
    """'9.state, 8.state, ... (12 in all)' for a newest-first list of state paths."""
    names = [osp.basename(p) for p in paths]
    return ', '.join(names[:limit]) + (f', ... ({len(names)} in all)' if len(names) > limit else '')


def _explicit_state(opt: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The state path.resume_state names; one clear error if it cannot be used."""
    states_dir = opt['path'].get('training_states')
    available = list_states(states_dir) if states_dir else []
    if not osp.isfile(path):
        raise FileNotFoundError(f"path.resume_state: training state '{path}' does not exist "
                                f'(states in {states_dir}: {_names(available) or "none"}).')
    try:
        state = read_training_state(opt, path)
    except UnusableStateError as err:
        others = [p for p in available if osp.abspath(p) != osp.abspath(path)]
        raise UnusableStateError(f'path.resume_state: {err}. Point path.resume_state at another state (in '
                                 f'{states_dir}: {_names(others) or "none"}), or use --auto_resume to take '
                                 f'the newest usable one.') from err
    if states_dir and osp.dirname(osp.abspath(path)) == osp.abspath(states_dir):
        newer = [p for p in available if int(osp.basename(p)[:-len('.state')]) > int(state['iter'])]
        if newer:
            _warn_rank0(opt, f'Resuming from iteration {state["iter"]} while newer states exist in {states_dir} '
                             f'({_names(newer)}): this run replaces them and their network files as it passes '
                             f'those iterations. Copy them elsewhere first if you want to keep them.')
    return state


def load_resume_state(opt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Replacement for ``basicsr.train.load_resume_state``.

    BasicSR 1.4.2 maps the state onto ``torch.cuda.current_device()`` (fails on CPU), reads
    ``./experiments`` whatever ``path.experiments_root`` says, and with ``--auto_resume`` crashes on
    a truncated newest state with a zip error that does not name it. Here: states go to the
    process's device; ``--auto_resume`` takes the newest *usable* state (each unusable one is
    logged with its reason and the previous one tried); an unusable ``path.resume_state`` is one
    error naming it. First, rank 0 removes temporary files left by saves of killed runs.
    """
    from basicsr.utils import check_resume

    from mambacsr_arch.models.checkpoint_io import remove_stale_temp_files

    if int(opt.get('rank', 0)) == 0:
        for key in ('models', 'training_states'):
            if opt['path'].get(key):
                remove_stale_temp_files(opt['path'][key])
    if opt.get('auto_resume'):
        resume_state_path, resume_state = _auto_resume_state(opt)
        if resume_state_path is None:
            return None
        opt['path']['resume_state'] = resume_state_path
    else:
        resume_state_path = opt['path'].get('resume_state')
        if not resume_state_path:
            return None
        resume_state = _explicit_state(opt, resume_state_path)
    check_resume(opt, resume_state['iter'])
    return resume_state


def _override_roots(opt: Dict[str, Any], path_set: Dict[str, Any], is_train: bool) -> None:
    """Apply ``path.experiments_root`` / ``path.results_root`` as BasicSR master does.

    ``path_set``: the ``path`` section as the option file and ``--force_yml`` set it (BasicSR 1.4.2
    overwrites both roots in ``opt`` with ``<cwd>/experiments|results/<name>``).
    """
    if is_train:
        root = path_set.get('experiments_root')
        if root:
            root = osp.abspath(osp.expanduser(str(root)))
            opt['path'].update(experiments_root=root, models=osp.join(root, 'models'),
                               training_states=osp.join(root, 'training_states'), log=root,
                               visualization=osp.join(root, 'visualization'))
    else:
        root = path_set.get('results_root')
        if root:
            root = osp.abspath(osp.expanduser(str(root)))
            opt['path'].update(results_root=root, log=root, visualization=osp.join(root, 'visualization'))


def wrap_parse_options(parse_options: Callable) -> Callable:
    """Wrap BasicSR's ``parse_options``: validated options, ``--force_yml`` typed, explicit roots.

    ``--force_yml`` entries are taken from the command line and applied, typed as YAML and checked,
    while BasicSR reads the YAML (:func:`mambacsr_arch.cli.option_checks.normalizing_yaml`), where
    list-valued dataroots are normalised too (BasicSR crashes on them). On the parsed dict,
    :func:`mambacsr_arch.cli.option_checks.check_options` runs, so a bad option file fails with one
    :class:`~mambacsr_arch.cli.option_checks.OptionError` before any folder, dataset or network is made.
    """
    import yaml

    from mambacsr_arch.cli import option_checks
    from mambacsr_arch.data import checks

    if getattr(parse_options, '_mambacsr_wrapped', False):
        return parse_options

    @functools.wraps(parse_options)
    def wrapped(root_path: str, is_train: bool = True) -> Tuple[Dict[str, Any], Any]:
        notes: List[str] = []
        read: Dict[str, Any] = {}
        argv = list(sys.argv)
        entries, rest = option_checks.split_force_yml(argv[1:])
        forced = option_checks.parse_force_yml(entries)
        sys.argv = argv[:1] + rest  # BasicSR must not apply them again (as text)
        try:
            with option_checks.normalizing_yaml(notes, forced, read):
                opt, args = parse_options(root_path, is_train=is_train)
        except yaml.YAMLError as err:
            raise option_checks.OptionError(f'the option file is not valid YAML: {err}') from err
        except UnicodeDecodeError as err:  # e.g. a checkpoint given as -opt
            raise option_checks.OptionError(f'the option file is not UTF-8 text ({err.reason} at byte {err.start}): '
                                            'is -opt a YAML option file?') from err
        except FileNotFoundError as err:
            if err.filename is None or osp.exists(err.filename):
                raise
            raise option_checks.OptionError(f"option file '{err.filename}' does not exist (-opt).") from err
        finally:
            sys.argv = argv
        args.force_yml = entries or None
        _override_roots(opt, read.get('path') or {}, is_train)
        command = 'train' if is_train else 'test'
        notes += option_checks.check_options(opt, command, f"option file '{args.opt}'")
        option_checks.check_sources(opt, command, f"option file '{args.opt}'")
        checks.expect_metrics((opt.get('val') or {}).get('metrics'))  # the SSIM size rule of val/test sets
        if int(opt.get('rank', 0)) == 0:
            option_checks.print_notes(command, notes)
        return opt, args

    wrapped._mambacsr_wrapped = True
    return wrapped


def _user_errors() -> Tuple[type, ...]:
    """Exceptions that mean "fix the option file, the data or the resume state": one line, no traceback."""
    from mambacsr_arch.cli.option_checks import OptionError
    from mambacsr_arch.data.checks import DatasetCheckError
    from mambacsr_arch.data.image_io import ImageFolderError, ImageReadError
    from mambacsr_arch.data.pairing import PairingError
    from mambacsr_arch.errors import ConfigError

    return (ConfigError, OptionError, DatasetCheckError, ImageFolderError, ImageReadError, PairingError,
            UnusableStateError)


def run_pipeline(command: str, argv: Optional[List[str]] = None) -> int:
    """``basicsr train|test``: BasicSR's own ``<command>_pipeline`` with plugins loaded and our fixes installed.

    A bad option file, dataset or resume state (see :func:`_user_errors`), or any
    :class:`~mambacsr_arch.errors.ConfigError` raised later (e.g. while weights load), is printed as
    one line ``basicsr <command>: error: ...`` with exit status 2; a non-finite loss (whose message
    names the checkpoint to resume from) as one line with status 1. Anything else keeps its traceback.
    """
    import importlib

    from mambacsr_arch.errors import EXIT_CONFIG, ConfigError
    from mambacsr_arch.ops import check_environment

    try:
        check_environment()  # MAMBACSR_SCAN_BACKEND / _THREADS, before anything is built
    except ConfigError as err:
        print(f'basicsr {command}: error: {err}', file=sys.stderr, flush=True)
        return EXIT_CONFIG
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    load_plugins()
    patch_basicsr()
    pipeline = getattr(importlib.import_module(f'basicsr.{command}'), f'{command}_pipeline')
    sys.argv = [f'basicsr {command}'] + argv  # BasicSR's parse_options reads sys.argv
    _MADE.clear()  # only this run's folders may be undone
    try:
        pipeline(root_path=os.getcwd())
    except _user_errors() + (FloatingPointError, ) as err:
        print(f'basicsr {command}: error: {err}', file=sys.stderr, flush=True)
        if isinstance(err, FloatingPointError):
            return 1
        undo_made_folders(command)
        return EXIT_CONFIG
    return 0


#: (folder, its archived name or None) of every folder BasicSR's ``mkdir_and_rename`` made in this process
_MADE: List[Tuple[str, Optional[str]]] = []
_RUN_FILES = ('.log', '.yml', '.yaml')  # what a run that failed before its first iteration has written


def record_mkdir_and_rename(mkdir_and_rename: Callable[[str], None]) -> Callable[[str], None]:
    """BasicSR's ``mkdir_and_rename`` (an existing folder is archived as ``<path>_archived_<time>``), recording
    what it made and archived, so that :func:`undo_made_folders` can put a failed start back."""
    if getattr(mkdir_and_rename, '_mambacsr_recorded', False):
        return mkdir_and_rename

    @functools.wraps(mkdir_and_rename)
    def wrapped(path: str) -> None:
        parent = osp.dirname(osp.abspath(path))
        before = set(os.listdir(parent)) if osp.exists(path) else None
        mkdir_and_rename(path)
        archived = None
        if before is not None:
            prefix = f'{osp.basename(osp.abspath(path))}_archived_'
            new = sorted(n for n in set(os.listdir(parent)) - before if n.startswith(prefix))
            archived = osp.join(parent, new[-1]) if new else None
        _MADE.append((path, archived))

    wrapped._mambacsr_recorded = True
    return wrapped


def undo_made_folders(command: str) -> None:
    """After a start that failed with a user error: remove each folder this process made that holds only logs
    and the copied option file, and give an archived earlier run its name back (else a repeated typo archived
    the real experiment again on every try, breaking paths into it). Anything else in the folder keeps it."""
    import shutil

    while _MADE:
        path, archived = _MADE.pop()
        if not osp.isdir(path):
            continue
        files = [osp.join(d, f) for d, _, names in os.walk(path) for f in names]
        if any(not f.endswith(_RUN_FILES) and not osp.basename(f).startswith('events.out.tfevents') for f in files):
            continue
        shutil.rmtree(path)
        back = ''
        if archived and osp.isdir(archived) and not osp.exists(path):
            os.rename(archived, path)
            back = f", and '{osp.basename(archived)}' has its name back"
        print(f"basicsr {command}: note: removed '{path}', made by this failed start{back}.", file=sys.stderr,
              flush=True)


def normalize_argv(argv: List[str]) -> List[str]:
    """Accept ``--local-rank`` (torch.distributed.launch >= 2.0) as BasicSR's ``--local_rank``."""
    return [a.replace('--local-rank', '--local_rank', 1) if a.startswith('--local-rank') else a for a in argv]


def patch_datasets() -> None:
    """Dataset fixes for BasicSR's own datasets, as our ``JPEGDegradedPairedDataset`` already has them (idempotent).

    * ``PairedImageDataset``'s folder and meta-info pairing: BasicSR pairs ``gt/x.png`` only with
      ``lq/x.png`` (same extension), so the authors' ``HR/*.png`` + ``LR_q10/*.jpg`` test sets stop
      with ``AssertionError``; we pair by stem (:mod:`mambacsr_arch.data.pairing`). Its lmdb branch is
      BasicSR's, unchanged.
    * ``FileClient``'s lmdb backend: BasicSR opens a private environment per client, which fails for a
      second dataset over one LMDB in a process; ours shares one (:mod:`mambacsr_arch.data.shared_lmdb`).
    * ``build_dataset`` in BasicSR's train and test pipelines: every val/test dataset is checked against
      ``scale`` when it is built, before the first training iteration (:mod:`mambacsr_arch.data.checks`).
    """
    import basicsr.data.paired_image_dataset as paired_image_dataset
    import basicsr.test as basicsr_test
    import basicsr.train as basicsr_train
    from basicsr.utils.file_client import FileClient

    from mambacsr_arch.data import checks, pairing, shared_lmdb

    paired_image_dataset.paired_paths_from_folder = pairing.paired_paths_from_folder
    paired_image_dataset.paired_paths_from_meta_info_file = pairing.paired_paths_from_meta_info_file
    FileClient._backends['lmdb'] = shared_lmdb.SharedLmdbBackend
    basicsr_train.build_dataset = checks.wrap_build_dataset(basicsr_train.build_dataset)
    basicsr_test.build_dataset = checks.wrap_build_dataset(basicsr_test.build_dataset)


def patch_basicsr() -> None:
    """Install the replacements listed in this module's docstring (idempotent)."""
    import basicsr.test as basicsr_test
    import basicsr.train as basicsr_train
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.misc as misc
    import basicsr.utils.options as options
    from basicsr.models.base_model import BaseModel

    from mambacsr_arch.models.distributed import model_to_device

    misc.mkdir_and_rename = record_mkdir_and_rename(misc.mkdir_and_rename)
    basicsr_train.mkdir_and_rename = record_mkdir_and_rename(basicsr_train.mkdir_and_rename)
    dist_util.init_dist = init_dist
    options.init_dist = init_dist
    basicsr_train.load_resume_state = load_resume_state
    basicsr_train.parse_options = wrap_parse_options(basicsr_train.parse_options)
    basicsr_test.parse_options = wrap_parse_options(basicsr_test.parse_options)
    BaseModel.model_to_device = model_to_device
    patch_datasets()
