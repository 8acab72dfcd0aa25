"""``basicsr test``: BasicSR's own ``test_pipeline`` with plugins loaded and CPU gaps fixed.

Results land under ``./results/<name>`` unless the option file sets ``path.results_root``.

The option file is validated before anything is built (:mod:`mambacsr_arch.cli.option_checks`);
a bad one prints ``basicsr test: error: <what and where to fix>`` and exits with status 2.
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
    import basicsr.test as basicsr_test

    sys.argv = ['basicsr test'] + argv
    try:
        basicsr_test.test_pipeline(root_path=os.getcwd())
    except OptionError as err:  # a bad option file: one message, exit status 2, no traceback
        return report('test', err)
    return 0
