"""HAT (Chen et al., CVPR 2023): ``arch.py`` (registered ``HAT``), ``blocks.py``, ``checkpoint.py``."""
from . import arch  # noqa: F401  (registers HAT)
