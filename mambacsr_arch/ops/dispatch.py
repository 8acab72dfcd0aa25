"""Backend selection and the public :func:`selective_scan` entry point.

Selection rule (first that applies):

1. the ``backend=`` argument;
2. the innermost :func:`use_backend` block (one scoped setting, as timm's ``set_exportable``: a model
   never stores a backend; ``basicsr export`` runs inside ``use_backend(...)``);
3. the environment variable ``MAMBACSR_SCAN_BACKEND``;
4. automatic: the first usable row of :data:`TABLE` by ``auto`` rank that runs on the tensors'
   device: CUDA tensors use ``mamba_ssm`` if it imports with its compiled extension and passes its
   check scan, else ``triton`` if it imports and passes its check scan, else ``torch``; CPU tensors
   use ``cpu`` (the numba kernel) if numba imports, else ``torch``; other devices use ``torch``.

Usable = the row's ``probe`` passes (imports; once per process) and, for the device types in its
``check_devices``, its ``check`` passes: one small scan on that device, long enough to cross the
kernel's chunks, with D, z, delta_bias and softplus, whose output and every gradient are compared
with the float64 reference (:func:`reference.check_scan`). The check runs at the first selection
for that device type (never at import), once per process; a failure is logged once as a warning and
the backend is skipped (``basicsr env`` shows why).

An explicit request (1 or 2) that cannot be honoured (missing package, failed check) raises an error
naming the reason and the fix. The choice is logged once per (device type, backend) per process on
the ``basicsr`` logger (so it lands in BasicSR's train/test log).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F

from . import export_scan, mamba_ssm_backend, reference, torch_scan
from .reference import autocast_off as _autocast_off

ENV_VAR = 'MAMBACSR_SCAN_BACKEND'
logger = logging.getLogger('basicsr')
_LOGGED: Set[Tuple[str, str]] = set()
# backend -> None or reason (probe), and 'backend on device_type' -> None or reason (check); once per process
_AVAILABILITY: Dict[str, Optional[str]] = {}
_SCOPED: list = []  # the use_backend() stack, innermost last

# run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state) -> (out, last_state or None);
# B, C are 4-D; out may be in any float dtype (the dispatcher casts it to u's dtype)
RunFn = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass(frozen=True)
class Backend:
    """One row of the backend table.

    name: the ``backend=`` / ``MAMBACSR_SCAN_BACKEND`` value. devices: the device types it runs on
    (called at selection time; None means any). probe: None if usable in this process, else why not
    (with the fix); called once, then cached. run: the scan itself. auto: its rank in the automatic
    choice (lower first; None: only on request); why: the reason logged when chosen automatically;
    device_hint: added to the error when it is requested for tensors on another device; auto_devices:
    the device types the automatic choice considers it for (None: all it runs on); projects_delta: its
    run takes ``delta_weight=`` and projects a low-rank delta itself (else the dispatcher projects it);
    check: ``check(device)`` -> None if one small scan on ``device`` matches the float64 reference
    (forward and gradients), else why not; run once per process for each device type of
    ``check_devices`` before the backend is used there (None: no check).
    """
    name: str
    devices: Optional[Callable[[], Tuple[str, ...]]]
    probe: Callable[[], Optional[str]]
    run: RunFn
    auto: Optional[int]
    why: str = ''
    device_hint: str = ''
    auto_devices: Optional[Tuple[str, ...]] = None
    projects_delta: bool = False
    check: Optional[Callable[[torch.device], Optional[str]]] = None
    check_devices: Tuple[str, ...] = ('cuda',)

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices()

    def auto_for(self, device_type: str) -> bool:
        """Whether the automatic choice considers this backend for ``device_type`` tensors."""
        return self.auto is not None and self.runs_on(device_type) and \
            (self.auto_devices is None or device_type in self.auto_devices)


def _cpu_module():
    from . import cpu_scan  # deferred: numba is imported only when the cpu backend is considered
    return cpu_scan


def _triton_module():
    from . import triton_scan  # deferred: triton is imported only when the triton backend is considered
    return triton_scan


def _run_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    result = mamba_ssm_backend.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return result if return_last_state else (result, None)


def _unfused_runner(core_of: Callable[[], Callable[..., Any]]) -> RunFn:
    """run function of a backend that only implements the bare recurrence ``core_of()``."""
    def run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        return _unfused(core_of(), u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return run


def _always() -> Optional[str]:
    return None


# The backend table, in the order error messages list the names. A new backend is one module
# plus one row here.
TABLE: Tuple[Backend, ...] = (
    Backend('mamba_ssm', lambda: ('cuda',), lambda: mamba_ssm_backend.unavailable_reason(), _run_mamba_ssm,
            auto=0, why='mamba_ssm passed its check scan', check=lambda device: mamba_ssm_backend.check(device)),
    Backend('cpu', lambda: ('cpu',), lambda: _cpu_module().unavailable_reason(),
            lambda *args, **kwargs: _cpu_module().scan(*args, **kwargs), auto=2, why='the numba kernel imports',
            projects_delta=True),
    Backend('torch', None, _always, _unfused_runner(lambda: torch_scan.scan_core), auto=3,
            why='the portable PyTorch backend'),
    Backend('reference', None, _always, _unfused_runner(lambda: reference.scan_core), auto=None),
    Backend('export', None, _always, _unfused_runner(lambda: export_scan.scan_core), auto=None),
    Backend('triton', lambda: _triton_module().devices(), lambda: _triton_module().unavailable_reason(),
            lambda *args: _triton_module().scan(*args), auto=1,
            why='the Triton kernels passed their check scan',
            device_hint=' (TRITON_INTERPRET=1 runs it on CPU tensors, slowly, for tests)', auto_devices=('cuda',),
            check=lambda device: _triton_module().check(device)),
)
BACKENDS = tuple(row.name for row in TABLE)
_ROWS = {row.name: row for row in TABLE}


_ENV_SOURCE = f'{ENV_VAR} environment variable'


def _row(name: str, source: str = '') -> Backend:
    """The table row of backend ``name``; the one check (and message) of a backend name, wherever it
    comes from (``backend=``, ``use_backend``, ``MAMBACSR_SCAN_BACKEND``). Raises ValueError."""
    row = _ROWS.get(name)
    if row is None:
        fix = f', or unset {ENV_VAR} for the automatic choice' if source == _ENV_SOURCE else ''
        raise ValueError(f"unknown selective-scan backend {name!r}{f' (from {source})' if source else ''}; "
                         f"choose one of {', '.join(BACKENDS)}{fix}")
    return row


def _check_device(device_type: str) -> torch.device:
    """The device a backend's check scan for ``device_type`` tensors runs on (the current device of that
    type; tests point it at the CPU to drive the check with stand-in backends)."""
    return torch.device(device_type)


def _unavailable(name: str, device_type: Optional[str] = None) -> Optional[str]:
    """None if backend ``name`` is usable (for ``device_type`` tensors: then its check scan too, where
    it has one for that device type), else why not. Probe and check run once each, then cached."""
    if name not in _AVAILABILITY:
        _AVAILABILITY[name] = _ROWS[name].probe()
    reason = _AVAILABILITY[name]
    row = _ROWS[name]
    if reason is not None or device_type is None or row.check is None or device_type not in row.check_devices:
        return reason
    key = f'{name} on {device_type}'
    if key not in _AVAILABILITY:
        device = _check_device(device_type)
        if device.type == 'cuda' and not torch.cuda.is_available():
            _AVAILABILITY[key] = 'not checked: no CUDA GPU visible to run its check scan'
        else:
            _AVAILABILITY[key] = row.check(device)
            if _AVAILABILITY[key] is not None:
                logger.warning('selective_scan backend %s skipped for %s tensors: %s', name, device_type,
                               _AVAILABILITY[key])
    return _AVAILABILITY[key]


def available_backends(device_type: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Map each backend name to None if usable in this process, else the reason it is not. With
    ``device_type`` ('cuda'): for that device type, running the check scans not yet run (a GPU backend
    is usable only after its check passed); without: the import probes only."""
    return {name: _unavailable(name, device_type if device_type is None or _ROWS[name].runs_on(device_type)
                               else None) for name in BACKENDS}


def _device_type(device: Union[torch.device, str, None]) -> str:
    if device is None:
        return 'cpu'
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _others_for(device_type: str) -> str:
    return ' or '.join(f"'{row.name}'" for row in TABLE if row.auto_for(device_type))


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Within the block, every :func:`selective_scan` call without ``backend=`` uses ``name`` (``None``:
    the automatic choice, even if ``MAMBACSR_SCAN_BACKEND`` is set). Nested blocks: the innermost wins.

    Raises ValueError at once for an unknown name. Under torch.compile the backend is read while
    Dynamo traces: compile inside the block.
    """
    if name is not None:
        _row(name)
    _SCOPED.append(name)
    try:
        yield
    finally:
        _SCOPED.pop()


def check_environment() -> None:
    """The scan's environment variables, checked by every command before it builds anything: ``MAMBACSR_SCAN_BACKEND``
    must name a backend, ``MAMBACSR_SCAN_THREADS`` must be a positive integer. Raises
    :class:`~mambacsr_arch.errors.ConfigError` (one line, exit status 2) naming the variable and the fix;
    without this check the mistake would surface at the first scan, deep inside a training run."""
    from ..errors import ConfigError
    from . import cpu_scan

    try:
        if os.environ.get(ENV_VAR):
            _row(os.environ[ENV_VAR].strip(), _ENV_SOURCE)
        cpu_scan.scan_threads()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resolve_backend(device: Union[torch.device, str, None],
                    backend: Optional[str] = None) -> Tuple[str, str]:
    """Apply the selection rule for tensors on ``device``; return (backend name, human reason).

    Raises ValueError for an unknown name, RuntimeError for an explicit request that cannot be
    honoured (missing package, or a backend asked for tensors on a device it does not run on).
    """
    dev = _device_type(device)
    source = 'backend= argument'
    if backend is None and _SCOPED:
        backend, source = _SCOPED[-1], 'use_backend()'
        if backend is None:  # an explicit "automatic" block: the environment variable does not apply
            source = ''
    if backend is None and source and os.environ.get(ENV_VAR):
        backend, source = os.environ[ENV_VAR].strip(), _ENV_SOURCE
    if backend is not None:
        row = _row(backend, source)
        if not row.runs_on(dev):
            raise RuntimeError(f"selective-scan backend '{backend}' (from {source}) needs "
                               f"{'/'.join(d.upper() for d in row.devices())} tensors, got {dev}{row.device_hint}; "
                               f'use backend {_others_for(dev)}')
        reason = _unavailable(backend, dev)
        if reason is not None:
            raise RuntimeError(f"selective-scan backend '{backend}' requested by {source} is unavailable: {reason}")
        return backend, f'requested by {source}'
    skipped = []
    for row in sorted((r for r in TABLE if r.auto_for(dev)), key=lambda r: r.auto):
        reason = _unavailable(row.name, dev)
        if reason is None:
            label = dev.upper() if dev in ('cpu', 'cuda') else dev
            return row.name, f'{label} tensors and {row.why}' + (f" ({'; '.join(skipped)})" if skipped else '')
        skipped.append(f'{row.name}: {reason}')
    raise RuntimeError(f'no selective-scan backend runs on {dev} tensors')  # unreachable: torch runs anywhere


def _log_choice(device_type: str, name: str, reason: str) -> None:
    key = (device_type, name)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info('selective_scan backend for %s tensors: %s (%s)', device_type, name, reason)


@torch.compiler.assume_constant_result
def _choose(device_type: str, backend: Optional[str]) -> str:
    """The backend for ``device_type`` tensors (selection rule above), logged once; '' if the request
    cannot be honoured (the caller then raises :func:`resolve_backend`'s error itself).

    Under torch.compile this runs once, while Dynamo traces, and its answer is a constant of the
    compiled graph: the availability probe (imports) and the logging call stay out of the graph, so
    they cause no graph break. Eager calls run it every time, as before (probe and log are cached).
    A compiled graph therefore keeps the backend chosen when it was traced. It does not raise because
    Dynamo would wrap the error in an InternalTorchDynamoError."""
    try:
        name, reason = resolve_backend(device_type, backend)
    except (ValueError, RuntimeError):
        return ''
    _log_choice(device_type, name, reason)
    return name


def _check_shapes(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                  delta_bias: Optional[torch.Tensor], delta_weight: Optional[torch.Tensor]) -> None:
    if delta_weight is not None:
        if u.dim() != 3:
            raise ValueError(f'selective_scan: u must be (batch, dim, L), got {tuple(u.shape)}')
        batch, dim, length = u.shape
        if delta_weight.dim() != 2 or delta_weight.shape[0] != dim:
            raise ValueError(f'selective_scan: delta_weight must be (dim={dim}, R), got {tuple(delta_weight.shape)}')
        wanted = (batch, B.shape[1], delta_weight.shape[1], length)
        if tuple(delta.shape) != wanted:
            raise ValueError(f'selective_scan: with delta_weight, delta must be (batch, groups, R, L) = {wanted} '
                             f'(the groups of B and C), got {tuple(delta.shape)}')
    elif u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f'selective_scan: u and delta must both be (batch, dim, L), got {tuple(u.shape)} '
                         f'and {tuple(delta.shape)}')
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f'selective_scan: A must be (dim={dim}, N), got {tuple(A.shape)}')
    if A.is_complex():
        raise NotImplementedError('selective_scan: complex A is not supported; pass a real A (dim, N)')
    n_state = A.shape[1]
    for name, t in (('B', B), ('C', C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n_state or t.shape[3] != length \
                or dim % t.shape[1] != 0:
            raise ValueError(f'selective_scan: {name} must be (batch={batch}, groups, N={n_state}, L={length}) '
                             f'or (batch, N, L) with dim={dim} divisible by groups, got {tuple(t.shape)} '
                             f'(input-independent (dim, N) {name} is not supported)')
    if B.shape[1] != C.shape[1]:
        raise ValueError(f'selective_scan: B and C must have the same groups, got {B.shape[1]} and {C.shape[1]}')
    for name, t in (('D', D), ('delta_bias', delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f'selective_scan: {name} must be (dim={dim},), got {tuple(t.shape)}')
    if z is not None and z.shape != u.shape:
        raise ValueError(f'selective_scan: z must be (batch, dim, L) like u, got {tuple(z.shape)}')


def _unfused(core, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
             delta_softplus: bool, return_last_state: bool):
    """delta_bias/softplus, D and the silu(z) gate in float32 PyTorch around a recurrence ``core``."""
    uf = u.float()
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    y, last_state = core(uf, dt, A.float(), B.float(), C.float(), return_last_state)
    if D is not None:
        y = torch.addcmul(y, uf, D.float()[:, None])
    if z is not None:
        y = y * F.silu(z.float())
    return y, last_state


def project_delta(delta: torch.Tensor, delta_weight: torch.Tensor) -> torch.Tensor:
    """The low-rank delta of :func:`selective_scan` made explicit: (batch, groups, R, L) and (dim, R) ->
    (batch, dim, L), channel d of group g = d // (dim / groups) being delta_weight[d] @ delta[:, g]."""
    batch, groups, rank, length = delta.shape
    dim = delta_weight.shape[0]
    return torch.matmul(delta_weight.view(groups, dim // groups, rank), delta).reshape(batch, dim, length)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: Optional[str] = None,
                   delta_weight: Optional[torch.Tensor] = None):
    """Selective scan with the semantics of ``mamba_ssm``'s ``selective_scan_fn``.

    u, delta, z: (batch, dim, L); A: (dim, N) real (<= 0 for a stable system); B, C: (batch, groups, N, L)
    or (batch, N, L); D, delta_bias: (dim,). With dt = softplus(delta + delta_bias) (softplus only if
    ``delta_softplus``): h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = <C_t, h_t> + D u_t,
    out = y * silu(z). Math in float32 with autocast disabled; ``out`` has u's dtype. Returns out, or
    (out, last_state (batch, dim, N) float32) if ``return_last_state``. Differentiable in every tensor.

    ``delta_weight`` (dim, R) (not in mamba_ssm): delta is then low-rank, (batch, groups, R, L) (or
    (batch, R, L)) with the groups of B and C, and the scan's delta is :func:`project_delta` of it, as
    Mamba's dt projection (without its bias: that is ``delta_bias``). The ``cpu`` backend projects
    inside its kernel (no (batch, dim, L) delta is stored); the others get the projected tensor.
    """
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    if delta_weight is not None and delta.dim() == 3:
        delta = delta.unsqueeze(1)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, delta_weight)
    name = _choose(u.device.type, backend)
    if not name:  # an impossible request: resolve_backend raises its error again, in this frame
        name = resolve_backend(u.device, backend)[0]
    if u.numel() == 0:  # nothing to scan (no backend needs to handle it)
        out = u.new_zeros(u.shape)
        return (out, out.new_zeros(u.shape[:2] + (A.shape[1],), dtype=torch.float32)) if return_last_state else out
    row = _ROWS[name]
    with _autocast_off(u.device.type):
        if delta_weight is not None and not row.projects_delta:
            delta, delta_weight = project_delta(delta.float(), delta_weight.float()), None
        extra = {} if delta_weight is None else {'delta_weight': delta_weight}
        out, last_state = row.run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, **extra)
        out = out.to(u.dtype)
    return (out, last_state) if return_last_state else out
