"""Command-line entry points behind the ``basicsr`` console script."""
