"""``basicsr test``: BasicSR's own ``test_pipeline`` with plugins loaded and CPU gaps fixed.

Results land under ``./results/<name>`` unless the option file (or ``--force_yml
path:results_root=...``, typed and key-checked as for ``basicsr train``) sets ``path.results_root``.

The option file is validated before anything is built (:mod:`mambacsr_arch.cli.option_checks`);
a bad option file, dataset or resume state prints ``basicsr test: error: <what and where to fix>``
and exits with status 2 (see :func:`mambacsr_arch.cli.runtime.run_pipeline`).
"""
from __future__ import annotations

from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from mambacsr_arch.cli import runtime

    return runtime.run_pipeline('test', argv)
