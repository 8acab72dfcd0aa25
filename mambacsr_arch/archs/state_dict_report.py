"""One format for "this checkpoint does not match this network" errors (archs and models share it)."""
from __future__ import annotations

from typing import List, Sequence


def preview(keys: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` keys, comma-separated, with a count of the rest."""
    shown = ', '.join(keys[:limit])
    return shown + (f', ... (+{len(keys) - limit} more)' if len(keys) > limit else '')


def format_mismatch(header: str, missing: Sequence[str], unexpected: Sequence[str], wrong_shape: Sequence[str],
                    hints: Sequence[str], no_hint: str, limit: int = 8) -> List[str]:
    """Lines of a strict-loading error: the header, the key lists, then the likely wrong options.

    ``hints`` are ``network_g`` options that probably differ (one line each); ``no_hint`` is said
    instead when there are none.
    """
    lines = [header]
    for title, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                        ('shape mismatches', wrong_shape)):
        if keys:
            lines.append(f'  {title} ({len(keys)}): {preview(keys, limit)}')
    if hints:
        lines.append('  likely wrong network_g options (fix them in your option file):')
        lines.extend(f'    {hint}' for hint in hints)
    else:
        lines.append(f'  {no_hint}')
    return lines
