"""What every architecture's ``checkpoint.py`` shares: one format for "this checkpoint does not match
this network" errors, the key markers that tell architectures apart, and the helpers of detection."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple


class DetectionError(ValueError):
    """The state dict is not one :func:`mambacsr_arch.archs.detect.detect_arch` can rebuild; the message
    says what it recognised."""


def preview(keys: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` keys, comma-separated, with a count of the rest."""
    shown = ', '.join(keys[:limit])
    return shown + (f', ... (+{len(keys) - limit} more)' if len(keys) > limit else '')


def format_mismatch(header: str, missing: Sequence[str], unexpected: Sequence[str], wrong_shape: Sequence[str],
                    hints: Sequence[str], no_hint: str, limit: int = 8) -> List[str]:
    """Lines of a strict-loading error: the header, the key lists, then the likely wrong options.

    ``hints`` are ``network_g`` options that probably differ (one line each); ``no_hint`` is said
    instead when there are none.
    """
    lines = [header]
    for title, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                        ('shape mismatches', wrong_shape)):
        if keys:
            lines.append(f'  {title} ({len(keys)}): {preview(keys, limit)}')
    if hints:
        lines.append('  likely wrong network_g options (fix them in your option file):')
        lines.extend(f'    {hint}' for hint in hints)
    else:
        lines.append(f'  {no_hint}')
    return lines


# Key fragments found in one architecture's state dicts only, tried in this order (HAT's blocks also
# carry SwinIR's attention tables; MambaIR's SS2D lacks MambaCSR's direction gates ``multi_scan.attn``).
# Not HAT's relative_position_index_* buffers: HAT.load_state_dict adds them to any state dict it is given.
# Our own architectures' markers come from their checkpoint.py (MARKERS), foreign ones are listed here.
_FOREIGN_MARKERS = (
    ('MambaIR', ('.self_attention.A_logs', '.self_attention.x_proj_weight')),
    ('SwinIR', ('.attn.relative_position_bias_table', )),
)


def _markers() -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    from .detect import CHECKPOINT_READERS  # deferred: detect imports this module

    return tuple((reader.ARCH, tuple(reader.MARKERS)) for reader in CHECKPOINT_READERS) + _FOREIGN_MARKERS


def checkpoint_arch(keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    """``(arch, evidence key)`` when the state-dict key names are unmistakably one architecture's, else None."""
    keys = list(keys)
    for arch, fragments in _markers():
        for key in keys:
            if any(fragment in key for fragment in fragments):
                return arch, key
    return None


def foreign_checkpoint(model_arch: str, keys: Iterable[str]) -> Optional[str]:
    """One sentence when the checkpoint belongs to another architecture than ``model_arch``, else None.

    Key-by-key hyper-parameter hints are meaningless then (a HAT checkpoint "implies" a
    MambaCSR ``compress_ratio``); callers say this instead.
    """
    found = checkpoint_arch(keys)
    if found is None or found[0] == model_arch:
        return None
    arch, evidence = found
    return (f"this is a {arch} checkpoint (it has '{evidence}'), not a {model_arch} one: set network_g.type: "
            f'{arch} with the options it was trained with, or load a {model_arch} checkpoint.')


def need(arch: str, found: Mapping[str, Any], names: Tuple[str, ...], keys: List[str]) -> None:
    """Raise :class:`DetectionError` when an option in ``names`` was not read from the checkpoint."""
    missing = [name for name in names if name not in found]
    if missing:
        raise DetectionError(f'{arch} checkpoint (by its key names) lacks the tensors that show {missing}: it is '
                             f'truncated or of a modified {arch}. Pass --opt test.yml or --arch {arch} with '
                             f'--arch-opt. First keys: {preview(keys, 6)}')


def assume(table: Mapping[str, Tuple[Any, str]], kwargs: Dict[str, Any]) -> List[str]:
    """Set every option of ``table`` (name -> (released value, what it does)) in ``kwargs``; one line each."""
    lines = []
    for name, (value, what) in table.items():
        kwargs[name] = value
        lines.append(f'{name}={value!r} ({what}; not visible in the weights)')
    return lines
