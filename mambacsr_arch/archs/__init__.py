"""Architectures, one folder each (``arch.py`` the registered network, ``blocks.py``, ``checkpoint.py``
what its state dicts show); importing this package registers them in BasicSR's ARCH_REGISTRY."""
from . import hat, mambacsr  # noqa: F401  (registers HAT; DISBlock, CrossScaleBlock, MambaCSR)
