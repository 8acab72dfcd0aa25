"""Crash-safe checkpoint files and the RNG state kept in training states.

:func:`atomic_torch_save` writes to a hidden temporary file in the target's directory
(``.<name>.<pid>.tmp``: never ``*.state``/``*.pth``, so neither BasicSR's ``--auto_resume`` scan
nor ours ever picks it), flushes and fsyncs it, then ``os.replace``-s it over the target and
fsyncs the directory. A process killed at any point leaves either the old file or the complete
new one, never a truncated target. A failed write is retried, then raised (BasicSR 1.4.2 logs
and carries on without the checkpoint; we do not hide that).

:func:`capture_rng_state` / :func:`restore_rng_state` hold python ``random`` and numpy's global
RNG as plain ints/tensors, so training states stay loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Dict

import numpy as np
import torch

logger = logging.getLogger('basicsr')
SAVE_RETRIES = 3


def _fsync_dir(directory: str) -> None:
    """fsync a directory so a rename in it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def temp_path_for(path: str) -> str:
    """The temporary file name used while writing ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f'.{name}.{os.getpid()}.tmp')


def _write_once(obj: Any, path: str) -> None:
    tmp = temp_path_for(path)
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_torch_save(obj: Any, path: str, retries: int = SAVE_RETRIES) -> None:
    """``torch.save(obj, path)`` atomically (see module doc); raise OSError after ``retries`` failures."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    last_error: Exception = OSError('no attempt made')
    for attempt in range(1, retries + 1):
        try:
            _write_once(obj, path)
            return
        except OSError as err:  # disk full, NFS hiccup...: retry; anything else is a bug -> raise now
            last_error = err
            logger.warning(f'saving {path} failed (attempt {attempt}/{retries}): {err}')
            if attempt < retries:
                time.sleep(1)
    raise OSError(f'could not save {path} after {retries} attempts: {last_error}') from last_error


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
