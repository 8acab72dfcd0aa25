"""What ``basicsr infer`` and ``basicsr export`` share: the option file, ``--arch-opt``, and THE network
resolver.

:func:`resolve_network` turns an option file, ``--weights``/``--arch``/``--arch-opt`` and the
checkpoint itself into ``(network_g options, state dict, key used, summary)``, reading the
checkpoint once (:func:`mambacsr_arch.models.weights.open_checkpoint`). Which ``network_g``:

1. the option file's ``network_g`` (``--arch`` replaces its type);
2. else, with ``--arch``: the ``network_g`` stored in the file's metadata when it is of that type,
   else ``type: <arch>`` with the constructor's defaults (a checkpoint of another architecture is
   refused in one line);
3. else the ``network_g`` stored in the metadata of a ``.safetensors`` this project wrote (training
   or ``basicsr export``): the saved network exactly, options no weight shows included;
4. else detected from the weights (:func:`mambacsr_arch.archs.detect.detect_network`).

``--network-opt`` / ``--arch-opt`` (and, in 2-4, a ``network_g`` without ``type``) override on top;
when they, or the option file, override what the metadata stores, the summary says so. Which
checkpoint entry: :func:`mambacsr_arch.models.weights.choose_param_key` (the one rule). Every problem
is a :class:`~mambacsr_arch.errors.ConfigError` (one line, exit 2, printed by :mod:`.main`).
"""
from __future__ import annotations

import json
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mambacsr_arch.errors import ConfigError

__all__ = ['load_option_file', 'parse_arch_opts', 'parse_network_json', 'ResolvedNetwork', 'resolve_network',
           'build_and_load']


def load_option_file(path: str) -> Dict[str, Any]:
    """The option file ``path`` (``--opt``) as a dict, read as BasicSR does (ordered YAML)."""
    import yaml
    from basicsr.utils.options import ordered_yaml

    if not osp.isfile(path):
        raise ConfigError(f"option file '{path}' does not exist (--opt).")
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except yaml.YAMLError as err:
        raise ConfigError(f"option file '{path}' is not valid YAML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read option file '{path}': {err}") from err
    if not isinstance(opt, Mapping):
        raise ConfigError(f"option file '{path}' must be a YAML mapping with a network_g section.")
    return dict(opt)


def parse_arch_opts(items: Sequence[str]) -> Dict[str, Any]:
    """``--arch-opt KEY=VALUE ...`` as constructor kwargs (values parsed as YAML)."""
    import yaml

    kwargs = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise ConfigError(f"--arch-opt '{item}' is not KEY=VALUE (e.g. embed_dim=60).")
        if key.strip() == 'type':
            raise ConfigError(f"--arch-opt '{item}': the architecture is --arch {value.strip() or '<name>'}; "
                              '--arch-opt sets its constructor options.')
        try:
            kwargs[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--arch-opt '{item}': value is not valid YAML ({err}).") from err
    return kwargs


def parse_network_json(text: Optional[str]) -> Dict[str, Any]:
    """``--network-opt JSON`` as constructor kwargs ({} when not given)."""
    if not text:
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f'--network-opt is not valid JSON ({err}).') from err
    if not isinstance(extra, dict):
        raise ConfigError('--network-opt must be a JSON object, e.g. \'{"embed_dim": 60}\'.')
    return extra


@dataclass
class ResolvedNetwork:
    """The network to build and the weights to load into it, decided once."""
    network_opt: Dict[str, Any]  # network_g, with type: ready for basicsr.archs.build_network
    state: Dict[str, Any]  # the selected, prefix-stripped state dict
    weights: str
    key_used: Optional[str]  # the checkpoint entry loaded (None: the file is the state dict)
    strict: bool = True
    summary: List[str] = field(default_factory=list)  # lines to print once (where network_g came from)
    #: ``{entry: where it is}`` for every network entry of the source checkpoint (params, params_ema, ...)
    entries: Dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """``'<weights>' [<entry>]``: how messages name the weights."""
        return f"'{self.weights}' [{self.key_used or 'root'}]"


def _differences(stored: Mapping[str, Any], used: Mapping[str, Any]) -> Dict[str, Any]:
    return {key: used.get(key) for key in sorted(set(stored) | set(used)) if stored.get(key) != used.get(key)}


def resolve_network(weights: Optional[str] = None, *, opt: Optional[Mapping[str, Any]] = None,
                    opt_path: Optional[str] = None, param_key: Optional[str] = None, arch: Optional[str] = None,
                    overrides: Optional[Mapping[str, Any]] = None, strict: Optional[bool] = None) -> ResolvedNetwork:
    """THE network resolver of ``basicsr infer`` and ``basicsr export`` (module doc).

    Args:
        weights: ``--weights`` (else the option file's ``path.pretrain_network_g``).
        opt, opt_path: the option file (``--opt``) as read by :func:`load_option_file`, and its path.
        param_key: ``--param-key`` (else the one rule: ``path.param_key_g`` / ``params`` / ``params_ema``).
        arch: ``--arch`` (replaces ``network_g.type``).
        overrides: ``--network-opt`` and ``--arch-opt`` kwargs, in that order.
        strict: False for ``--no-strict`` (else ``path.strict_load_g``, default True).
    Raises:
        ConfigError: no weights, an unreadable or unsuitable checkpoint, an entry it does not hold, a
        checkpoint of another architecture than ``--arch``, an undetectable network.
    """
    from mambacsr_arch.archs.detect import DetectionError, detect_network
    from mambacsr_arch.archs.state_dict_report import checkpoint_arch
    from mambacsr_arch.models.weights import WRAPPER_KEYS, choose_param_key, open_checkpoint, select_weights

    has_file = opt is not None
    opt = dict(opt or {})
    where = f"option file '{opt_path}'" if opt_path else 'the command line'
    path_opt = dict(opt.get('path') or {})
    weights = weights or path_opt.get('pretrain_network_g')
    if not weights:
        raise ConfigError(f'no weights: pass --weights X.pth or set path.pretrain_network_g in {where}.')
    weights = str(weights)
    overrides = dict(overrides or {})
    key = choose_param_key(param_key, path_opt, has_file)
    strict = bool(path_opt.get('strict_load_g', True)) if strict is None else bool(strict)
    checkpoint = open_checkpoint(weights)
    state, key_used = select_weights(checkpoint, key)
    entries = checkpoint.entries or {name: f'{weights} [{name}]' for name, value in checkpoint.content.items()
                                     if name in WRAPPER_KEYS and isinstance(value, Mapping)}
    stored = checkpoint.network_g
    file_net = dict(opt.get('network_g') or {})
    summary: List[str] = []
    if file_net.get('type'):  # 1. the option file
        network_opt = dict(file_net, **overrides)
        if arch:
            network_opt['type'] = arch
        if stored is not None and _differences(stored, network_opt):
            summary.append(f"network_g of '{opt_path}' overrides the network_g stored in '{weights}' (differs in "
                           f'{_differences(stored, network_opt)}).')
        elif overrides:
            summary.append(f"network_g of '{opt_path}' with --arch-opt {overrides}")
        return ResolvedNetwork(network_opt, state, weights, key_used, strict, summary, entries)
    user = dict(file_net, **overrides)  # a network_g without type overrides like --arch-opt
    if arch and not (stored is not None and stored['type'] == arch):  # 2. --arch, no metadata of that arch
        from basicsr.utils.registry import ARCH_REGISTRY

        found = checkpoint_arch(state)  # (an unregistered --arch is named by check_network, at build time)
        if found is not None and found[0] != arch and arch in ARCH_REGISTRY:
            raise ConfigError(f"'{weights}' is a {found[0]} checkpoint (it has '{found[1]}'), not a {arch} one: pass "
                              f'--arch {found[0]} with its options, or leave --arch out to detect the network from '
                              'the weights.')
        return ResolvedNetwork(dict(user, type=arch), state, weights, key_used, strict, summary, entries)
    if stored is not None:  # 2./3. the metadata of a file this project wrote
        network_opt = dict(stored, **user)
        line = f"network_g from the metadata of '{weights}': {stored['type']} x{stored.get('upscale')}"
        changed = _differences(stored, network_opt)
        if changed:
            line += f'; overridden by --arch-opt / the option file: {changed}'
        summary.append(line)
        return ResolvedNetwork(network_opt, state, weights, key_used, strict, summary, entries)
    try:  # 4. detection
        network_opt, line = detect_network(state, user)
    except DetectionError as err:
        raise ConfigError(f"no network: no --opt or --arch, and '{weights}': {err}") from err
    return ResolvedNetwork(network_opt, state, weights, key_used, strict, [line], entries)


def build_and_load(resolved: ResolvedNetwork) -> Any:
    """Build ``resolved.network_opt`` (on the CPU) and load ``resolved.state`` into it; ConfigError when either
    fails (constructor values that would build a broken network, a mismatch, weights that cannot be right)."""
    from basicsr.archs import build_network

    from mambacsr_arch.models.weights import load_state

    network_opt = dict(resolved.network_opt)
    try:
        net = build_network(dict(network_opt))
    except (TypeError, ValueError, KeyError) as err:  # wrong or inconsistent constructor kwargs
        reason = (str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)).rstrip('.')
        raise ConfigError(f"cannot build {network_opt.get('type')} with {network_opt}: {reason}. Fix network_g / "
                          '--arch-opt / --network-opt.') from err
    try:
        load_state(net, resolved.state, strict=resolved.strict, source=resolved.source)
    except ConfigError:
        raise
    except RuntimeError as err:  # e.g. a foreign arch's own load_state_dict
        raise ConfigError(str(err)) from err
    return net
