"""Which architecture a state dict belongs to, and the ``network_g`` options that rebuild it.

:func:`detect_arch` is the one entry point (``basicsr infer`` without ``--opt``/``--arch``,
``basicsr export``, the spandrel integration; a ``.safetensors`` this project wrote carries its
``network_g`` instead, which :func:`mambacsr_arch.cli.common.resolve_network` prefers). It knows
no architecture itself: it asks each architecture's ``checkpoint.py`` (:data:`CHECKPOINT_READERS`)
in turn. Each reader declares ``ARCH``,
``MARKERS`` (key fragments only its state dicts have), ``ASSUMED`` (options no tensor shows, set from
the released configuration and listed as assumptions; override with ``--arch-opt KEY=VALUE``) and
``options_from_state(state_dict) -> (kwargs, assumptions)`` and ``options_from_shapes(state_dict)
-> {option: (value, evidence key)}`` (read by the one strict-load report). A new architecture is one folder with a
``checkpoint.py`` plus one line in :data:`CHECKPOINT_READERS`.

A state dict that is none of them raises :class:`DetectionError` naming what was recognised.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch

from .hat import checkpoint as hat_checkpoint
from .mambacsr import checkpoint as mambacsr_checkpoint
from .state_dict_report import DetectionError, checkpoint_arch, preview

__all__ = ['DetectionError', 'detect_arch', 'detect_network', 'SUPPORTED_ARCHS', 'CHECKPOINT_READERS']

#: One checkpoint reader per architecture of this package, asked in this order.
CHECKPOINT_READERS = (hat_checkpoint, mambacsr_checkpoint)
SUPPORTED_ARCHS = tuple(reader.ARCH for reader in CHECKPOINT_READERS)
_READER = {reader.ARCH: reader for reader in CHECKPOINT_READERS}


def detect_arch(state_dict: Mapping[str, torch.Tensor]) -> Tuple[str, Dict[str, Any], List[str]]:
    """``(arch name, network_g kwargs, assumptions)`` for a canonical state dict (no wrapper, no prefix).

    ``network_g kwargs`` include ``type`` and are ready for ``basicsr.archs.build_network``;
    ``assumptions`` are one line per option set from the released configuration because no tensor
    shows it. Raises :class:`DetectionError` for another or an unrecognised architecture.
    """
    keys = list(state_dict)
    if not keys or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise DetectionError('cannot detect the architecture: the checkpoint holds no state dict of tensors.')
    found = checkpoint_arch(keys)
    if found is None or found[0] not in _READER:
        what = (f"a {found[0]} checkpoint (it has '{found[1]}')" if found else
                'not one key pattern of a known architecture')
        markers = '; '.join(f"{r.ARCH}: {' or '.join(repr('*' + m + '*') for m in r.MARKERS)} keys"
                            for r in CHECKPOINT_READERS)
        raise DetectionError(
            f'cannot detect the architecture: this is {what}. Detected are {" and ".join(SUPPORTED_ARCHS)} '
            f'({markers}). For another arch pass --opt test.yml or --arch NAME with its options. '
            f'First keys: {preview(keys, 6)}')
    arch = found[0]
    kwargs, assumptions = _READER[arch].options_from_state(state_dict)
    return arch, dict(type=arch, **kwargs), assumptions


def detect_network(state_dict: Mapping[str, torch.Tensor],
                   overrides: Mapping[str, Any] = ()) -> Tuple[Dict[str, Any], str]:
    """``(network_g options, one-line summary)``: :func:`detect_arch`, then ``overrides`` (``--arch-opt``) on top.

    The summary names the arch, its key options and scale, and the assumed options not overridden.
    """
    arch, kwargs, assumptions = detect_arch(state_dict)
    overrides = dict(overrides)
    kwargs.update(overrides)
    shown = ', '.join(f'{name}={kwargs[name]!r}' for name in _READER[arch].SUMMARY if name in kwargs)
    assumed = [line for line in assumptions if line.split('=', 1)[0] not in overrides]
    summary = f"detected {arch} x{kwargs.get('upscale')} from the weights: {shown}"
    if overrides:
        summary += f'; --arch-opt: {overrides}'
    if assumed:
        summary += f"; assumed (override with --arch-opt KEY=VALUE): {'; '.join(assumed)}"
    return kwargs, summary
