"""CPU selective-scan backend (numba kernel). Placeholder until the kernel lands."""
from __future__ import annotations

from typing import Optional


def unavailable_reason() -> Optional[str]:
    return 'cpu kernel not implemented yet'


def scan_core(*args, **kwargs):
    raise RuntimeError('cpu kernel not implemented yet')
