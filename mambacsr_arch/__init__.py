"""mambacsr_arch: MambaCSR and HAT for compressed image super-resolution, as a BasicSR plugin.

Importing this package applies the compatibility shims (:mod:`mambacsr_arch._compat`) and then
registers, in BasicSR's registries (see :mod:`mambacsr_arch.registry`):

* ARCH: ``MambaCSR``, ``HAT``, ``DISBlock``, ``CrossScaleBlock``
* DATASET: ``JPEGDegradedPairedDataset``
* MODEL: ``MambaCSRModel``, ``HATModel``

each also as ``mambacsr_arch.<Name>``. Module tree::

    mambacsr_arch/
      ops/        selective_scan dispatch + backends (mamba_ssm, cpu, torch, reference)
      dis.py      token orders: parse_direction, window_scan/merge, cross_scale_scan/merge
      archs/      ss2d (multi-direction scan mixer), blocks, MambaCSR, HAT
      data/       degradations, JPEGDegradedPairedDataset, prepare-csr
      models/     MambaCSRModel, HATModel (padding, tiling, loading, DDP, atomic saves)
      cli/        `basicsr train|test|infer|eval|prepare-csr|env`

Nothing here imports ``mamba_ssm`` or initialises CUDA at import time.

Threads: unless the environment already sets it, ``OMP_WAIT_POLICY`` is set to ``PASSIVE`` here,
before torch is imported (the ``basicsr`` console script and ``import mambacsr_arch`` as the first
import get it; OpenMP reads it once, when torch loads). With the default (spinning) policy,
torch's idle OpenMP threads busy-wait on the cores our CPU scan's thread pool needs: one other busy
process on a 2-core machine then made a MambaCSR training step about 9x slower (10.7 s vs 1.2 s).
``benchmarks/bench_contention.py`` measures it. Set ``OMP_WAIT_POLICY=ACTIVE`` to opt out. Even on a
quiet machine the spinning threads take turns with the scan's worker thread: with torch imported
first (and no ``OMP_WAIT_POLICY``), a MambaCSR-sized scan call took 1.5x as long, which the scan
reports once (:data:`OMP_THREADS_SPIN`, set in :mod:`mambacsr_arch._threads`, the package's first import).
"""
from ._threads import OMP_THREADS_SPIN  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads; re-exported)
from . import _compat
from .version import __version__

_compat.apply()

from . import archs, data, models  # noqa: E402,F401  (registration side effects)

__all__ = ['__version__', 'archs', 'data', 'models']
