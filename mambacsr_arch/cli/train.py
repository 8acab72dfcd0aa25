"""``basicsr train``: BasicSR's own ``train_pipeline`` with plugins loaded and CPU gaps fixed.

Experiments land under the current directory (``./experiments/<name>``) unless the option
file sets ``path.experiments_root``. Flags are BasicSR's: ``-opt``, ``--launcher``,
``--auto_resume``, ``--debug``, ``--force_yml``, ``--local_rank`` (or ``--local-rank``).
``--force_yml key:key=value`` values are typed as YAML (``train:optim_g:lr=2e-4`` is a number), their
keys are checked (a misspelt one is named, with a did-you-mean), and ``path:experiments_root=...`` is
honoured; several ``--force_yml`` flags all apply.

The option file is validated before anything is built (:mod:`mambacsr_arch.cli.option_checks`);
a bad option file, dataset or resume state prints ``basicsr train: error: <what and where to fix>``
and exits with status 2 (see :func:`mambacsr_arch.cli.runtime.run_pipeline`).
"""
from __future__ import annotations

from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from mambacsr_arch.cli import runtime

    return runtime.run_pipeline('train', argv)
