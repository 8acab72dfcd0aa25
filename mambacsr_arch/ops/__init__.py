"""Selective scan (Mamba's S6 recurrence) with interchangeable backends; knows nothing about images.

Public API
----------
``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
return_last_state=False, backend=None, delta_weight=None)``
    Same call and semantics as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:
    u, delta (batch, dim, L); A (dim, N); B, C (batch, groups, N, L) or (batch, N, L); D,
    delta_bias (dim,); z (batch, dim, L) gate ``y * silu(z)``. Float32 math with autocast
    disabled, output in u's dtype; ``return_last_state`` also returns the (batch, dim, N) state.
    Our addition ``delta_weight`` (dim, R): delta is low-rank, (batch, groups, R, L), and the scan
    uses ``project_delta(delta, delta_weight)`` (Mamba's dt projection); the ``cpu`` backend
    projects inside its kernel, the others get the projected (batch, dim, L) tensor.
``project_delta(delta, delta_weight) -> (batch, dim, L)``
    That projection, made explicit.
``available_backends() -> dict[str, str | None]``
    Backend name -> None if usable here, else the reason (with the install command).
``use_backend(name)``
    Context manager: the backend of every call without ``backend=`` inside the block (one scoped
    setting; models store none).
``resolve_backend(device, backend=None) -> (name, reason)``
    The backend :func:`selective_scan` would use for tensors on ``device``.

Backends
--------
``mamba_ssm``  the CUDA kernel of the ``mamba_ssm`` package (the ``[cuda]`` extra: ``pip install mamba-ssm``),
               imported lazily, never at package import.
``cpu``        fused, exact numba kernel for CPU tensors, forward and backward; state checkpoints
               every 512 steps keep backward memory O(batch * dim * L). Runs on
               ``torch.get_num_threads()`` threads (``MAMBACSR_SCAN_THREADS`` overrides) with
               bitwise identical results for any thread count. First use compiles it (a few
               seconds), cached on disk by numba afterwards.
``torch``      portable chunked PyTorch (any device), stable, bounded memory via checkpointing
               (a step loop on CPU, a Hillis-Steele scan within chunks elsewhere).
``reference``  the plain sequential loop; for tests only.
``triton``     fused Triton kernels for CUDA tensors, forward and backward (a chunked parallel scan,
               state checkpoints per chunk, recomputed in backward); nothing to compile by hand,
               Triton ships with CUDA builds of PyTorch. ``TRITON_INTERPRET=1`` runs it on CPU
               tensors through Triton's interpreter (slow; how CI tests it).

Selection: ``backend=`` argument > innermost ``use_backend`` block > ``MAMBACSR_SCAN_BACKEND`` environment
variable > automatic
(``mamba_ssm`` for CUDA if it imports with its compiled extension and passes a check scan on
the GPU, else ``triton`` if it passes its check scan, else ``torch``: the check compares the
forward and every gradient with the float64 reference, once per process; ``cpu`` for CPU
tensors if numba imports else ``torch``). The choice is logged once per process on
the ``basicsr`` logger. The backends are rows of ``dispatch.TABLE``: a new backend is one module
plus one row.

torch.compile: the backend is chosen while Dynamo traces (a constant of the compiled graph, so set
``backend=`` / ``MAMBACSR_SCAN_BACKEND`` before compiling; changing them later does not recompile), and
the ``cpu`` backend's kernels are the custom operators ``torch.ops.mambacsr.cpu_scan_fwd`` /
``cpu_scan_bwd`` with fake shapes and an autograd formula, so the scan causes no graph break, in
inference or training (``tests/test_compile.py``).
"""
from .dispatch import (BACKENDS, ENV_VAR, available_backends, check_environment, project_delta, resolve_backend,
                       selective_scan, use_backend)

__all__ = ['selective_scan', 'project_delta', 'available_backends', 'resolve_backend', 'use_backend', 'BACKENDS',
           'ENV_VAR', 'check_environment']
