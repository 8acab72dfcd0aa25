"""``python -m mambacsr_arch.train -opt X.yml`` == ``basicsr train -opt X.yml`` (torchrun-friendly)."""
import sys

from mambacsr_arch.cli.train import main

if __name__ == '__main__':
    sys.exit(main())
