"""Getting a training run back on its feet: where to resume after a non-finite loss, and the
option file's optimizer settings over the ones a resume restores.

Non-finite loss. Weights usually blow up a few iterations before the loss turns NaN/inf, so
"the last checkpoint" may already be ruined. :func:`non_finite_advice` reads the saved
checkpoints newest first (``models/net_<label>_<iter>.pth`` with ``training_states/<iter>.state``)
and names the newest one whose weights are all finite and at most :data:`DIVERGED_WEIGHT` in
magnitude, with the exact ``basicsr train`` command that resumes from it at a 10x lower
learning rate (``--force_yml path:resume_state=... train:optim_g:lr=...``; the rate given there
or in the option file wins over the one stored in the state, see below).

Option file over restored state. BasicSR's ``resume_training`` loads each optimizer's state dict,
hyper-parameters included, and each scheduler's, so after editing ``train.optim_g.lr`` (or betas,
weight_decay...) a resume silently kept the old values. :func:`option_hyperparameters` takes the
optimizers' settings as built from the option file (before the restore);
:func:`apply_option_hyperparameters` then puts back every one that differs from the restored
value, each logged as a warning. The learning rate is compared as the *base* rate
(``initial_lr``, what the schedulers start from): the group's ``initial_lr`` and the schedulers'
``base_lrs`` take the new value and the current rate is rescaled by new/old, so
MultiStepRestartLR keeps the decays already passed and CosineAnnealingRestartLR follows the new
base from its next step. Scheduler settings (milestones, periods, gamma) and the iteration count
are still restored from the state.
"""
from __future__ import annotations

import logging
import math
import os.path as osp
import shlex
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .checkpoint_io import network_files, saved_iterations
from .weights import read_checkpoint

logger = logging.getLogger('basicsr')
# Weights of SR networks trained at sane rates stay below ~10 (MambaCSR's dt bias init is ~7); a
# tiny MSRResNet whose weights reach 1e5 already overflows float32 in its forward pass.
DIVERGED_WEIGHT = 1e4


def _tensors(obj: Any):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)


def weights_problem(path: str) -> Optional[str]:
    """Why the network file ``path`` is no place to resume from, or None if its weights look sane."""
    if not osp.isfile(path):
        return f'{osp.basename(path)} is missing'
    try:
        checkpoint = read_checkpoint(path)
    except RuntimeError as err:
        return str(err)
    largest = 0.0
    for tensor in _tensors(checkpoint):
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if not bool(torch.isfinite(tensor).all()):
            return f'{osp.basename(path)} holds non-finite weights'
        largest = max(largest, float(tensor.detach().abs().max()))
    if largest > DIVERGED_WEIGHT:
        return f'{osp.basename(path)} has diverged (largest |weight| {largest:.3g})'
    return None


def newest_healthy_checkpoint(opt: Dict[str, Any]) -> Tuple[Optional[int], List[str]]:
    """Newest iteration with a training state and sane network files, and why newer ones were passed over."""
    states_dir = (opt.get('path') or {}).get('training_states')
    passed: List[str] = []
    if not states_dir or not (opt.get('path') or {}).get('models'):
        return None, passed
    for iteration in saved_iterations(states_dir, '', '.state'):
        problems = [p for p in map(weights_problem, network_files(opt, iteration)) if p]
        if not problems:
            return iteration, passed
        passed.append(f'{iteration}: ' + '; '.join(problems))
    return None, passed


def _option_file_from_argv(argv: Sequence[str]) -> Optional[str]:
    for index, arg in enumerate(argv):
        if arg == '-opt' and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith('-opt='):
            return arg[len('-opt='):]
    return None


def resume_command(opt: Dict[str, Any], state_path: str, lr: Optional[float]) -> str:
    """The ``basicsr train`` command resuming from ``state_path`` (at learning rate ``lr`` if given)."""
    option_file = _option_file_from_argv(sys.argv) or '<your option file>'
    forced = [f'path:resume_state={osp.abspath(state_path)}']
    if lr is not None:
        forced.append(f"train:optim_g:lr={np.format_float_positional(lr, trim='-')}")
    if '=' in osp.abspath(state_path):  # BasicSR's --force_yml splits on '='
        return (f"set path.resume_state: {osp.abspath(state_path)} in {option_file}"
                + (f' and train.optim_g.lr: {lr:g}' if lr is not None else '')
                + ', then run basicsr train -opt ' + shlex.quote(option_file))
    command = ' '.join(['basicsr', 'train', '-opt', shlex.quote(option_file), '--force_yml']
                       + [shlex.quote(f) for f in forced])
    if opt.get('dist', False):
        command += '  (launched as this run was: torchrun/slurm and --launcher)'
    return command


def non_finite_advice(opt: Dict[str, Any]) -> str:
    """What to do after a non-finite loss: the checkpoint to resume from and the command (see module doc)."""
    lr = ((opt.get('train') or {}).get('optim_g') or {}).get('lr')
    lower = float(lr) / 10 if isinstance(lr, (int, float)) else None
    iteration, passed = newest_healthy_checkpoint(opt)
    skipped = f" (newer ones passed over: {'; '.join(passed)})" if passed else ''
    if iteration is None:
        where = (opt.get('path') or {}).get('training_states') or 'path.training_states'
        checked = f"checked: {'; '.join(passed)}" if passed else f'none saved in {where}'
        return (f'No saved checkpoint has finite weights at most {DIVERGED_WEIGHT:g} in magnitude ({checked}). '
                f'Start a new run with a lower train.optim_g.lr'
                + (f' (e.g. {lower:g})' if lower is not None else '')
                + ', check the training data, or disable train.use_amp.')
    state_path = osp.join(opt['path']['training_states'], f'{iteration}.state')
    files = ' + '.join(network_files(opt, iteration) + [state_path])
    return (f'The newest checkpoint with finite weights at most {DIVERGED_WEIGHT:g} in magnitude is iteration '
            f'{iteration}: {files}{skipped}. Resume from it with a 10x lower learning rate (the rate given '
            f'there overrides the one stored in the state; do not add --auto_resume, which takes the newest '
            f'state):\n  {resume_command(opt, state_path, lower)}\n'
            f'Also check the training data, or disable train.use_amp.')


# ----------------------------------------------------------------------------------------- option file wins
def named_optimizers(model: Any) -> List[Tuple[str, torch.optim.Optimizer]]:
    """``(option key, optimizer)`` pairs: BasicSR's ``self.optimizer_<x>`` is built from ``train.optim_<x>``."""
    train_opt = model.opt.get('train') or {}
    return [('optim_' + attr[len('optimizer_'):], value) for attr, value in vars(model).items()
            if attr.startswith('optimizer_') and isinstance(value, torch.optim.Optimizer)
            and isinstance(train_opt.get('optim_' + attr[len('optimizer_'):]), Mapping)]


def _hyperparameters(group: Mapping[str, Any]) -> Dict[str, Any]:
    values = {k: v for k, v in group.items() if k not in ('params', 'lr', 'initial_lr', 'param_names')}
    values['lr'] = group.get('initial_lr', group['lr'])  # the base rate; 'lr' itself follows the schedule
    return values


def option_hyperparameters(model: Any) -> Dict[str, List[Dict[str, Any]]]:
    """Each optimizer's param-group settings as built from the option file (call before the restore)."""
    return {key: [_hyperparameters(g) for g in optimizer.param_groups] for key, optimizer in named_optimizers(model)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


def _rebase_lr(optimizer: torch.optim.Optimizer, schedulers: Sequence[Any], index: int, new: float,
               old: float) -> None:
    group = optimizer.param_groups[index]
    group['lr'] = group['lr'] * new / old if old else new
    if 'initial_lr' in group:
        group['initial_lr'] = new
    for scheduler in schedulers:
        scheduler.base_lrs[index] = new
        last = getattr(scheduler, '_last_lr', None)
        if last is not None and index < len(last):
            last[index] = group['lr']


def apply_option_hyperparameters(model: Any, wanted: Dict[str, List[Dict[str, Any]]], state_path: str) -> List[str]:
    """Put the option file's optimizer settings back over the restored ones; returns the warnings logged."""
    messages = []
    for key, optimizer in named_optimizers(model):
        schedulers = [s for s in getattr(model, 'schedulers', []) if getattr(s, 'optimizer', None) is optimizer]
        groups = optimizer.param_groups
        for index, (fresh, group) in enumerate(zip(wanted.get(key, []), groups)):
            restored = _hyperparameters(group)
            for name, value in fresh.items():
                if name not in restored or _same(value, restored[name]):
                    continue
                if name == 'lr':
                    _rebase_lr(optimizer, schedulers, index, float(value), float(restored['lr']))
                else:
                    group[name] = value
                where = f' (param group {index})' if len(groups) > 1 else ''
                messages.append(f'train.{key}.{name} {value} from the option file overrides {restored[name]} '
                                f'restored from {state_path}{where}'
                                + (f"; the current rate is now {group['lr']:.6g}" if name == 'lr' else '') + '.')
    for message in messages:
        logger.warning(message)
    return messages
