"""What ``basicsr infer`` writes and how it keeps track: the output plan, the manifest, image layouts.

* :func:`plan_outputs`: every input mapped to its output before anything is built or written, and
  the plans that could harm an input refused (see :mod:`mambacsr_arch.cli.infer`, "Output plan").
* The manifest (:data:`MANIFEST_NAME` in the output folder, ``{output name: {'input', 'sha256'}}``):
  what infer wrote there. Several ``basicsr infer`` runs may write into one folder at once, so the
  manifest is only ever changed by :func:`record_outputs`: under an exclusive ``flock`` of the output
  folder itself (:func:`mambacsr_arch.fileio.folder_lock`; no lock file is left behind) it re-reads
  the manifest on disk, merges the new entries into it and replaces it atomically. No writer's record
  is lost, whatever the interleaving; a reader without the lock always sees a complete file.
* :func:`existing_output`: what an output already on disk is: ``'recorded'`` (infer wrote these very
  bytes: skipped); ``'damaged'`` (infer recorded it, its bytes' SHA-256 now differs and it no longer
  decodes as a whole image: cut short by a full disk or an interrupted copy: written again, and the
  run says so once); ``'edited'`` (recorded, bytes differ, but a complete image: someone edited or
  replaced it on purpose: kept, the run says so once); ``'foreign'`` (never recorded: kept). Only
  ``--overwrite`` replaces an edited or foreign file.
* :class:`LayoutNotes` / :func:`network_input`: how a decoded image meets the network's channels
  (documented in :mod:`mambacsr_arch.cli.infer`, "Image layouts"), and the one note per kind of
  conversion printed at the end of a run.
"""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mambacsr_arch.errors import ConfigError
from mambacsr_arch.fileio import folder_lock, write_bytes_atomic

__all__ = ['MANIFEST_NAME', 'OutputPlanError', 'OutputPlan', 'output_path', 'sha256_of_file', 'read_manifest',
           'write_manifest', 'record_outputs', 'plan_outputs', 'existing_output', 'network_channels',
           'network_input', 'LayoutNotes']

MANIFEST_NAME = '.basicsr-infer.json'  # in the output folder; a dotfile, so never listed as an image


class OutputPlanError(ConfigError):
    """An output plan that would harm an input, or an unreadable manifest; the message names the files and fix."""


def output_path(input_path: str, out_dir: str, suffix: str, ext: str) -> str:
    """``out_dir/<input stem><suffix>.<ext>``."""
    stem = osp.splitext(osp.basename(input_path))[0]
    return osp.join(out_dir, f'{stem}{suffix}.{ext}')


def sha256_of_file(path: str) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- manifest


def read_manifest(out_dir: str) -> Dict[str, Dict[str, str]]:
    """``{output name: {'input': name, 'sha256': hex}}`` from ``out_dir``'s :data:`MANIFEST_NAME` ({} if none).

    Raises :class:`OutputPlanError` for a manifest that cannot be read or is not one of ours.
    """
    path = osp.join(out_dir, MANIFEST_NAME)
    if not osp.lexists(path):
        return {}
    fix = f"delete '{path}' (infer then treats every image in that folder as a user's input)"
    try:
        with open(path, encoding='utf-8') as f:
            payload = json.load(f)
    except (OSError, ValueError) as err:
        raise OutputPlanError(f"cannot read the infer manifest '{path}' ({err}); {fix}.") from err
    outputs = payload.get('outputs') if isinstance(payload, dict) else None
    if not isinstance(outputs, dict) or not all(isinstance(v, dict) and isinstance(v.get('sha256'), str)
                                                for v in outputs.values()):
        raise OutputPlanError(f"'{path}' is not a basicsr infer manifest (no 'outputs' of sha256 entries); {fix}.")
    return {str(name): dict(entry) for name, entry in outputs.items()}


def write_manifest(out_dir: str, outputs: Mapping[str, Mapping[str, str]]) -> None:
    """Replace ``out_dir``'s :data:`MANIFEST_NAME` by ``outputs``, atomically.

    Low level: it does not merge. Writers that may run beside another process use :func:`record_outputs`.
    """
    payload = {'written_by': 'basicsr infer (mambacsr_arch)', 'format': 1,
               'note': 'images basicsr infer wrote into this folder; it does not re-read them as inputs here',
               'outputs': {name: dict(outputs[name]) for name in sorted(outputs)}}
    write_bytes_atomic(osp.join(out_dir, MANIFEST_NAME), (json.dumps(payload, indent=1) + '\n').encode('utf-8'))


def record_outputs(out_dir: str, new: Mapping[str, Mapping[str, str]]) -> Dict[str, Dict[str, str]]:
    """Add ``new`` entries to ``out_dir``'s manifest without losing anyone else's; returns the merged manifest.

    Under an exclusive lock of ``out_dir`` (held only for this read-merge-write): the manifest on disk
    is re-read, entries whose file no longer exists are dropped, ``new`` is merged in and the result
    replaces the manifest atomically. Raises OSError (cannot lock or write) or :class:`OutputPlanError`
    (the manifest on disk became unreadable).
    """
    with folder_lock(out_dir):
        current = {name: entry for name, entry in read_manifest(out_dir).items()
                   if osp.isfile(osp.join(out_dir, name))}
        current.update({name: dict(entry) for name, entry in new.items()})
        write_manifest(out_dir, current)
    return current


def existing_output(out_path: str, known: Optional[Mapping[str, Mapping[str, str]]] = None) -> str:
    """State of an output file: ``'absent'``, ``'recorded'``, ``'damaged'``, ``'edited'`` or ``'foreign'`` (module doc).

    ``known``: a manifest already in memory (the run's own, refreshed at each record); the file's
    bytes are checked against it first, and the manifest on disk is read only when that does not
    settle it (another run may have recorded the file a moment ago). A manifest that cannot be read
    counts as no record (the file is then kept, as any file infer did not write).
    """
    if not osp.exists(out_path):
        return 'absent'
    if not osp.isfile(out_path):
        return 'foreign'
    name = osp.basename(out_path)
    try:
        digest = sha256_of_file(out_path)
    except OSError:
        digest = None
    if known is not None and digest is not None and (known.get(name) or {}).get('sha256') == digest:
        return 'recorded'
    try:
        entry = read_manifest(osp.dirname(out_path) or '.').get(name)
    except OutputPlanError:
        entry = None
    if entry is None:
        return 'foreign'
    if digest == entry['sha256']:
        return 'recorded'
    return 'edited' if _decodes(out_path) else 'damaged'


def _decodes(path: str) -> bool:
    """Whether ``path`` is a complete image (a truncated PNG/JPEG, an empty file or garbage is not)."""
    from mambacsr_arch.data.image_io import ImageReadError, read_image_bgr8

    try:
        read_image_bgr8(path)
    except ImageReadError:
        return False
    return True


# ----------------------------------------------------------------------------- plan


@dataclass
class OutputPlan:
    """What ``basicsr infer`` will do, decided before the first image is read (see :func:`plan_outputs`)."""
    out_dir: str
    pairs: List[Tuple[str, str]]  # (input, output), in input order
    previous_outputs: List[str]  # images in the input folder that infer wrote there earlier: not re-read
    manifest: Dict[str, Dict[str, str]]  # output folder's manifest, refreshed from disk as images are recorded


def _file_id(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def plan_outputs(inputs: Sequence[str], out_dir: str, suffix: str, ext: str,
                 input_folder: Optional[str] = None) -> OutputPlan:
    """Map every input to its output and refuse any plan that could harm an input (infer's module doc, "Output plan").

    Args:
        input_folder: the ``-i`` folder (None for a single file): where it is ``out_dir``, images that
            ``out_dir``'s manifest lists with an unchanged sha256 are earlier outputs and are not inputs.
    Raises:
        OutputPlanError: listing every conflict (an output that is, or resolves to, any input file; two
            inputs with one output; an output name taken by a folder), each naming both files and the fix.
    """
    separators = [sep for sep in ('/', os.sep, os.altsep, '\0') if sep and sep in suffix]
    if separators:
        raise OutputPlanError(f"--suffix {suffix!r} contains {separators[0]!r}: it is added to each output's file name "
                              f'(e.g. _x4); choose the output folder with -o')
    manifest = {name: entry for name, entry in read_manifest(out_dir).items()
                if osp.isfile(osp.join(out_dir, name))}
    previous: List[str] = []
    if input_folder is not None and manifest and _file_id(input_folder) == _file_id(out_dir):
        kept = []
        for path in inputs:
            entry = manifest.get(osp.basename(path))
            if entry is not None and entry['sha256'] == sha256_of_file(path):
                previous.append(path)  # unchanged since infer wrote it: ours, not the user's
            else:
                kept.append(path)
        inputs = kept
    input_ids: Dict[Tuple[int, int], str] = {}
    for path in inputs:
        file_id = _file_id(path)
        if file_id is not None:
            input_ids.setdefault(file_id, path)
    other_dir = 'another -o folder'
    conflicts, claimed, pairs = [], {}, []
    for path in inputs:
        out = output_path(path, out_dir, suffix, ext)
        # realpath first: 'missing/../in' reaches 'in' once infer has made 'missing'; stat follows links, so an
        # output resolving to an input is caught too
        real = osp.realpath(out)
        out_id = _file_id(real)
        same = input_ids.get(out_id) if out_id is not None else None
        if same == path:
            conflicts.append(f"'{path}': the output '{out}' is this input itself; fix: --suffix _x4, another --ext "
                             f'or {other_dir}')
        elif same is not None:
            conflicts.append(f"'{path}': the output '{out}' is the input '{same}'; fix: --suffix _x4, another --ext "
                             f"or {other_dir} (if '{same}' came from an earlier run, move it out of the folder)")
        elif real in claimed:
            conflicts.append(f"'{claimed[real]}' and '{path}' would both be written to '{out}' (one "
                             f'stem); fix: rename one of them, or restore them into separate -o folders')
        elif osp.isdir(out):
            conflicts.append(f"'{path}': the output '{out}' is an existing folder; fix: --suffix, --ext or "
                             f'{other_dir}')
        claimed.setdefault(real, path)
        pairs.append((path, out))
    if conflicts:
        shown = conflicts[:20] + ([f'... and {len(conflicts) - 20} more'] if len(conflicts) > 20 else [])
        raise OutputPlanError(f'{len(conflicts)} output conflict(s), nothing written:\n  ' + '\n  '.join(shown))
    return OutputPlan(out_dir, pairs, previous, manifest)


# ----------------------------------------------------------------------------- image layouts


def network_channels(net: Any) -> int:
    """Image channels ``net`` takes: its ``conv_first`` (MambaCSR, HAT, BasicSR's nets), else its first Conv2d."""
    import torch.nn as nn

    conv = getattr(net, 'conv_first', None)
    if not isinstance(conv, nn.Conv2d):
        conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else 3


class LayoutNotes:
    """Counts of the images a run converted, one line per kind (see infer's module doc, "Image layouts")."""

    def __init__(self) -> None:
        self._files: 'OrderedDict[str, List[str]]' = OrderedDict()

    def add(self, kind: str, path: str) -> None:
        self._files.setdefault(kind, []).append(osp.basename(path))

    def lines(self) -> List[str]:
        out = []
        for kind, names in self._files.items():
            shown = ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')
            out.append(f'{len(names)} {kind} ({shown})')
        return out


GRAY_AS_RGB = 'gray image(s): restored as RGB (gray replicated), written as 3-channel'
ALPHA_DROPPED = 'image(s) with an alpha channel: restored RGB, alpha dropped (the outputs are opaque)'
DEEP_AS_8BIT = '16-bit image(s): read as 8 bits (round(v / 257)) like the datasets do, written as 8-bit'
EQUAL_RGB_AS_GRAY = 'colour file(s) whose three channels are equal: fed to the 1-channel network as gray'


def network_input(img: Any, layout: Any, channels: int, path: str, notes: LayoutNotes) -> Any:
    """The uint8 ``(H, W, channels)`` array to feed for a decoded image (BGR for 3 channels, gray for 1).

    Args:
        img: :func:`~mambacsr_arch.data.image_io.read_image_with_layout`'s uint8 BGR (H, W, 3).
        layout: its :class:`~mambacsr_arch.data.image_io.ImageLayout`.
        channels: :func:`network_channels` (1 or 3).
    Raises:
        ImageReadError: a colour image for a 1-channel network (this image only), naming the fix.
        ValueError: a network of another channel count (the same for every image).
    """
    from mambacsr_arch.data.image_io import ImageReadError

    if layout.alpha:
        notes.add(ALPHA_DROPPED, path)
    if layout.bit_depth == 16:
        notes.add(DEEP_AS_8BIT, path)
    if channels == 3:
        if layout.gray:
            notes.add(GRAY_AS_RGB, path)
        return img
    if channels == 1:
        equal = bool((img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all())
        if not equal:
            raise ImageReadError(f'{path}: a colour image, but the network takes 1 channel (in_chans 1); convert it '
                                 'to grayscale first (e.g. its Y channel, as BasicSR\'s color: y datasets feed such '
                                 'networks), or use a 3-channel network.')
        if not layout.gray:
            notes.add(EQUAL_RGB_AS_GRAY, path)
        return img[:, :, :1]
    raise ValueError(f'the network takes {channels} image channels; basicsr infer feeds 1 (gray) or 3 (colour).')
