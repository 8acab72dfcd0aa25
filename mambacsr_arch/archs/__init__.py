"""Architectures; importing this package registers them in BasicSR's ARCH_REGISTRY."""
