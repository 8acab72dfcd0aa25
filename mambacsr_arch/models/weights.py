"""THE loader of network weights: which entry of a checkpoint, what a ``.safetensors`` holds, this
project's metadata honoured, refusals of weights that cannot be right, and the strict-load report.

A checkpoint file is a ``.pth`` (``torch.load(weights_only=True)``) or a ``.safetensors`` file
(:func:`open_checkpoint`), holding ``{'params': sd, 'params_ema': sd, ...}`` (BasicSR, official
MambaCSR/HAT releases), another trainer's wrapper (``state_dict``, ``model``, ``net``) or a bare
state dict. Every command reads it here, once.

**Which weights are loaded (the one rule, :func:`choose_param_key`, used by ``basicsr infer``,
``export``, ``test``/``train`` (``CSRModel``) and training's ``.safetensors`` writer):** an explicit
``--param-key`` wins; with an option file, ``path.param_key_g``, else BasicSR's default ``params``;
with bare ``--weights`` (no option file), ``params_ema``, falling back to ``params`` (then
``state_dict`` > ``model`` > ``net`` > the bare file) when the checkpoint has no EMA weights.
``None``/``'none'``/``'~'`` means the file *is* the state dict. ``module.``/``netG.`` prefixes are
stripped (:func:`select_params`).

**What a ``.safetensors`` written by this project holds:** one entry, named in its metadata
(``written_by: mambacsr_arch``, ``param_key``, ``network_g`` as JSON, ``entries``: JSON mapping each
entry of the source checkpoint to the file holding it). Training (``logger.save_safetensors``)
writes ``net_g_N.safetensors`` = ``params`` (what ``net_g_N.pth`` gives under the default key) and,
with EMA, ``net_g_N_ema.safetensors`` = ``params_ema``; so swapping ``net_g_N.pth`` for the
``.safetensors`` of the requested entry restores the same network. Asking a file for an entry its
metadata says it does not hold is an error naming the file, the entry it holds and the file that
holds the one asked for (never a silent substitute); asking ``params_ema`` of a file holding the
``params`` of a checkpoint that had no EMA falls back as the ``.pth`` does. Its ``network_g``
rebuilds the saved network exactly (:func:`mambacsr_arch.cli.common.resolve_network`: it wins over
detection; an option file or ``--arch-opt`` still override, and say so). Files are written
atomically with the permissions of any new file (umask), like the ``.pth`` next to them.

**Refused** (:class:`CheckpointError`, a :class:`~mambacsr_arch.errors.ConfigError`: one line, exit
2): a folder, an empty or non-checkpoint file (a zip of something else), a pickle holding code or
objects (refused for safety; never loaded with ``weights_only=False``), a checkpoint without
tensors or with non-tensor entries in its state dict, a floating model tensor that would be loaded
from an integer/bool tensor, and any loaded tensor holding NaN/inf.

**Mismatches:** with ``strict=True`` a mismatch raises the one report of
:func:`mambacsr_arch.archs.state_dict_report.describe_mismatch` (missing, unexpected and mis-shaped
keys, and the likely wrong ``network_g`` options). With ``strict=False`` (``path.strict_load_g:
false``, as the official test files set) every tensor that matches is loaded, and every key that
did not load is listed in one warning on the ``basicsr`` logger. A checkpoint of which not one
tensor fits raises instead of leaving the whole network random.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..archs.state_dict_report import describe_mismatch, preview
from ..errors import ConfigError
from ..fileio import write_bytes_atomic

logger = logging.getLogger('basicsr')
NO_KEY = (None, '', 'none', 'None', '~')
#: The ``written_by`` metadata value of ``.safetensors`` files this project writes.
PROJECT_TAG = 'mambacsr_arch'


class CheckpointError(ConfigError, RuntimeError):
    """A checkpoint that cannot be (or must not be) loaded; the message names the file and the fix."""


class CheckpointNotFound(ConfigError, FileNotFoundError):
    """The checkpoint path does not exist."""


class ParamKeyError(ConfigError, KeyError):
    """The requested entry (``path.param_key_g`` / ``--param-key``) is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ''


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


#: Wrapper entries a checkpoint's network weights are found under, most preferred first: BasicSR
#: (``params_ema``, ``params``), PyTorch Lightning / timm (``state_dict``), other trainers (``model``, ``net``).
WRAPPER_KEYS = ('params_ema', 'params', 'state_dict', 'model', 'net')
#: Key prefixes stripped from every key: DataParallel/DDP (``module.``) and GAN trainers' generator (``netG.``).
STRIP_PREFIXES = ('module.', 'netG.')
SAFETENSORS_SUFFIX = '.safetensors'


# ----------------------------------------------------------------------------- the one rule


def default_param_key(has_option_file: bool) -> str:
    """The entry loaded when none is named: ``params`` with an option file (BasicSR's ``param_key_g``
    default, as ``basicsr test`` loads), ``params_ema`` for bare ``--weights`` (released checkpoints' EMA
    weights; falls back to ``params`` when the checkpoint has none)."""
    return 'params' if has_option_file else 'params_ema'


def choose_param_key(explicit: Optional[str], path_opt: Optional[Mapping[str, Any]],
                     has_option_file: bool) -> Optional[str]:
    """THE weight-selection rule (module doc): ``explicit`` (``--param-key``), else the option file's
    ``path.param_key_g``, else :func:`default_param_key`."""
    if explicit is not None:
        return explicit
    if has_option_file and path_opt and 'param_key_g' in path_opt:
        return path_opt['param_key_g']
    return default_param_key(has_option_file)


# ----------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """A checkpoint file as read once: its content (a dict, on the CPU) and its ``.safetensors`` metadata."""
    path: str
    content: Dict[str, Any]
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        """Written by this project (training's writer or ``basicsr export``): its metadata is honoured."""
        return 'param_key' in self.metadata  # files of the first release carry no written_by

    @property
    def held_key(self) -> Optional[str]:
        """The entry of the source checkpoint this ``.safetensors`` holds (None: unknown / a bare state dict)."""
        key = self.metadata.get('param_key') if self.ours else None
        return None if key in NO_KEY else key

    @property
    def entries(self) -> Dict[str, str]:
        """``{entry of the source checkpoint: file holding it}`` from the metadata ({} if not recorded)."""
        try:
            entries = json.loads(self.metadata.get('entries') or '{}')
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in entries.items()} if isinstance(entries, dict) else {}

    @property
    def network_g(self) -> Optional[Dict[str, Any]]:
        """The ``network_g`` stored in the metadata (with its ``type``), else None."""
        if not self.ours or not self.metadata.get('network_g'):
            return None
        try:
            network = json.loads(self.metadata['network_g'])
        except ValueError as err:
            raise CheckpointError(f"'{self.path}': its metadata network_g is not JSON ({err}); the file was edited "
                                  'or truncated: export it again.') from err
        return dict(network) if isinstance(network, dict) and network.get('type') else None


def _is_safetensors(path: str) -> bool:
    """True for a file laid out like a safetensors one (8-byte header size, then a JSON '{'), or named
    ``.safetensors`` unless its bytes say torch.save wrote it (a zip): a renamed ``.pth``
    loads as what it is."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if head.startswith(b'PK\x03\x04'):  # a zip: torch.save's format (a safetensors header is never 67 MB)
        return False
    return path.lower().endswith(SAFETENSORS_SUFFIX) or (len(head) == 9 and head[8:9] == b'{')


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError('reading or writing .safetensors files needs the safetensors package: '
                          'pip install safetensors') from err
    return safetensors.torch


def _read_safetensors(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    _safetensors()
    from safetensors import safe_open

    with safe_open(path, framework='pt', device='cpu') as f:
        metadata = dict(f.metadata() or {})
        content = {key: f.get_tensor(key) for key in f.keys()}
    return content, metadata


def _refused_pickle(path: str, err: BaseException) -> CheckpointError:
    found = re.search(r'GLOBAL ([\w.]+)', str(err))
    what = f" (it needs '{found.group(1)}')" if found else ''
    return CheckpointError(
        f"checkpoint '{path}' contains Python code or objects{what}, not only tensors: it was refused for safety "
        '(weights are read without running code). Use a checkpoint of tensors: a BasicSR .pth '
        "({'params': state_dict}), a bare state dict or a .safetensors file.")


def open_checkpoint(path: Union[str, os.PathLike]) -> Checkpoint:
    """Read a checkpoint file once (see the module doc for what is refused); errors name the file.

    ``.pth``/``.pt`` (or any torch.save file): ``torch.load(weights_only=True)``, so no pickled code
    runs. ``.safetensors`` (by name or content): the flat tensor dict and its metadata.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = sorted(n for n in os.listdir(path) if n.lower().endswith(('.pth', '.pt', SAFETENSORS_SUFFIX)))
        hint = f' ({preview(inside, 4)})' if inside else ''
        raise CheckpointError(f"checkpoint '{path}' is a folder, not a file: name the .pth or .safetensors file in "
                              f'it{hint} (path.pretrain_network_g / --weights).')
    if not os.path.isfile(path):
        raise CheckpointNotFound(f"checkpoint '{path}' does not exist: check path.pretrain_network_g "
                                 f'in your option file (or --weights).')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): the download or copy did not finish; "
                              'fetch it again.')
    metadata: Dict[str, str] = {}
    safetensors_file = _is_safetensors(path)
    try:
        if safetensors_file:
            obj, metadata = _read_safetensors(path)
        else:
            with open(path, 'rb') as f:  # a file object: torch 2.14 reads a path named .safetensors as safetensors
                obj = torch.load(f, map_location='cpu', weights_only=True)
    except ImportError:
        raise
    except Exception as err:  # corrupt, truncated, pickled with code, a zip of something else
        text = str(err)
        if 'weights_only' in text or 'Weights only load failed' in text:
            raise _refused_pickle(path, err) from None
        if not safetensors_file and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            if not any(name.endswith('data.pkl') for name in names):
                raise CheckpointError(f"checkpoint '{path}' is a zip archive but not a PyTorch checkpoint (it holds "
                                      f'{preview(names, 3)}, no data.pkl): unpack it and name the .pth or '
                                      '.safetensors inside.') from None
        first = text.strip().splitlines()[0] if text.strip() else ''
        raise CheckpointError(f"cannot read checkpoint '{path}': {type(err).__name__}: {first} (corrupt, truncated "
                              'or not a checkpoint).') from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of tensors.")
    if not obj:
        raise CheckpointError(f"checkpoint '{path}' is an empty dict: it holds no weights.")
    return Checkpoint(path, dict(obj), metadata)


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The content of a checkpoint file as a dict on the CPU (:func:`open_checkpoint` without its metadata)."""
    return open_checkpoint(path).content


# ----------------------------------------------------------------------------- writing


def project_metadata(param_key: Optional[str], network_g: Optional[Mapping[str, Any]],
                     entries: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The metadata this project writes into a ``.safetensors`` (module doc): the entry held, the
    ``network_g`` that rebuilds it, and where each entry of the source checkpoint went."""
    meta = {'written_by': PROJECT_TAG, 'param_key': str(param_key if param_key not in NO_KEY else 'none'),
            'network_g': json.dumps(dict(network_g or {}))}
    if entries:
        meta['entries'] = json.dumps(dict(entries))
    return meta


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                     metadata: Optional[Mapping[str, str]] = None, durable: bool = False) -> None:
    """Write a bare state dict as ``.safetensors`` through the project's atomic writer.

    The file gets the permissions of any new file (umask), as the ``.pth`` next to it (the
    safetensors package alone writes 0600). Shared storage (tied or view tensors) is copied apart,
    as the format requires.
    """
    path = os.fspath(path)
    if not _is_state_dict(state_dict):
        raise ValueError(f"'{path}': only a non-empty dict of tensors can be saved as safetensors.")
    tensors = {key: value.detach().to('cpu').contiguous().clone() for key, value in state_dict.items()}
    data = _safetensors().save(tensors, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    write_bytes_atomic(path, data, durable=durable)


def strip_prefixes(state: Mapping[str, torch.Tensor], source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """``state`` without :data:`STRIP_PREFIXES`. When some keys carry ``netG.`` (a GAN checkpoint), only
    those are the generator's: the others (``netD.``...) are dropped, and the drop is logged."""
    generator = [key for key in state if key.startswith('netG.') or key.startswith('module.netG.')]
    if generator and len(generator) < len(state):
        logger.info(f"{source}: keeping the {len(generator)} 'netG.' (generator) tensors, ignoring "
                    f'{len(state) - len(generator)} others ({preview([k for k in state if k not in generator], 3)}).')
        state = OrderedDict((key, state[key]) for key in generator)
    cleaned = OrderedDict()
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key in cleaned:
            raise RuntimeError(f"{source}: two tensors are named '{key}' once the {STRIP_PREFIXES} prefixes are "
                               'stripped; this file mixes several networks: pick one with path.param_key_g.')
        cleaned[key] = value
    return cleaned


def _find_wrapped(checkpoint: Mapping[str, Any]) -> Optional[str]:
    """The most preferred :data:`WRAPPER_KEYS` entry of ``checkpoint`` holding a dict, else None."""
    return next((key for key in WRAPPER_KEYS if isinstance(checkpoint.get(key), Mapping)), None)


def _not_a_state_dict(source: str, entry: str, state: Mapping[str, Any]) -> CheckpointError:
    """The error for a dict that is not a state dict, naming its first non-tensor entry."""
    if not state:
        return CheckpointError(f"{source}: the entry '{entry}' is empty: it holds no weights.")
    tensors = sum(torch.is_tensor(v) for v in state.values())
    bad = next(k for k, v in state.items() if not torch.is_tensor(v))
    what = type(state[bad]).__name__
    if tensors:
        return CheckpointError(
            f"{source}: '{entry}' mixes {tensors} tensors with {len(state) - tensors} other entries, e.g. '{bad}' "
            f'(a {what}, not a tensor): it is not a state dict. Keep only the tensors '
            '({k: v for k, v in sd.items() if torch.is_tensor(v)}), or name the entry holding them with '
            'path.param_key_g / --param-key.')
    return CheckpointError(f"{source}: the entry '{entry}' holds no tensors (first entries: {preview(list(state), 6)}; "
                           f"'{bad}' is a {what}); set path.param_key_g / --param-key to the entry with the weights.")


def select_params(checkpoint: Mapping[str, Any], param_key: Optional[str], source: str = 'checkpoint'
                  ) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The network state dict in ``checkpoint``, canonicalised: one wrapper entry, prefixes stripped.

    ``param_key``: the entry to load; None/'none'/'~' means the file is the state dict; ``'auto'``
    picks the first present of :data:`WRAPPER_KEYS` (params_ema > params > state_dict > model > net),
    else the bare dict. A key of :data:`WRAPPER_KEYS` that is absent falls back the same way (logged),
    as BasicSR's ``params_ema`` -> ``params``; any other absent key is an error naming the entries.
    ``module.``/``netG.`` prefixes are stripped (:func:`strip_prefixes`). The ``.safetensors``
    metadata rule is :func:`select_weights`'s.

    Returns ``(state_dict, key_used)``; ``key_used`` is None when the root dict was used.
    """
    key_used: Optional[str] = None if param_key in NO_KEY else param_key
    if key_used is None:
        state = checkpoint
    elif key_used in checkpoint and isinstance(checkpoint[key_used], Mapping):
        state = checkpoint[key_used]
    elif key_used in WRAPPER_KEYS + ('auto', ) and _find_wrapped(checkpoint) is not None:
        found = _find_wrapped(checkpoint)
        if key_used != 'auto':
            logger.info(f"{source}: no '{key_used}', loading '{found}'.")
        key_used, state = found, checkpoint[found]
    elif _is_state_dict(checkpoint):
        if key_used != 'auto':
            logger.info(f"{source}: no '{key_used}' entry; the file is a bare state dict, loading it whole.")
        key_used, state = None, checkpoint
    elif any(torch.is_tensor(v) for v in checkpoint.values()):
        raise _not_a_state_dict(source, '<root>', checkpoint)
    else:
        raise ParamKeyError(f"{source}: param key '{key_used}' not found; the file has {sorted(checkpoint)}. "
                            f'Set path.param_key_g to one of those (or ~ for a bare state dict).')
    held = [k for k in WRAPPER_KEYS if isinstance(state, Mapping) and isinstance(state.get(k), Mapping)]
    if key_used is None and len(held) > 1:  # asked for the bare dict: which of the entries is not ours to guess
        raise ParamKeyError(f"{source} is not a bare state dict (param key none): it holds {', '.join(held)}. "
                            f'Choose one with --param-key / path.param_key_g.')
    # one nested wrapper more, e.g. {'state_dict': {'params': ...}} or {'model': {'params_ema': ...}}
    if not _is_state_dict(state) and isinstance(state, Mapping) and _find_wrapped(state) is not None:
        inner = _find_wrapped(state)
        logger.info(f"{source}: '{key_used or '<root>'}' wraps '{inner}', loading that.")
        key_used, state = f"{key_used or '<root>'}.{inner}" if key_used else inner, state[inner]
    if not _is_state_dict(state):
        raise _not_a_state_dict(source, key_used or '<root>', state)
    return strip_prefixes(state, source), key_used


def select_weights(checkpoint: Checkpoint, param_key: Optional[str]) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """``(state dict, key used)`` of ``checkpoint`` for ``param_key`` (from :func:`choose_param_key`).

    A ``.safetensors`` of this project holds one entry, named in its metadata (module doc): asked
    for that entry (or ``'auto'``, or ~) it loads; asked ``params_ema`` while holding the ``params``
    of a checkpoint without EMA weights it falls back, as the ``.pth`` does; any other entry is a
    :class:`CheckpointError` naming the file, the entry it holds and the file holding the one asked.
    Other files: :func:`select_params`.
    """
    source = f"'{checkpoint.path}'"
    held = checkpoint.held_key
    if held is None:
        return select_params(checkpoint.content, param_key, source=source)
    wanted = None if param_key in NO_KEY else param_key
    entries = checkpoint.entries
    if wanted in (None, 'auto', held):
        pass
    elif wanted == 'params_ema' and held == 'params' and 'params_ema' not in entries:
        logger.info(f"{source}: holds the 'params' of a checkpoint without 'params_ema' (its metadata); loading "
                    "'params', as BasicSR does.")
    else:
        elsewhere = entries.get(wanted)
        where = (f" The '{wanted}' weights of that checkpoint are in '{elsewhere}' (next to it, if training wrote "
                 'both).' if elsewhere else '')
        raise CheckpointError(
            f"{source} holds the '{held}' weights (its metadata says so), not '{wanted}'.{where} Load that file, "
            f"or ask for '{held}' (path.param_key_g / --param-key {held}).")
    return select_params(checkpoint.content, None, source=source)[0], held


def check_loadable(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights that cannot be right (:class:`CheckpointError` naming ``source`` and the first bad tensor).

    A floating model tensor loaded from an integer/bool tensor (``load_state_dict`` would silently
    cast it: a black image), and any tensor to load holding NaN or inf.
    """
    own = net.state_dict()
    for key, value in state.items():
        mine = own.get(key)
        if mine is None or tuple(mine.shape) != tuple(value.shape):
            continue  # not loaded: the mismatch report / the non-strict warning covers it
        if mine.is_floating_point() and not (value.is_floating_point() or value.is_complex()):
            raise CheckpointError(
                f"{source}: tensor '{key}' is {value.dtype} but the model's is {mine.dtype}: integer weights cannot be "
                'this network\'s (a quantized or corrupted file?). Use the float checkpoint.')
        floating = value.is_floating_point() or value.is_complex()
        if floating and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"{source}: tensor '{key}' holds {bad} NaN/inf value(s) of {value.numel()}: the weights diverged "
                'before this checkpoint was saved. Use an earlier checkpoint.')


def _has_own_diagnosis(net: nn.Module) -> bool:
    return type(net).load_state_dict is not nn.Module.load_state_dict


def load_state(net: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
               source: str = 'checkpoint') -> List[str]:
    """Load a cleaned state dict into a bare ``net`` (see module doc for strict / non-strict).

    Returns the model keys that did not load (always empty with ``strict=True``). Raises
    :class:`CheckpointError` (a ConfigError and a RuntimeError) for weights that cannot be right or
    do not fit.
    """
    check_loadable(net, state, source)
    if strict:
        if _has_own_diagnosis(net):  # e.g. HAT fills older checkpoints' index buffers: its own method reports
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f'{source}: {err}') from err
            return []
        message = describe_mismatch(net, state, source)
        if message is not None:
            raise CheckpointError(message)
        net.load_state_dict(state, strict=True)
        return []
    own = net.state_dict()
    wrong = [key for key, value in state.items() if key in own and tuple(own[key].shape) != tuple(value.shape)]
    if own and len(wrong) + sum(key not in own for key in state) == len(state):
        raise CheckpointError(f'{source}: not one tensor fits {type(net).__name__} (path.strict_load_g: false loads '
                              f'matching keys only, so the whole network would stay random). Is this checkpoint for '
                              f'this arch and these network_g options? First checkpoint keys: {preview(list(state))}')
    result = net.load_state_dict(OrderedDict((k, v) for k, v in state.items() if k not in wrong), strict=False)
    wrong_set = set(wrong)
    missing = [key for key in result.missing_keys if key not in wrong_set]
    sections = [('model tensors not in the checkpoint (left as initialised, i.e. random)', missing),
                ('tensors of another shape (left as initialised)',
                 [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}' for k in wrong]),
                ('checkpoint keys the model does not have (ignored)', list(result.unexpected_keys))]
    if any(keys for _, keys in sections):
        lines = [f'{source}: loaded with path.strict_load_g: false, and NOT everything loaded:']
        for title, keys in sections:
            if keys:
                lines.append(f'  {title} ({len(keys)}):')
                lines.extend(f'    {key}' for key in keys)
        logger.warning('\n'.join(lines))
    return list(result.missing_keys)


def load_weights(net: nn.Module, path: Union[str, os.PathLike], param_key: Optional[str] = 'params',
                 strict: bool = True) -> Optional[str]:
    """Load ``path`` into ``net`` (DataParallel/DDP wrappers are unwrapped). Returns the key used.

    ``param_key`` is the entry asked for (callers get it from :func:`choose_param_key`); a
    ``.safetensors`` of this project is held to its metadata (:func:`select_weights`).
    """
    from .distributed import get_bare_model

    net = get_bare_model(net)
    checkpoint = open_checkpoint(path)
    state, key_used = select_weights(checkpoint, param_key)
    source = f"'{os.fspath(path)}' [{key_used or 'root'}]"
    not_loaded = load_state(net, state, strict=strict, source=source)
    total = len(net.state_dict())
    logger.info(f'Loaded {type(net).__name__} from {source} (strict={strict}): '
                f'{total - len(not_loaded)} of {total} tensors.')
    return key_used
