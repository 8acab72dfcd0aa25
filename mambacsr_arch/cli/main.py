"""The ``basicsr`` console script: ``basicsr train|test|infer|eval|prepare-csr|env``.

``train`` and ``test`` hand their arguments verbatim to BasicSR's own pipelines (same flags:
``-opt``, ``--launcher``, ``--auto_resume``, ``--debug``, ``--force_yml``, ``--local_rank``).
Every other subcommand lives in its own module exposing::

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int

Modules are imported only when their subcommand runs, so ``basicsr env`` stays light.

Exit status 2 means a configuration error, printed as one ``basicsr <command>: error: ...`` line: a
:class:`~mambacsr_arch.errors.ConfigError` (every command's user-error type is one: ``OptionError``,
``InferConfigError``, ``ExportConfigError``, ``EvalError``, ``CheckpointError``...), caught here
once for the commands below. ``train`` / ``test`` print theirs in their own modules (BasicSR's
pipelines run there, and ``python -m mambacsr_arch.train`` behaves the same).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional

from mambacsr_arch.errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError

# subcommand -> (module under mambacsr_arch.cli, one-line help)
SUBCOMMANDS: Dict[str, tuple] = {
    'train': ('train', 'train with BasicSR\'s train pipeline (flags as basicsr/train.py)'),
    'test': ('test', 'test with BasicSR\'s test pipeline (flags as basicsr/test.py)'),
    'infer': ('infer', 'restore a folder of compressed LR images (no ground truth needed)'),
    'eval': ('evaluate', 'PSNR/SSIM of restored images against ground truth'),
    'prepare-csr': ('prepare_csr', 'write GT / JPEG-degraded LQ folders, sub-images and LMDBs'),
    'export': ('export', 'a checkpoint as a verified ONNX model (onnxruntime vs PyTorch) or .safetensors weights'),
    'env': ('env', 'versions, devices, the active selective-scan backend, missing extras'),
}
PASSTHROUGH = {'train', 'test'}
SCANS = {'infer', 'export'}  # commands besides train/test that run a network (eval, prepare-csr, env do not)


def _usage() -> str:
    lines = ['usage: basicsr <command> [options]', '', 'commands:']
    lines += [f'  {name:<12} {help_}' for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ['', "Run 'basicsr <command> -h' for the options of one command."]
    return '\n'.join(lines)


def _quiet_opencv() -> None:
    """Silence OpenCV's own log lines (``[ WARN:0@1.1] ... PNG input buffer is incomplete``, ``[ERROR:0@...]
    imdecode_``) in the CLI's process: every unreadable image is reported once, by us, naming the file. The
    library itself leaves OpenCV's settings alone."""
    try:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):  # no OpenCV, or a build without the logging module: nothing to quiet
        pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"basicsr: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    _quiet_opencv()
    try:
        if command in SCANS:  # train/test check in run_pipeline; env reports a bad setting
            from mambacsr_arch.ops import check_environment

            check_environment()  # MAMBACSR_SCAN_BACKEND / _THREADS: one line now, not a traceback mid-run
        module = importlib.import_module(f'mambacsr_arch.cli.{SUBCOMMANDS[command][0]}')
        if command in PASSTHROUGH:
            return int(module.main(rest) or 0)
        parser = argparse.ArgumentParser(prog=f'basicsr {command}', description=SUBCOMMANDS[command][1])
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except ConfigError as err:  # the one place a user error of infer/eval/export/... becomes one line
        print(f'basicsr {command}: error: {err}', file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (start-up, model build): no traceback
        print(f'basicsr {command}: interrupted.', file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == '__main__':
    sys.exit(main())
