"""Compatibility shims applied once, before BasicSR is imported.

* basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, a module torchvision
  0.17 renamed to ``_functional_tensor``. We alias the old name when (and only when) it is
  missing. BasicSR git master no longer needs this and is left untouched.
* torch >= 2.6 loads with ``weights_only=True`` by default. BasicSR training states hold
  ``collections.Counter`` (MultiStepLR milestones) and similar plain containers; we allow
  exactly those classes as safe globals so resume works without ``weights_only=False``.

Every shim is idempotent: calling :func:`apply` twice changes nothing the second time.
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import sys
from typing import List


def _alias_torchvision_functional_tensor() -> bool:
    """Register ``torchvision.transforms.functional_tensor`` if torchvision lacks it."""
    old_name = 'torchvision.transforms.functional_tensor'
    if old_name in sys.modules:
        return False
    try:
        if importlib.util.find_spec(old_name) is not None:
            return False
    except ModuleNotFoundError:  # torchvision itself missing: basicsr will say so itself
        return False
    try:
        new_module = importlib.import_module('torchvision.transforms._functional_tensor')
    except ImportError:
        return False
    sys.modules[old_name] = new_module
    return True


def _allow_training_state_globals() -> bool:
    """Allow the plain classes found in BasicSR ``.state`` files under ``weights_only=True``."""
    import torch.serialization as serialization

    add_safe_globals = getattr(serialization, 'add_safe_globals', None)
    if add_safe_globals is None:  # torch < 2.4: weights_only is opt-in, nothing to do
        return False
    wanted = [collections.Counter, collections.OrderedDict, collections.defaultdict]
    present = set(serialization.get_safe_globals()) if hasattr(serialization, 'get_safe_globals') else set()
    missing = [cls for cls in wanted if cls not in present]
    if missing:
        add_safe_globals(missing)
    return bool(missing)


def apply() -> List[str]:
    """Apply every needed shim; return the names of those applied by this call."""
    applied = []
    if _alias_torchvision_functional_tensor():
        applied.append('torchvision.transforms.functional_tensor alias')
    if _allow_training_state_globals():
        applied.append('torch.load safe globals for BasicSR training states')
    return applied
