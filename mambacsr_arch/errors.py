"""The one error type a user fixes: every command prints it as one ``basicsr <command>: error: ...``
line and exits with status 2 (:mod:`mambacsr_arch.cli.main` catches it once).

Raise :class:`ConfigError` (or a subclass) for anything the user can act on: a bad path, option,
flag, checkpoint or image. Nothing else should reach the user without a traceback.
"""
from __future__ import annotations

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class ConfigError(ValueError):
    """A problem the user must fix (option file, flags, paths, checkpoint); printed as one line, exit 2."""
