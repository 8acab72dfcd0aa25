"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest


@pytest.fixture
def fresh_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan dispatcher afresh: empty availability cache and log memory, no backend from the environment."""
    import mambacsr_arch  # noqa: F401  (shims before torch users)
    from mambacsr_arch.ops import ENV_VAR, dispatch

    monkeypatch.setattr(dispatch, '_AVAILABILITY', {})
    monkeypatch.setattr(dispatch, '_LOGGED', set())
    monkeypatch.delenv(ENV_VAR, raising=False)
