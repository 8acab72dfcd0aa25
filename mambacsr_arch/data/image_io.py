"""Robust image decoding: file path or encoded bytes -> uint8 BGR ``(H, W, 3)``.

One place that decides what the project does with unusual inputs, shared by the CSR dataset,
``basicsr prepare-csr`` and ``basicsr infer``:

* 8-bit colour: decoded exactly as BasicSR's ``imfrombytes`` (``cv2.IMREAD_COLOR``, so the
  EXIF orientation of JPEGs is applied); an ordinary image gives the same array either way.
* grayscale (1 channel): replicated to 3 equal BGR channels.
* alpha (RGBA / gray+alpha): the alpha channel is **dropped**, not composited, the same
  behaviour as ``cv2.imread`` and every BasicSR dataset, so a GT read here and one read by
  ``PairedImageDataset`` never disagree.
* 16-bit: scaled to 8 bits with rounding, ``round(v * 255 / 65535)`` (65535 -> 255).
* corrupt, truncated, empty or float (HDR/EXR/float TIFF) input: one :class:`ImageReadError`
  naming the file and the problem. Nothing is guessed.

:func:`read_image_with_layout` returns the same array plus the file's own :class:`ImageLayout`
(channels, alpha, bit depth), for callers that must say what the conversion dropped (``basicsr
infer`` notes it once per run) or that feed one-channel networks (a gray file is exactly channel 0).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np

__all__ = ['ImageReadError', 'ImageFolderError', 'IMAGE_EXTENSIONS', 'read_image_bgr8', 'decode_image_bgr8', 'to_bgr8',
           'list_image_files', 'iter_folder_files', 'ImageLayout', 'read_image_with_layout']

#: File suffixes (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pnm')

_JPEG_SOI = b'\xff\xd8'
_JPEG_EOI = b'\xff\xd9'


class ImageReadError(ValueError):
    """An image could not be read or decoded; the message names the file and the problem."""


def to_bgr8(img: np.ndarray, name: str = '<array>') -> np.ndarray:
    """Normalise a decoded ``(H, W)`` / ``(H, W, C)`` uint8/uint16 array to uint8 BGR ``(H, W, 3)``.

    ``C`` may be 1, 3 or 4 (alpha dropped). Raises :class:`ImageReadError` for other layouts/dtypes.
    """
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ImageReadError(f'{name}: unsupported image layout {img.shape}; expected (H, W), (H, W, 1), '
                             '(H, W, 3) or (H, W, 4).')
    if img.dtype == np.uint16:
        # round(v * 255 / 65535) == round(v / 257), done exactly in integers
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f'{name}: unsupported pixel type {img.dtype}; only 8-bit and 16-bit integer '
                             'images are supported (convert float/HDR images to 8-bit PNG first).')
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageReadError(f'{name}: image has zero size {img.shape}.')
    return np.ascontiguousarray(img)


def decode_image_bgr8(content: Union[bytes, bytearray, memoryview, np.ndarray], name: str = '<bytes>') -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF, WebP...) to uint8 BGR ``(H, W, 3)``.

    Args:
        content: the encoded file content.
        name: shown in error messages (a path or an LMDB key).
    Raises:
        ImageReadError: empty, corrupt, truncated JPEG, or unsupported pixel type.
    """
    if content is None:
        raise ImageReadError(f'{name}: no data (missing file or LMDB key).')
    buf = np.frombuffer(content, dtype=np.uint8) if not isinstance(content, np.ndarray) else content.reshape(-1)
    if buf.size == 0:
        raise ImageReadError(f'{name}: file is empty (0 bytes).')
    head = buf[:2].tobytes()
    if head == _JPEG_SOI and buf[-4096:].tobytes().rfind(_JPEG_EOI) < 0 and buf.tobytes().rfind(_JPEG_EOI) < 0:
        # libjpeg fills a truncated scan with grey and only warns: refuse rather than train on it
        raise ImageReadError(f'{name}: truncated JPEG (no end-of-image marker); the file is incomplete.')
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as err:
        raise ImageReadError(f'{name}: cannot decode image ({err}).') from err
    if img is None:
        raise ImageReadError(f'{name}: cannot decode image (corrupt, truncated or not an image format '
                             'OpenCV reads).')
    return to_bgr8(img, name)


def read_image_bgr8(path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview],
                    name: Optional[str] = None) -> np.ndarray:
    """Read an image file (or decode bytes) to uint8 BGR ``(H, W, 3)``; see the module doc for the rules.

    Args:
        path_or_bytes: a file path, or the encoded bytes of an image.
        name: label for error messages; defaults to the path (or ``'<bytes>'``).
    Raises:
        ImageReadError: missing/unreadable file or any decoding problem, naming the file.
    """
    if isinstance(path_or_bytes, (str, os.PathLike)):
        label = name or os.fspath(path_or_bytes)
        return decode_image_bgr8(_read_bytes(path_or_bytes, label), label)
    return decode_image_bgr8(path_or_bytes, name or '<bytes>')


def _read_bytes(path: Union[str, os.PathLike], label: str) -> bytes:
    """The file's bytes; :class:`ImageReadError` naming ``label`` when it cannot be read."""
    try:
        with open(os.fspath(path), 'rb') as f:
            return f.read()
    except OSError as err:
        raise ImageReadError(f'{label}: cannot read file ({err.strerror or err}).') from err


@dataclass(frozen=True)
class ImageLayout:
    """What a file holds before :func:`to_bgr8`: ``channels`` (1 gray, 3 colour), ``alpha``, ``bit_depth`` (8, 16)."""
    channels: int
    alpha: bool
    bit_depth: int

    @property
    def gray(self) -> bool:
        return self.channels == 1


def read_image_with_layout(path: Union[str, os.PathLike], name: Optional[str] = None
                           ) -> Tuple[np.ndarray, ImageLayout]:
    """:func:`read_image_bgr8` (the same array, bit for bit) and the file's :class:`ImageLayout`.

    The layout comes from a second decode with ``cv2.IMREAD_UNCHANGED`` (OpenCV has no header-only
    read); gray+alpha files are reported as ``channels=1, alpha=True``.
    """
    label = name or os.fspath(path)
    content = _read_bytes(path, label)
    img = decode_image_bgr8(content, label)
    raw = cv2.imdecode(np.frombuffer(content, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:  # decodable as colour but not unchanged: nothing more to tell
        return img, ImageLayout(3, False, 8)
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    bit_depth = 16 if raw.dtype == np.uint16 else 8
    if channels == 4:  # OpenCV reports gray+alpha PNGs as BGRA with three equal channels
        colour = raw[:, :, :3]
        gray = bool((colour[:, :, 0] == colour[:, :, 1]).all() and (colour[:, :, 1] == colour[:, :, 2]).all())
        return img, ImageLayout(1 if gray else 3, True, bit_depth)
    return img, ImageLayout(1 if channels == 1 else 3, False, bit_depth)


class ImageFolderError(ValueError):
    """A folder of images cannot be listed (missing, unreadable, a symbolic-link loop); names the path."""


def iter_folder_files(folder: Union[str, os.PathLike], recursive: bool = False) -> Iterator[str]:
    """Paths of the regular files under ``folder`` (dotfiles skipped), relative to ``folder``.

    The one folder walker of the project (infer, eval, prepare-csr and the datasets list through it).
    It never follows a symbolic link into a folder it has already entered, and it reports instead of
    crashing on what ``os.scandir`` would raise deep inside a run:

    * an entry that is a symbolic-link loop or points at nothing (``x.png -> x.png``): skipped only if
      its name is not an image's (see :data:`IMAGE_EXTENSIONS`), otherwise :class:`ImageFolderError`
      naming it, since a user who put ``x.png`` there expects it to be used;
    * a sub-folder link back to an ancestor (``d/loop -> d``), with ``recursive=True``: not entered
      again (every real folder is walked once);
    * a missing or unreadable ``folder``: :class:`ImageFolderError` naming it.

    Order is the file system's; callers sort.
    """
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise ImageFolderError(f"'{root}' is not a folder (it does not exist, or is a file).")
    seen = set()
    pending = ['']
    while pending:
        rel_dir = pending.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        real = os.path.realpath(abs_dir)
        if real in seen:
            continue  # a link back to a folder already walked (a loop, or a second way in)
        seen.add(real)
        try:
            entries = list(os.scandir(abs_dir))
        except OSError as err:
            raise ImageFolderError(f"cannot list folder '{abs_dir}': {err.strerror or err}.") from err
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith('.'):
                continue
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
                if not is_dir and not is_file and entry.is_symlink():
                    os.stat(entry.path)  # dangling link: FileNotFoundError; loop: ELOOP
            except OSError as err:
                if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    kind = 'a symbolic-link loop' if err.errno == errno.ELOOP else 'a broken symbolic link'
                    raise ImageFolderError(f"'{entry.path}' is {kind} ({err.strerror or err}): fix or remove "
                                           'it.') from err
                continue
            if is_dir:
                if recursive:
                    pending.append(rel)
            elif is_file:
                yield rel


def list_image_files(folder: Union[str, os.PathLike], recursive: bool = False) -> List[str]:
    """Image files inside ``folder`` (dotfiles skipped), as full paths; see :func:`iter_folder_files`.

    Only names ending in one of :data:`IMAGE_EXTENSIONS` (any case) are kept. Sorted by stem, then
    name, so the order is the same on every file system and matches sorted LMDB keys. Raises
    :class:`ImageFolderError` for a missing folder or an image name that is a broken link / link loop.
    """
    folder = os.fspath(folder)
    names = [n for n in iter_folder_files(folder, recursive) if n.lower().endswith(IMAGE_EXTENSIONS)]
    names.sort(key=lambda n: (os.path.splitext(n)[0], n))
    return [os.path.join(folder, n) for n in names]
