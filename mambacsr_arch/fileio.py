"""Atomic file writes: the one way this project replaces a file.

Checkpoints, training states, restored images, prepared PNGs, manifests, metric tables, exported
models and demo pictures are all written through :func:`atomic_path`: the content goes to a hidden
temporary file in the target's folder (``.<name>.<pid>.tmp``: never ``*.pth``/``*.state``/an image
extension, so no folder scan of ours or BasicSR's picks it up), which is then ``os.replace``-d over
the target. A process killed at any point leaves either the old file or the complete new one; a
failed write removes its temporary file and leaves the old file untouched. ``durable=True``
also fsyncs the file and its folder, so the rename survives a power loss (checkpoints).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Union

__all__ = ['temp_path_for', 'atomic_path', 'write_bytes_atomic', 'fsync_dir']

PathLike = Union[str, os.PathLike]


def temp_path_for(path: PathLike) -> str:
    """The hidden temporary file used while writing ``path``: ``<folder>/.<name>.<pid>.tmp``."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f'.{name}.{os.getpid()}.tmp')


def fsync_dir(directory: PathLike) -> None:
    """fsync a folder so a rename in it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path to write; on normal exit it replaces ``path``, on an exception it is removed.

    Example::

        with atomic_path('out.png') as tmp:
            cv2.imwrite(tmp, img)   # any writer that takes a path
    """
    target = os.path.abspath(os.fspath(path))
    tmp = temp_path_for(target)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(target))


def write_bytes_atomic(path: PathLike, data, durable: bool = False) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, durable) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)
