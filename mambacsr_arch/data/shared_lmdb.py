"""One read-only LMDB environment per database and process, shared by every dataset that reads it.

LMDB (and py-lmdb >= 1.x's guard, ``lmdb.Error: The environment ... is already open in this
process``) forbids opening one environment twice in a process. BasicSR 1.4.2's ``LmdbBackend``
calls ``lmdb.open`` once per ``FileClient``, so two datasets over one LMDB in one process -- an
on-the-fly JPEG training set and its validation set built from the same GT LMDB with
``num_worker_per_gpu: 0`` -- crash on the second open.

:func:`open_shared_env` keeps a process-wide cache keyed by the database's real path.
:class:`SharedLmdbBackend` (BasicSR's ``LmdbBackend`` interface) looks its environments up there on
each read, so a dataset object that crossed a ``fork`` (DataLoader workers) never uses the
parent's environment: an entry opened by another process id is closed in the child (only the
child's copy: fcntl locks are per process and not inherited) and the database opened afresh.
Spawned workers start with an empty cache. The backend holds no environment, so it pickles.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Sequence, Tuple, Union

from basicsr.utils.file_client import LmdbBackend

__all__ = ['open_shared_env', 'SharedLmdbBackend']

# real path -> (pid that opened it, environment, open options)
_ENVS: Dict[str, Tuple[int, Any, Tuple[Tuple[str, Any], ...]]] = {}
_LOCK = threading.Lock()


def _new_lock_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a lock held by another thread at fork time would never be released here


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def open_shared_env(path: Union[str, os.PathLike], readonly: bool = True, lock: bool = False,
                    readahead: bool = False, **kwargs: Any):
    """The process's ``lmdb.Environment`` for ``path``, opened on first use with these options.

    A second caller with the same options gets the same environment; one with different options
    gets a ``ValueError`` naming both sets (the first opener's options would otherwise win silently).
    """
    import lmdb

    path = os.fspath(path)
    real = os.path.realpath(path)
    options = tuple(sorted(dict(kwargs, readonly=readonly, lock=lock, readahead=readahead).items()))
    pid = os.getpid()
    with _LOCK:
        entry = _ENVS.get(real)
        if entry is not None and entry[0] != pid:
            entry[1].close()  # inherited through fork: LMDB environments must not cross a fork
            del _ENVS[real]
            entry = None
        if entry is not None:
            if entry[2] != options:
                raise ValueError(f"LMDB '{path}' is already open in this process with io_backend options "
                                 f'{dict(entry[2])}; another dataset asks for {dict(options)}. Datasets reading '
                                 'one LMDB share its environment: give them the same io_backend options.')
            return entry[1]
        try:
            env = lmdb.open(path, readonly=readonly, lock=lock, readahead=readahead, **kwargs)
        except lmdb.Error as err:
            raise lmdb.Error(f"cannot open LMDB '{path}': {err}") from err
        _ENVS[real] = (pid, env, options)
        return env


class SharedLmdbBackend(LmdbBackend):
    """BasicSR's ``LmdbBackend`` (same arguments and ``get``) over :func:`open_shared_env`.

    ``__init__`` deliberately does not call ``LmdbBackend.__init__``: that opens a private
    environment per backend, the very thing that fails for a second dataset.
    """

    def __init__(self, db_paths: Union[str, Sequence[str]], client_keys: Union[str, Sequence[str]] = 'default',
                 readonly: bool = True, lock: bool = False, readahead: bool = False, **kwargs: Any) -> None:
        keys: List[str] = [client_keys] if isinstance(client_keys, str) else list(client_keys)
        paths = [os.fspath(db_paths)] if isinstance(db_paths, (str, os.PathLike)) else [os.fspath(p) for p in db_paths]
        if len(keys) != len(paths):
            raise ValueError(f'io_backend lmdb: client_keys {keys} and db_paths {paths} must have the same length.')
        self.db_paths = paths
        self._paths = dict(zip(keys, paths))
        self._options = dict(kwargs, readonly=readonly, lock=lock, readahead=readahead)
        for key in keys:  # open now, so a missing or broken database fails where it is configured
            self._env(key)

    def _env(self, client_key: str):
        if client_key not in self._paths:
            raise KeyError(f"io_backend lmdb: no database for client key '{client_key}' "
                           f'(known: {sorted(self._paths)}).')
        return open_shared_env(self._paths[client_key], **self._options)

    def get(self, filepath: Any, client_key: str):
        """The bytes stored under key ``filepath`` in the database ``client_key`` (None if absent)."""
        with self._env(client_key).begin(write=False) as txn:
            return txn.get(str(filepath).encode('ascii'))
