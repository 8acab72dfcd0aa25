"""Architectures; importing this package registers them in BasicSR's ARCH_REGISTRY."""
from . import hat_arch  # noqa: F401,E402  (registers HAT)
from . import dis_blocks, mambacsr_arch  # noqa: F401,E402  (registers DISBlock, CrossScaleBlock, MambaCSR)
