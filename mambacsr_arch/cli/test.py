"""``basicsr test``: BasicSR's own ``test_pipeline`` with plugins loaded and CPU gaps fixed.

Results land under ``./results/<name>`` unless the option file sets ``path.results_root``.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from mambacsr_arch.cli import runtime

    argv = runtime.normalize_argv(list(sys.argv[1:] if argv is None else argv))
    runtime.load_plugins()
    runtime.patch_basicsr()
    import basicsr.test as basicsr_test

    sys.argv = ['basicsr test'] + argv
    basicsr_test.test_pipeline(root_path=os.getcwd())
    return 0
