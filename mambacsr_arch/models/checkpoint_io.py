"""Crash-safe checkpoint files and the RNG state kept in training states.

:func:`atomic_torch_save` writes through :func:`mambacsr_arch.fileio.atomic_path` (durable): a
hidden temporary file in the target's directory (``.<name>.<pid>.tmp``: never ``*.state``/``*.pth``,
so neither BasicSR's ``--auto_resume`` scan nor ours ever picks it), fsynced, then ``os.replace``-d
over the target, and the directory fsynced. A process killed at any point leaves either the old file or the complete
new one, never a truncated target. A failed write is retried (``SAVE_RETRIES`` attempts, 1 s
apart), then raised as one OSError naming the file (BasicSR 1.4.2 logs and carries on without
the checkpoint; we do not hide that). torch reports a failed write, e.g. a full disk, as a
RuntimeError ("unexpected pos ...", "PytorchStreamWriter failed ..."); that is treated as the
OSError it is. The temporary file is removed after every failed attempt. A process killed
mid-save leaves its temporary file behind; :func:`remove_stale_temp_files` removes those
(``basicsr train`` does it at start-up).

:func:`saved_iterations` and :func:`network_files` describe the experiment layout BasicSR writes
(``models/net_<label>_<iter>.pth``, ``training_states/<iter>.state``).

:func:`capture_rng_state` / :func:`restore_rng_state` hold python ``random`` and numpy's global
RNG as plain ints/tensors, so training states stay loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import errno
import logging
import os
import os.path as osp
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..fileio import atomic_path, temp_path_for  # noqa: F401  (temp_path_for: the pattern cleaned below)
from ..fileio import _TEMP_NAME  # noqa: F401  (the pattern cleaned; tests check it against temp_path_for)
from ..fileio import remove_stale_temp_files as _remove_stale

logger = logging.getLogger('basicsr')
SAVE_RETRIES = 3


def _write_once(obj: Any, path: str) -> None:
    with atomic_path(path, durable=True) as tmp:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)


# torch.save turns an OSError raised by the file's write() into one of these RuntimeErrors
_TORCH_WRITE_FAILURES = ('unexpected pos', 'PytorchStreamWriter failed', 'file write failed')


def _write_failure(err: RuntimeError) -> Optional[OSError]:
    """The OSError behind a RuntimeError from ``torch.save``'s zip writer, or None if it is not a write failure."""
    link: Optional[BaseException] = err
    while link is not None:
        if isinstance(link, OSError):
            return link
        link = link.__cause__ or link.__context__
    if any(marker in str(err) for marker in _TORCH_WRITE_FAILURES):
        return OSError(errno.EIO, f'torch could not write the file ({err}); is the disk full?')
    return None


def atomic_torch_save(obj: Any, path: str, retries: int = SAVE_RETRIES) -> None:
    """``torch.save(obj, path)`` atomically (see module doc); raise OSError after ``retries`` failures."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    last_error: OSError = OSError('no attempt made')
    for attempt in range(1, retries + 1):
        try:
            _write_once(obj, path)
            return
        except OSError as err:  # disk full, NFS hiccup...: retry; anything else is a bug -> raise now
            last_error = err
        except RuntimeError as err:
            write_error = _write_failure(err)
            if write_error is None:
                raise
            last_error = write_error
        logger.warning(f'saving {path} failed (attempt {attempt}/{retries}): {last_error}')
        if attempt < retries:
            time.sleep(1)
    hint = ''
    if last_error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (f' The disk (or quota) holding {osp.dirname(osp.abspath(path))} is full: free space there '
                f'(or point path.experiments_root elsewhere) and resume with --auto_resume.')
    message = f'could not save {path} after {retries} attempts: {last_error}.{hint}'
    if last_error.errno is not None:
        raise OSError(last_error.errno, message) from last_error
    raise OSError(message) from last_error


def remove_stale_temp_files(directory: str) -> List[str]:
    """Remove temporary files of killed saves from ``directory`` (``basicsr train`` calls it at start-up).

    The project's one pid-checked cleaner, :func:`mambacsr_arch.fileio.remove_stale_temp_files`,
    restricted to ``.<name>.pth.<pid>.tmp`` / ``.<name>.state.<pid>.tmp``: only those whose writing
    process is gone are removed (a live one may still be saving). Each removal is logged on the
    ``basicsr`` logger; returns the removed paths.
    """
    return _remove_stale(directory, targets=lambda target: target.endswith(('.pth', '.state')), logger=logger)


def saved_iterations(directory: str, prefix: str, suffix: str) -> List[int]:
    """Iterations ``N`` of the files named exactly ``<prefix>N<suffix>`` in ``directory``, newest first."""
    if not osp.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(suffix):
            stem = name[len(prefix):len(name) - len(suffix)]
            if stem.isdigit():
                found.append(int(stem))
    return sorted(set(found), reverse=True)


def network_files(opt: Dict[str, Any], iteration: int) -> List[str]:
    """The ``models/net_<label>_<iter>.pth`` files a resume from ``iteration`` loads (BasicSR's ``check_resume``)."""
    ignored = (opt.get('path') or {}).get('ignore_resume_networks') or []
    return [osp.join(opt['path']['models'], f"net_{key[len('network_'):]}_{iteration}.pth")
            for key in opt if key.startswith('network_') and key not in ignored]


def capture_rng_state() -> Dict[str, Any]:
    """Python and numpy global RNG states as weights_only-safe objects (ints and int64 tensors)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        'python': {'version': py_version, 'internal': torch.tensor(py_internal, dtype=torch.int64),
                   'gauss': py_gauss},
        'numpy': {'kind': str(np_kind), 'keys': torch.from_numpy(np_keys.astype(np.int64)), 'pos': int(np_pos),
                  'has_gauss': int(np_has_gauss), 'gauss': float(np_gauss)},
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state['python']
    random.setstate((py['version'], tuple(int(v) for v in py['internal'].tolist()), py['gauss']))
    npy = state['numpy']
    keys = npy['keys'].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy['kind'], keys, npy['pos'], npy['has_gauss'], npy['gauss']))
