"""Pair LQ files with GT files by stem, whatever their image extensions.

BasicSR 1.4.2's ``paired_paths_from_folder`` pairs ``gt/<stem>.<ext>`` only with
``lq/<filename_tmpl(stem)>.<ext>`` -- the *same* extension -- and lists folders with a walker
that also counts non-images and dies on symbolic-link loops. The authors' layouts break it:

* MambaCSR test sets: ``HR/coffee.png`` beside ``LR_q10/coffee.jpg``;
* DIV2K with ``filename_tmpl: '{}x4'``: ``HR/0801.png`` beside ``LR_q10/0801x4.jpg``.

The two functions here have BasicSR's signatures and return BasicSR's path dicts, so they serve
:class:`~mambacsr_arch.data.jpeg_degraded_dataset.JPEGDegradedPairedDataset` directly and replace
the names BasicSR's ``PairedImageDataset`` module imported (see
:func:`mambacsr_arch.cli.runtime.patch_datasets`). Rules:

* a GT ``<stem>.<any image ext>`` pairs with the one LQ image whose stem is ``filename_tmpl.format(stem)``;
* two images with one stem in a folder (``a.jpg`` and ``a.png``) is ambiguous: an error naming both;
* a GT without LQ or an LQ without GT: one error naming them (and any non-image file that may be
  the intended partner);
* non-image files (``notes.txt``, ``Thumbs.db``) that pair with nothing are skipped with a warning
  naming them; folders are listed through the project's one loop-safe walker
  (:func:`~mambacsr_arch.data.image_io.iter_folder_files`), which names a link loop instead of crashing.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .image_io import IMAGE_EXTENSIONS, iter_folder_files

__all__ = ['PairingError', 'StemMatch', 'match_by_stem', 'paired_paths_from_folder', 'paired_paths_from_meta_info_file',
           'lq_stem']

logger = logging.getLogger('basicsr')
_SHOWN = 5  # names listed per problem in an error message


class PairingError(ValueError):
    """LQ and GT files cannot be paired one to one; the message names the files and folders."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def listing(names: Sequence[str]) -> str:
    """The first few names, quoted, and how many more (for one-line messages)."""
    shown = ', '.join(f"'{n}'" for n in names[:_SHOWN])
    return shown + (f' and {len(names) - _SHOWN} more' if len(names) > _SHOWN else '')


def lq_stem(gt_stem: str, filename_tmpl: str) -> str:
    """``filename_tmpl.format(gt_stem)``, with an error naming the option when the template is unusable."""
    try:
        stem = filename_tmpl.format(gt_stem)
    except (IndexError, KeyError, ValueError, AttributeError) as err:
        raise PairingError(f"filename_tmpl {filename_tmpl!r} is not a template with one '{{}}' for the GT "
                           f"stem (e.g. '{{}}' or '{{}}x4'): {type(err).__name__}: {err}.") from None
    if stem == filename_tmpl and '{}' not in filename_tmpl:
        raise PairingError(f"filename_tmpl {filename_tmpl!r} has no '{{}}' for the GT stem, so every GT would "
                           "pair with one LQ file; use e.g. '{}' or '{}x4'.")
    return stem


class _Folder:
    """The files directly inside one folder, images indexed by stem (ambiguity checked)."""

    def __init__(self, folder: str, key: str, label: Optional[str] = None) -> None:
        self.folder, self.key = folder, key
        label = label if label is not None else f'dataroot_{key}'
        names = sorted(iter_folder_files(folder))  # loop-safe; ImageFolderError names a bad entry
        self.others = [n for n in names if not _is_image(n)]
        self.by_stem: Dict[str, str] = {}
        clashes = []
        for name in (n for n in names if _is_image(n)):
            stem = osp.splitext(name)[0]
            if stem in self.by_stem:
                clashes.append(f"'{self.by_stem[stem]}' and '{name}'")
            else:
                self.by_stem[stem] = name
        if clashes:
            raise PairingError(f"{label} '{folder}': more than one image with the same stem: "
                               f"{'; '.join(clashes[:_SHOWN])}. Files are paired by stem whatever their "
                               'extension, so each stem must be unique: move or delete the extra files.')

    def non_images_with_stem(self, stem: str) -> List[str]:
        return [n for n in self.others if osp.splitext(n)[0] == stem]


@dataclass
class StemMatch:
    """:func:`match_by_stem`'s answer: the pairs, and the files of each side left without a partner."""
    pairs: List[Tuple[str, str, str]] = field(default_factory=list)  # (GT stem, LQ path, GT path), by GT stem
    missing: List[str] = field(default_factory=list)  # GT names without LQ (a note if a non-image has the stem)
    extra: List[str] = field(default_factory=list)  # LQ names that match no GT
    lq_folder: str = ''
    gt_folder: str = ''


def match_by_stem(lq_folder: str, gt_folder: str, filename_tmpl: str = '{}', lq_label: str = 'dataroot_lq',
                  gt_label: str = 'dataroot_gt') -> StemMatch:
    """The project's one pairing by stem: GT ``<stem>.*`` with the LQ image named ``filename_tmpl.format(stem)``.*.

    Unpaired files are returned, not raised (each caller words its own message: datasets, ``basicsr eval``);
    an ambiguous stem (``a.jpg`` and ``a.png`` in one folder) raises :class:`PairingError` naming both
    and the folder by ``lq_label`` / ``gt_label``.
    """
    return _match(_Folder(os.fspath(lq_folder), 'lq', lq_label), _Folder(os.fspath(gt_folder), 'gt', gt_label),
                  filename_tmpl)


def _match(lq: _Folder, gt: _Folder, filename_tmpl: str) -> StemMatch:
    match, used = StemMatch(lq_folder=lq.folder, gt_folder=gt.folder), set()
    for stem in sorted(gt.by_stem):
        want = lq_stem(stem, filename_tmpl)
        lq_name = lq.by_stem.get(want)
        if lq_name is None:
            near = lq.non_images_with_stem(want)
            match.missing.append(gt.by_stem[stem] + (f" (found {listing(near)}, not an image type)" if near else ''))
            continue
        used.add(want)
        match.pairs.append((stem, osp.join(lq.folder, lq_name), osp.join(gt.folder, gt.by_stem[stem])))
    match.extra = [name for stem, name in sorted(lq.by_stem.items()) if stem not in used]
    return match


def paired_paths_from_folder(folders: Sequence[str], keys: Sequence[str],
                             filename_tmpl: str = '{}') -> List[Dict[str, str]]:
    """``[{'<lq key>_path': lq file, '<gt key>_path': gt file}, ...]`` sorted by GT stem.

    Same arguments as BasicSR's function: ``folders = [lq_folder, gt_folder]``, ``keys = ['lq', 'gt']``.
    Raises :class:`PairingError` (a ``ValueError``) naming the unpaired or ambiguous files, and
    :class:`~mambacsr_arch.data.image_io.ImageFolderError` for a folder that cannot be listed.
    """
    if len(folders) != 2 or len(keys) != 2:
        raise PairingError(f'expected folders [lq, gt] and keys [lq, gt], got {list(folders)} and {list(keys)}.')
    lq_key, gt_key = keys
    lq, gt = _Folder(os.fspath(folders[0]), lq_key), _Folder(os.fspath(folders[1]), gt_key)
    match = _match(lq, gt, filename_tmpl)
    paths = [{f'{lq_key}_path': lq_path, f'{gt_key}_path': gt_path} for _, lq_path, gt_path in match.pairs]
    missing, extra = match.missing, match.extra
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} GT image(s) in '{gt.folder}' have no LQ image "
                            f"'{lq_stem('<stem>', filename_tmpl)}.<image ext>' in '{lq.folder}': {listing(missing)}")
        if extra:
            problems.append(f"{len(extra)} LQ image(s) in '{lq.folder}' match no GT image in '{gt.folder}': "
                            f'{listing(extra)}')
        hint = (f" (filename_tmpl is {filename_tmpl!r}: LQ stem = filename_tmpl.format(GT stem))"
                if not paths else '')
        raise PairingError(f'cannot pair dataroot_{lq_key} with dataroot_{gt_key}: ' + '; '.join(problems) +
                           f'.{hint} Add the missing files, remove the unpaired ones, or fix filename_tmpl.')
    for folder in (lq, gt):
        if folder.others:
            logger.warning(f"dataroot_{folder.key} '{folder.folder}': skipping {len(folder.others)} file(s) that "
                           f'are not images ({", ".join(IMAGE_EXTENSIONS)}): {listing(folder.others)}.')
    return paths


def paired_paths_from_meta_info_file(folders: Sequence[str], keys: Sequence[str], meta_info_file: str,
                                     filename_tmpl: str = '{}') -> List[Dict[str, str]]:
    """BasicSR's meta-info pairing (GT names from the first token of each line, in file order),
    except that the LQ file may have any image extension: ``<lq>/<tmpl(stem)><GT ext>`` is used if
    it exists (BasicSR's rule), otherwise the one image with that stem in its folder.

    Raises :class:`PairingError` naming the meta-info line for a missing GT or LQ file.
    """
    if len(folders) != 2 or len(keys) != 2:
        raise PairingError(f'expected folders [lq, gt] and keys [lq, gt], got {list(folders)} and {list(keys)}.')
    lq_folder, gt_folder = (os.fspath(f) for f in folders)
    lq_key, gt_key = keys
    try:
        with open(meta_info_file, 'r', encoding='utf-8') as f:
            lines = [(i, line.split()[0]) for i, line in enumerate(f, 1) if line.strip()]
    except OSError as err:
        raise PairingError(f"meta_info_file '{meta_info_file}': cannot read it ({err.strerror or err}).") from None
    listings: Dict[str, Optional[_Folder]] = {}
    paths, problems = [], []
    for number, gt_name in lines:
        gt_path = osp.join(gt_folder, gt_name)
        sub, base = osp.split(gt_name)
        stem, ext = osp.splitext(base)
        lq_path = osp.join(lq_folder, sub, lq_stem(stem, filename_tmpl) + ext)
        if not osp.isfile(gt_path):
            problems.append(f"line {number}: GT '{gt_path}' does not exist")
            continue
        if not osp.isfile(lq_path):
            lq_path = _find_by_stem(osp.join(lq_folder, sub), lq_key, lq_stem(stem, filename_tmpl), listings)
            if lq_path is None:
                problems.append(f"line {number}: no LQ image '{lq_stem(stem, filename_tmpl)}.<image ext>' in "
                                f"'{osp.join(lq_folder, sub)}' for GT '{gt_name}'")
                continue
        paths.append({f'{lq_key}_path': lq_path, f'{gt_key}_path': gt_path})
    if problems:
        more = f' and {len(problems) - _SHOWN} more' if len(problems) > _SHOWN else ''
        raise PairingError(f"meta_info_file '{meta_info_file}' (dataroot_{gt_key} '{gt_folder}', dataroot_{lq_key} "
                           f"'{lq_folder}'): {'; '.join(problems[:_SHOWN])}{more}. Fix the listed files or the "
                           'meta-info file.')
    return paths


def _find_by_stem(folder: str, key: str, stem: str, listings: Dict[str, Optional[_Folder]]) -> Optional[str]:
    if folder not in listings:
        listings[folder] = _Folder(folder, key) if osp.isdir(folder) else None
    listing = listings[folder]
    name = listing.by_stem.get(stem) if listing is not None else None
    return osp.join(folder, name) if name is not None else None

