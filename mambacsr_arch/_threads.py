"""OpenMP thread policy, set before torch loads (the package's first import; imports nothing of ours).

Unless the environment already sets it, ``OMP_WAIT_POLICY`` is set to ``PASSIVE`` here, before torch is
imported (the ``basicsr`` console script and ``import mambacsr_arch`` as the first import get it;
OpenMP reads it once, when torch loads). With the default (spinning) policy, torch's idle OpenMP
threads busy-wait on the cores the cpu scan's thread pool needs: one other busy process on a 2-core
machine then made a MambaCSR training step about 9x slower (10.7 s vs 1.2 s);
``benchmarks/bench_contention.py`` measures it. Set ``OMP_WAIT_POLICY=ACTIVE`` to opt out.

A low-level module so that :mod:`mambacsr_arch.ops` reads :data:`OMP_THREADS_SPIN` without importing
the package root (imports run downward only; tests/test_layers.py).
"""
import os
import sys

if 'torch' not in sys.modules:
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

#: True when torch was imported first and the environment sets no ``OMP_WAIT_POLICY``: libgomp's default
#: then applies, whose idle threads spin after every parallel region, on the cores the cpu scan's
#: thread pool needs (measured: a MambaCSR-sized scan call 1.5x slower on 2 quiet cores). The cpu scan
#: says so once, when it first runs on several threads.
OMP_THREADS_SPIN = 'OMP_WAIT_POLICY' not in os.environ
