"""``python -m mambacsr_arch.test -opt X.yml`` == ``basicsr test -opt X.yml``."""
import sys

from mambacsr_arch.cli.test import main

if __name__ == '__main__':
    sys.exit(main())
