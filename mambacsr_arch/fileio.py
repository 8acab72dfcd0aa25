"""Atomic file writes: the one way this project replaces a file, writes an image, cleans up after a kill.

Checkpoints, training states, restored images, prepared PNGs, manifests, metric tables, exported
models and demo pictures are all written through :func:`atomic_path`: the content goes to a hidden
temporary file in the target's folder (``.<name>.<pid>.tmp``: never ``*.pth``/``*.state``/an image
extension, so no folder scan of ours or BasicSR's picks it up), which is then ``os.replace``-d over
the target. A process killed at any point leaves either the old file or the complete new one; a
failed write removes its temporary file and leaves the old file untouched. ``durable=True``
also fsyncs the file and its folder, so the rename survives a power loss (checkpoints).

* :func:`write_image_atomic`: the one image writer (encode by the file's extension, then
  :func:`write_bytes_atomic`); returns the SHA-256 of the bytes written (infer records it).
* :func:`atomic_dir`: the same for a folder built by a library that insists on creating it itself
  (BasicSR's LMDB writer): built under ``.<name>.<pid>.tmp<ext>``, then renamed into place.
* :func:`remove_stale_temp_files`: the one cleaner of temporaries left by a killed process. It
  removes a ``.<name>.<pid>.tmp`` file or folder only when process ``pid`` is gone, so a run
  starting beside a live one never deletes what that one is writing.
* :func:`folder_lock`: an advisory lock (``fcntl.flock``) held by one process at a time, used around
  read-merge-write of a shared record and to keep two runs out of one output folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from typing import Callable, Iterator, List, Optional, Sequence, Union

__all__ = ['temp_path_for', 'atomic_path', 'write_bytes_atomic', 'fsync_dir', 'encode_image', 'write_image_atomic',
           'atomic_dir', 'remove_stale_temp_files', 'process_alive', 'folder_lock', 'FolderLocked']

PathLike = Union[str, os.PathLike]


def temp_path_for(path: PathLike, keep_extension: bool = False) -> str:
    """The hidden temporary file used while writing ``path``: ``<folder>/.<name>.<pid>.tmp``.

    ``keep_extension=True`` appends the target's extension again (``.x.lmdb.<pid>.tmp.lmdb``), for
    writers that check it; :func:`remove_stale_temp_files` knows both forms.
    """
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    ext = os.path.splitext(name)[1] if keep_extension else ''
    return os.path.join(directory, f'.{name}.{os.getpid()}.tmp{ext}')


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


def encode_image(img, ext: str, params: Optional[Sequence[int]] = None):
    """``img`` (uint8/uint16 numpy array, BGR/BGRA/gray) encoded as ``ext`` (``'.png'``...) by OpenCV.

    Returns the encoded buffer (a uint8 numpy array); raises OSError when OpenCV cannot encode it.
    """
    import cv2

    ext = ext if ext.startswith('.') else f'.{ext}'
    try:
        ok, encoded = cv2.imencode(ext, img, list(params or []))
    except cv2.error as err:
        raise OSError(f"cannot encode a {getattr(img, 'shape', '?')} {getattr(img, 'dtype', '?')} image as "
                      f"'{ext}': {err}") from err
    if not ok:
        raise OSError(f"cannot encode a {getattr(img, 'shape', '?')} image as '{ext}' (cv2.imencode failed)")
    return encoded


def write_image_atomic(path: PathLike, img, params: Optional[Sequence[int]] = None) -> str:
    """The one image writer: encode ``img`` by ``path``'s extension, write it atomically; returns its SHA-256.

    Args:
        img: uint8 (or uint16 for PNG/TIFF) numpy array, ``(H, W)``, ``(H, W, 3)`` BGR or ``(H, W, 4)`` BGRA.
        params: OpenCV ``imencode`` flags, e.g. ``[cv2.IMWRITE_PNG_COMPRESSION, 3]``.
    Raises:
        OSError: naming ``path``, when the image cannot be encoded or written.
    """
    path = os.fspath(path)
    try:
        encoded = encode_image(img, os.path.splitext(path)[1], params)
    except OSError as err:
        raise OSError(f'{path}: {err}') from err
    write_bytes_atomic(path, encoded.data)  # no extra copy of a large image
    return hashlib.sha256(encoded.data).hexdigest()


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
    """Yield a not-yet-existing hidden folder path to build; on normal exit it replaces the folder ``path``.

    The temporary is ``.<name>.<pid>.tmp<ext>`` (the extension kept: BasicSR's LMDB writer checks it).
    A folder cannot be renamed over a non-empty one, so an existing ``path`` is first renamed aside
    (``.<name>.<pid>.old``) and removed once the new one is in place; a failure removes the temporary.
    """
    target = os.path.abspath(os.fspath(path))
    tmp = temp_path_for(target, keep_extension=True)
    _remove_tree(tmp)
    try:
        yield tmp
        old = None
        if os.path.lexists(target):
            old = os.path.join(os.path.dirname(target), f'.{os.path.basename(target)}.{os.getpid()}.old')
            _remove_tree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _remove_tree(old)
    except BaseException:
        _remove_tree(tmp)
        raise


def _remove_tree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts as gone: it is not writing while it cleans up).

    On Windows this always answers False; a file still open there cannot be removed and is kept.
    """
    if pid == os.getpid() or os.name == 'nt':
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


# .<target>.<pid>.tmp (temp_path_for) or .<target>.<pid>.tmp<ext> (keep_extension) or .<target>.<pid>.old (atomic_dir)
_TEMP_NAME = re.compile(r'^\.(?P<target>.+)\.(?P<pid>\d+)\.(?:tmp(?:\.[^.]+)?|old)$')


def remove_stale_temp_files(directory: PathLike, targets: Optional[Callable[[str], bool]] = None,
                            logger: Optional[logging.Logger] = None) -> List[str]:
    """Remove the temporaries of killed writers (:func:`temp_path_for`'s names) from ``directory``.

    Only ``.<target>.<pid>.tmp`` files and folders (and :func:`atomic_dir`'s ``.old`` / ``.tmp<ext>``)
    are touched, only those whose ``targets(target)`` is true (default: all), and only when process
    ``pid`` is gone: a live writer (another run in the same folder) keeps its temporary. Each removal
    and each kept file is logged on ``logger`` (if given). Returns the removed paths.
    """
    directory = os.fspath(directory)
    removed: List[str] = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        match = _TEMP_NAME.match(name)
        if match is None or (targets is not None and not targets(match.group('target'))):
            continue
        path, pid = os.path.join(directory, name), int(match.group('pid'))
        if process_alive(pid):
            if logger is not None:
                logger.warning(f'keeping {path}: process {pid}, which writes it, is still running.')
            continue
        try:
            _remove_tree(path)
        except OSError as err:
            if logger is not None:
                logger.warning(f'could not remove the stale temporary file {path}: {err}')
            continue
        if logger is not None:
            logger.warning(f'removed {path}: the unfinished write of {match.group("target")} by a killed process '
                           f'{pid} (the previous complete file, if any, is untouched).')
        removed.append(path)
    return removed


class FolderLocked(OSError):
    """:func:`folder_lock` with ``wait=False`` found the lock held; ``holder`` is that process's pid (or None)."""

    def __init__(self, path: str, holder: Optional[int]) -> None:
        super().__init__(f'{path} is locked by process {holder if holder is not None else "(unknown)"}')
        self.path, self.holder = path, holder


@contextlib.contextmanager
def folder_lock(lock_file: PathLike, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_file`` (created; this process's pid written in it).

    ``lock_file`` may be an existing folder: the folder itself is locked (nothing is created in it,
    no pid recorded), for records whose folder must stay free of extra files. ``wait=False`` raises
    :class:`FolderLocked` (naming the holder's pid) instead of waiting. The lock
    ends with the ``with`` block or with the process (the kernel drops it on a kill), so a stale lock
    file never blocks anyone; the file itself is left in place (removing it would race with a waiter).
    Where ``fcntl`` does not exist (Windows) this is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = os.fspath(lock_file)
    is_dir = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY) if is_dir else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            try:
                holder_text = '' if is_dir else os.pread(fd, 32, 0).decode('ascii', 'replace').strip()
            except OSError:
                holder_text = ''
            raise FolderLocked(path, int(holder_text) if holder_text.isdigit() else None) from None
        if not is_dir:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f'{os.getpid()}\n'.encode('ascii'), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
