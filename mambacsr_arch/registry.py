"""Safe registration into BasicSR's registries.

BasicSR's ``Registry.register`` raises on a duplicate name. A plugin must coexist with other
plugins and BasicSR forks, so we:

* register ``Name`` unless someone else already owns it (then keep theirs and warn once);
* yield ``Name`` to a foreign class registered *after* us (e.g. ``import hat`` after ``import
  mambacsr_arch``: the official package's ``@ARCH_REGISTRY.register()`` would otherwise die on
  BasicSR's duplicate-name assertion); a warning says so once;
* always register the namespaced alias ``mambacsr_arch.Name`` (usable as ``type:`` in YAML);
* treat re-registration of our own class (second import, ``importlib.reload``) as harmless.

So whatever the import order, a bare name (``type: HAT``) belongs to the other package whenever
it is loaded in the process, and ours is always ``type: mambacsr_arch.HAT``. The original owner
of a name wins because code written for it (the official ``hat/train.py``, a fork's option
files) relies on it, while everything of ours can name the alias.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Set, Tuple, TypeVar

T = TypeVar('T')
NAMESPACE = 'mambacsr_arch'
_WARNED: Set[Tuple[str, str]] = set()


def _is_ours(obj: object) -> bool:
    return getattr(obj, '__module__', '').split('.')[0] == NAMESPACE


def _warn_once(registry, name: str, kept: object) -> None:
    key = (registry._name, name)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"{registry._name} registry: type '{name}' is {getattr(kept, '__module__', '?')}'s (another package "
            f"registered it); mambacsr_arch's version is available as type '{NAMESPACE}.{name}'.",
            stacklevel=3)


def _yield_to_foreign_registrations(registry) -> None:
    """Make ``registry`` hand a bare name of ours over to a foreign class registered later (once)."""
    if registry.__dict__.get('_mambacsr_yields'):
        return
    original = registry._do_register  # bound method of this instance

    def _do_register(name, obj, suffix=None):
        key = f'{name}_{suffix}' if isinstance(suffix, str) else name
        existing = registry._obj_map.get(key)
        if existing is not None and _is_ours(existing) and not _is_ours(obj):
            registry._obj_map[key] = obj  # ours stays reachable under its mambacsr_arch.* alias
            _warn_once(registry, key, obj)
            return None
        return original(name, obj, suffix)

    registry._do_register = _do_register
    registry._mambacsr_yields = True


def register(registry, obj: T, name: Optional[str] = None) -> T:
    """Register ``obj`` in a BasicSR ``Registry`` under ``name`` and ``mambacsr_arch.<name>``."""
    name = name or obj.__name__
    _yield_to_foreign_registrations(registry)
    obj_map = registry._obj_map  # BasicSR's Registry has no public "replace" or "contains"
    existing = obj_map.get(name)
    if existing is None or _is_ours(existing):
        obj_map[name] = obj
    elif existing is not obj:
        _warn_once(registry, name, existing)
    obj_map[f'{NAMESPACE}.{name}'] = obj
    return obj


def registers(registry, name: Optional[str] = None) -> Callable[[T], T]:
    """Decorator form of :func:`register`: ``@registers(ARCH_REGISTRY)``."""

    def decorator(obj: T) -> T:
        return register(registry, obj, name)

    return decorator
