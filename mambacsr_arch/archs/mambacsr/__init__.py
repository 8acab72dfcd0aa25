"""MambaCSR: ``arch.py`` (registered ``MambaCSR``), ``blocks.py`` (``DISBlock``, ``CrossScaleBlock``),
``ss2d.py`` (the scan mixer and its reference forward), ``checkpoint.py``."""
from . import arch, blocks  # noqa: F401  (registers DISBlock, CrossScaleBlock, MambaCSR)
