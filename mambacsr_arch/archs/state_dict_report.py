"""What every architecture's ``checkpoint.py`` shares: THE report for "this checkpoint does not match
this network" (:func:`describe_mismatch`, one format for every arch and caller), the key markers that
tell architectures apart, the pixel-shuffle scale read from ``upsample.*`` keys
(:func:`pixelshuffle_scale`) and the helpers of detection.

Each architecture's reader (``archs/<net>/checkpoint.py``) provides ``options_from_shapes(state_dict)
-> {option: (value, evidence key)}``; the report reads the model and the checkpoint with it and names
the ``network_g`` options that differ.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple


class DetectionError(ValueError):
    """The state dict is not one :func:`mambacsr_arch.archs.detect.detect_arch` can rebuild; the message
    says what it recognised."""


def positive_int(arch: str, name: str, value: Any) -> None:
    """Raise ValueError naming ``network_g.<name>`` unless ``value`` is an int >= 1 (constructor checks)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{arch}: {name} must be an integer >= 1, got {value!r} (network_g.{name} / --arch-opt).')


def positive_number(arch: str, name: str, value: Any) -> None:
    """Raise ValueError naming ``network_g.<name>`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float('inf'):
        raise ValueError(f'{arch}: {name} must be a number > 0, got {value!r} (network_g.{name} / --arch-opt).')


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


# ----------------------------------------------------------------------------- shared shape readers


_UPSAMPLE_CONV = re.compile(r'^upsample\.(\d+)\.weight$')


def pixelshuffle_scale(state_dict: Mapping[str, Any]) -> Optional[int]:
    """The upscale of BasicSR's ``Upsample`` (conv + PixelShuffle steps) from its ``upsample.<i>.weight`` convs.

    ``Upsample(2**n)`` holds n convs (4 F, F, 3, 3), ``Upsample(3)`` one (9 F, F, 3, 3), ``Upsample(1)``
    none. Returns 3 or 2**n, or None when there is no ``upsample.*`` conv or the shapes are neither
    (e.g. HAT's ``pixelshuffledirect``, whose single conv maps F to scale**2 * out channels).
    """
    convs = [state_dict[key] for key in sorted(state_dict, key=lambda k: (len(k), k)) if _UPSAMPLE_CONV.match(key)]
    shapes = [tuple(getattr(w, 'shape', ())) for w in convs]
    if not shapes or any(len(s) != 4 or s[1] == 0 for s in shapes):
        return None
    ratios = [s[0] / s[1] for s in shapes]
    if ratios == [9.0]:
        return 3
    if all(r == 4.0 for r in ratios):
        return 2**len(ratios)
    return None


def _generic_options(sd: Mapping[str, Any]) -> Dict[str, Tuple[Any, str]]:
    """Options of a SwinIR-family network (or any with ``conv_first``/``layers.N``/``upsample.N``) its shapes show."""
    found: Dict[str, Tuple[Any, str]] = {}
    first = sd.get('conv_first.weight')
    if first is not None and getattr(first, 'ndim', 0) == 4:
        found['embed_dim'] = (int(first.shape[0]), 'conv_first.weight')
        found['in_chans'] = (int(first.shape[1]), 'conv_first.weight')
    layers = {int(m.group(1)) for m in (re.match(r'^layers\.(\d+)\.', k) for k in sd) if m}
    if layers:
        found['depths'] = (f'{len(layers)} groups', 'layers.*')
    scale = pixelshuffle_scale(sd)
    if scale is not None:
        found['upscale'] = (scale, 'upsample.*')
    return found


def _reader_for(model: Any):
    from .detect import CHECKPOINT_READERS  # deferred: detect imports this module

    names = {cls.__name__ for cls in type(model).__mro__}
    return next((reader for reader in CHECKPOINT_READERS if reader.ARCH in names), None)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-6
        except (TypeError, ValueError):
            return False
    return a == b


def option_hints(model: Any, state_dict: Mapping[str, Any]) -> List[str]:
    """``network_g`` options that most likely differ between ``model`` and ``state_dict``, one line each.

    Both sides are read by the same function, the model's architecture reader
    (``<arch>/checkpoint.py: options_from_shapes``), or for other networks the SwinIR-family key
    names (``conv_first``, ``layers.N``, ``upsample.N``).
    """
    reader = _reader_for(model)
    read = reader.options_from_shapes if reader is not None else _generic_options
    own = model.state_dict()
    mine, theirs = read(own), read(state_dict)
    return [f'network_g.{name}: model has {mine[name][0]!r}, checkpoint has {value!r} (from {evidence})'
            for name, (value, evidence) in theirs.items() if name in mine and not _same(mine[name][0], value)]


def describe_mismatch(model: Any, state_dict: Mapping[str, Any], source: str = 'the checkpoint',
                      strict: bool = True, limit: int = 8) -> Optional[str]:
    """THE strict-loading report: None if ``model.load_state_dict(state_dict, strict)`` fits, else one message.

    Used by :func:`mambacsr_arch.models.weights.load_state` and by MambaCSR's and HAT's
    ``load_state_dict``. It names the missing, unexpected and mis-shaped keys, then the cause: a
    wrapper dict (``params``/``params_ema``) or a ``module.`` prefix left on, a checkpoint of another
    architecture (one sentence, no option hints: they would be nonsense), else the ``network_g``
    options that differ (:func:`option_hints`), else the first differing tensor.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and hasattr(state_dict[k], 'shape')
             and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if not wrong and (not strict or not (missing or unexpected)):
        return None
    arch = type(model).__name__
    keys = list(state_dict)
    header = (f'{source} does not match {arch} (strict loading): {len(missing)} missing, {len(unexpected)} '
              f'unexpected, {len(wrong)} mis-shaped keys.')
    hints: List[str] = []
    no_hint = ("no network_g option visible in the shapes differs: is path.param_key_g right ('params', "
               "'params_ema' or ~), and is this checkpoint for this architecture?")
    wrappers = [k for k in keys if k in ('params', 'params_ema', 'state_dict', 'model', 'net')
                and not hasattr(state_dict[k], 'shape')]
    foreign = foreign_checkpoint(arch, keys)
    if wrappers:
        no_hint = (f"the dict holds {wrappers}: load the inner dict (BasicSR: path.param_key_g, e.g. "
                   f"'{wrappers[0]}'), not the whole file.")
    elif keys and all(k.startswith('module.') for k in keys):
        no_hint = "every key starts with 'module.': strip that DataParallel/DDP prefix."
    elif foreign:
        header = f'{source} does not match {arch}: {foreign}'
        no_hint = '(the keys differ because the architectures differ.)'
    else:
        hints = option_hints(model, state_dict)
        if not hints and wrong:
            key = wrong[0]
            no_hint = (f'a width option (mlp_ratio, d_state, ...) differs: first differing tensor {key} '
                       f'{tuple(state_dict[key].shape)} in the checkpoint vs {tuple(own[key].shape)} in the model.')
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}' for k in wrong]
    lines = format_mismatch(header, missing, unexpected, shapes, hints, no_hint, limit=limit)
    if not foreign:  # loading the few keys two architectures share would be nonsense
        lines.append('  (path.strict_load_g: false loads the matching keys only.)')
    return '\n'.join(lines)
