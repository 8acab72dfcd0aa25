"""Safe registration into BasicSR's registries.

BasicSR's ``Registry.register`` raises on a duplicate name. A plugin must coexist with other
plugins and BasicSR forks, so we:

* register ``Name`` unless someone else already owns it (then keep theirs and warn once);
* always register the namespaced alias ``mambacsr_arch.Name`` (usable as ``type:`` in YAML);
* treat re-registration of our own class (second import, ``importlib.reload``) as harmless.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Set, Tuple, TypeVar

T = TypeVar('T')
NAMESPACE = 'mambacsr_arch'
_WARNED: Set[Tuple[str, str]] = set()


def _is_ours(obj: object) -> bool:
    return getattr(obj, '__module__', '').split('.')[0] == NAMESPACE


def register(registry, obj: T, name: Optional[str] = None) -> T:
    """Register ``obj`` in a BasicSR ``Registry`` under ``name`` and ``mambacsr_arch.<name>``."""
    name = name or obj.__name__
    obj_map = registry._obj_map  # BasicSR's Registry has no public "replace" or "contains"
    existing = obj_map.get(name)
    if existing is None or _is_ours(existing):
        obj_map[name] = obj
    elif existing is not obj:
        key = (registry._name, name)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"{registry._name} registry already has '{name}' from "
                f"{getattr(existing, '__module__', '?')}; keeping it. mambacsr_arch's version is "
                f"available as type '{NAMESPACE}.{name}'.",
                stacklevel=2)
    obj_map[f'{NAMESPACE}.{name}'] = obj
    return obj


def registers(registry, name: Optional[str] = None) -> Callable[[T], T]:
    """Decorator form of :func:`register`: ``@registers(ARCH_REGISTRY)``."""

    def decorator(obj: T) -> T:
        return register(registry, obj, name)

    return decorator
