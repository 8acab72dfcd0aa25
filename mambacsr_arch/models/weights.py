"""Loading network weights from BasicSR-style checkpoint files, with actionable errors.

A checkpoint file is a ``.pth`` (``torch.load(weights_only=True)``) or a ``.safetensors`` file
(:func:`read_checkpoint`), holding ``{'params': sd, 'params_ema': sd, ...}`` (BasicSR, official
MambaCSR/HAT releases), another trainer's wrapper (``state_dict``, ``model``, ``net``) or a bare
state dict. :func:`load_weights` picks the sub-dict named by ``param_key`` (an absent wrapper key
falls back along params_ema > params > state_dict > model > net > bare, as BasicSR's
``params_ema`` -> ``params``; ``'auto'`` takes the first present; ``None``/``'none'``/``''`` means
the file *is* the state dict), strips ``module.``/``netG.`` prefixes (:func:`select_params`) and
loads it. With ``strict=True`` a mismatch raises one RuntimeError listing the missing,
unexpected and wrongly shaped keys and the most likely wrong hyper-parameter. Archs that
override ``load_state_dict`` with their own diagnosis (e.g. HAT) keep it: their message is
used instead of the generic one. With ``strict=False`` (``path.strict_load_g: false``, as the
official test files set) every tensor that matches is loaded, and every key that did not load is
listed in one warning on the ``basicsr`` logger: model tensors missing from the checkpoint or of
another shape (they keep their initial, random values) and checkpoint keys the model lacks. A
checkpoint of which not one tensor fits raises instead of leaving the whole network random.
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..archs.state_dict_report import foreign_checkpoint, format_mismatch, preview
from ..fileio import atomic_path

logger = logging.getLogger('basicsr')
NO_KEY = (None, '', 'none', 'None', '~')


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


#: Wrapper entries a checkpoint's network weights are found under, most preferred first: BasicSR
#: (``params_ema``, ``params``), PyTorch Lightning / timm (``state_dict``), other trainers (``model``, ``net``).
WRAPPER_KEYS = ('params_ema', 'params', 'state_dict', 'model', 'net')
#: Key prefixes stripped from every key: DataParallel/DDP (``module.``) and GAN trainers' generator (``netG.``).
STRIP_PREFIXES = ('module.', 'netG.')
SAFETENSORS_SUFFIX = '.safetensors'


def _is_safetensors(path: str) -> bool:
    """True for a ``.safetensors`` name, or a file laid out like one (8-byte header size, then a JSON '{')."""
    if path.lower().endswith(SAFETENSORS_SUFFIX):
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and not head.startswith(b'PK')


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError('reading or writing .safetensors files needs the safetensors package: '
                          'pip install safetensors') from err
    return safetensors.torch


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """A checkpoint file as a dict on the CPU; errors name the file.

    ``.pth``/``.pt`` (or any torch.save file): ``torch.load(weights_only=True)``, so no pickled code
    runs. ``.safetensors`` (by name or content): the flat tensor dict, read with the safetensors package.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist: check path.pretrain_network_g "
                                f'in your option file (or --weights).')
    try:
        if _is_safetensors(path):
            obj = _safetensors().load_file(path, device='cpu')
        else:
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except ImportError:
        raise
    except Exception as err:  # corrupt, truncated or pickled with unexpected classes
        raise RuntimeError(f"cannot read checkpoint '{path}': {type(err).__name__}: {err}") from err
    if not isinstance(obj, Mapping):
        raise RuntimeError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of tensors.")
    return dict(obj)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a bare state dict as ``.safetensors``, atomically (temporary file, then rename).

    Shared storage (tied or view tensors) is copied apart, as the format requires.
    """
    path = os.fspath(path)
    if not _is_state_dict(state_dict):
        raise ValueError(f"'{path}': only a non-empty dict of tensors can be saved as safetensors.")
    tensors = {key: value.detach().to('cpu').contiguous().clone() for key, value in state_dict.items()}
    with atomic_path(path) as tmp:
        _safetensors().save_file(tensors, tmp, metadata=dict(metadata or {}))


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


def select_params(checkpoint: Mapping[str, Any], param_key: Optional[str], source: str = 'checkpoint'
                  ) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The network state dict in ``checkpoint``, canonicalised: one wrapper entry, prefixes stripped.

    ``param_key``: the entry to load; None/'none'/'~' means the file is the state dict; ``'auto'``
    picks the first present of :data:`WRAPPER_KEYS` (params_ema > params > state_dict > model > net),
    else the bare dict. A key of :data:`WRAPPER_KEYS` that is absent falls back the same way (logged),
    as BasicSR's ``params_ema`` -> ``params``; any other absent key is an error naming the entries.
    ``module.``/``netG.`` prefixes are stripped (:func:`strip_prefixes`).

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
    else:
        raise KeyError(f"{source}: param key '{key_used}' not found; the file has {sorted(checkpoint)}. "
                       f'Set path.param_key_g to one of those (or ~ for a bare state dict).')
    # one nested wrapper more, e.g. {'state_dict': {'params': ...}} or {'model': {'params_ema': ...}}
    if not _is_state_dict(state) and isinstance(state, Mapping) and _find_wrapped(state) is not None:
        inner = _find_wrapped(state)
        logger.info(f"{source}: '{key_used or '<root>'}' wraps '{inner}', loading that.")
        key_used, state = f"{key_used or '<root>'}.{inner}" if key_used else inner, state[inner]
    if not _is_state_dict(state):
        raise RuntimeError(f"{source}: the entry '{key_used or '<root>'}' is not a dict of tensors "
                           f'(keys: {list(state)[:8]}); check path.param_key_g.')
    return strip_prefixes(state, source), key_used


def _indices(keys: List[str], pattern: str) -> List[int]:
    found = set()
    for key in keys:
        match = re.match(pattern, key)
        if match:
            found.add(int(match.group(1)))
    return sorted(found)


def guess_wrong_option(own: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> List[str]:
    """Hyper-parameters that most likely differ, from SwinIR-family key names and shapes."""
    hints = []
    own_keys, new_keys = list(own), list(loaded)
    for name in ('conv_first.weight',):
        if name in own and name in loaded and own[name].shape != loaded[name].shape:
            mine, theirs = tuple(own[name].shape), tuple(loaded[name].shape)
            if mine[0] != theirs[0]:
                hints.append(f'embed_dim: model has {mine[0]}, checkpoint has {theirs[0]} ({name})')
            if mine[1] != theirs[1]:
                hints.append(f'in_chans: model has {mine[1]}, checkpoint has {theirs[1]} ({name})')
    layers_own, layers_new = _indices(own_keys, r'layers\.(\d+)\.'), _indices(new_keys, r'layers\.(\d+)\.')
    if layers_own != layers_new and layers_new:
        hints.append(f'depths (number of groups): model has {len(layers_own)}, checkpoint has {len(layers_new)}')
    else:
        for layer in layers_new:
            pat = rf'layers\.{layer}\.residual_group\.blocks\.(\d+)\.'
            if len(_indices(own_keys, pat)) != len(_indices(new_keys, pat)):
                hints.append(f'depths[{layer}]: model has {len(_indices(own_keys, pat))} blocks, checkpoint '
                             f'has {len(_indices(new_keys, pat))}')
                break
    up_own, up_new = _indices(own_keys, r'upsample\.(\d+)\.'), _indices(new_keys, r'upsample\.(\d+)\.')
    if up_own != up_new and up_new:
        hints.append(f'upscale: the upsampler differs (model upsample.{up_own}, checkpoint upsample.{up_new})')
    if not hints:
        for key in own_keys:
            if key in loaded and own[key].shape != loaded[key].shape:
                hints.append(f'a width option (mlp_ratio, d_state, ...): first differing tensor {key} '
                             f'{tuple(loaded[key].shape)} in checkpoint vs {tuple(own[key].shape)} in model')
                break
    return hints


def describe_mismatch(net: nn.Module, loaded: Mapping[str, torch.Tensor], source: str) -> Optional[str]:
    """A multi-line message naming mismatching keys and likely wrong options, or None if all match."""
    own = net.state_dict()
    missing = [k for k in own if k not in loaded]
    unexpected = [k for k in loaded if k not in own]
    wrong = [f'{k} {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}' for k in own
             if k in loaded and tuple(own[k].shape) != tuple(loaded[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    foreign = foreign_checkpoint(type(net).__name__, loaded)  # then option hints from shapes are nonsense
    lines = format_mismatch(f'{source} does not match {type(net).__name__} (strict loading).', missing,
                            unexpected, wrong, [] if foreign else guess_wrong_option(own, loaded),
                            foreign or "no hyper-parameter difference detected: is path.param_key_g right ('params', "
                            "'params_ema' or ~), and is this checkpoint for this architecture?", limit=10)
    lines.append('  (path.strict_load_g: false loads the matching keys only.)')
    return '\n'.join(lines)


def _has_own_diagnosis(net: nn.Module) -> bool:
    return type(net).load_state_dict is not nn.Module.load_state_dict


def load_state(net: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
               source: str = 'checkpoint') -> List[str]:
    """Load a cleaned state dict into a bare ``net`` (see module doc for strict / non-strict).

    Returns the model keys that did not load (always empty with ``strict=True``).
    """
    if strict:
        if not _has_own_diagnosis(net):
            message = describe_mismatch(net, state, source)
            if message is not None:
                raise RuntimeError(message)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise RuntimeError(f'{source}: {err}') from err
        return []
    own = net.state_dict()
    wrong = [key for key, value in state.items() if key in own and tuple(own[key].shape) != tuple(value.shape)]
    if own and len(wrong) + sum(key not in own for key in state) == len(state):
        raise RuntimeError(f'{source}: not one tensor fits {type(net).__name__} (path.strict_load_g: false loads '
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
    """Load ``path`` into ``net`` (DataParallel/DDP wrappers are unwrapped). Returns the key used."""
    from .distributed import get_bare_model

    net = get_bare_model(net)
    checkpoint = read_checkpoint(path)
    state, key_used = select_params(checkpoint, param_key, source=f"'{os.fspath(path)}'")
    source = f"'{os.fspath(path)}' [{key_used or 'root'}]"
    not_loaded = load_state(net, state, strict=strict, source=source)
    total = len(net.state_dict())
    logger.info(f'Loaded {type(net).__name__} from {source} (strict={strict}): '
                f'{total - len(not_loaded)} of {total} tensors.')
    return key_used
