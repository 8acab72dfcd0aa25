"""``basicsr train``: BasicSR's own ``train_pipeline`` with plugins loaded and CPU gaps fixed.

Experiments land under the current directory (``./experiments/<name>``) unless the option
file sets ``path.experiments_root``. Flags are BasicSR's: ``-opt``, ``--launcher``,
``--auto_resume``, ``--debug``, ``--force_yml``, ``--local_rank`` (or ``--local-rank``).

The option file is validated before anything is built (:mod:`mambacsr_arch.cli.option_checks`);
a bad one prints ``basicsr train: error: <what and where to fix>`` and exits with status 2.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from mambacsr_arch.cli import runtime
    from mambacsr_arch.cli.option_checks import OptionError, report

    argv = runtime.normalize_argv(list(sys.argv[1:] if argv is None else argv))
    runtime.load_plugins()
    runtime.patch_basicsr()
    import basicsr.train as basicsr_train

    sys.argv = ['basicsr train'] + argv  # BasicSR's parse_options reads sys.argv
    try:
        basicsr_train.train_pipeline(root_path=os.getcwd())
    except OptionError as err:  # a bad option file: one message, exit status 2, no traceback
        return report('train', err)
    return 0
