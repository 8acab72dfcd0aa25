"""SS2D: the multi-direction 2-D selective-scan mixer of MambaCSR (one implementation for all scans).

The mixer projects (B, H, W, C) features to ``d_inner = ssm_ratio * C`` channels, applies a 3x3
depth-wise conv and SiLU, scans the map in K directions (:mod:`mambacsr_arch.dis` token orders),
runs one selective scan per direction (each with its own x_proj / dt_proj / A_log / D slice),
merges every direction back to the map, gates each by a channel attention, sums them, normalises,
gates by ``silu(z)`` and projects back to C channels.

With ``cross_scale=True`` (the fusion module of MambaCSR) it also takes a half-resolution map
``x_down`` (own ``in_proj_down`` and ``conv2d2``) and scans both scales together with
:func:`mambacsr_arch.dis.cross_scale_scan`; only the high-resolution outputs are kept.

Parameter names and shapes follow the official checkpoints (``LW_SS2D`` / ``Cross_SS2D``):
``x_proj_weight`` (K, R + 2N, d_inner), ``dt_projs_weight`` (K, d_inner, R), ``dt_projs_bias``
(K, d_inner), ``A_logs`` (K * d_inner, N), ``Ds`` (K * d_inner), ``multi_scan.attn.*``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import dis, ops

__all__ = ['DirectionGate', 'SS2D']


class DirectionGate(nn.Module):
    """Channel attention gating one merged direction (official ``BiAttn``). (B, L, C) -> (B, L, C).

    ``x * sigmoid(channel_select(gelu(global_reduce(mean_L(norm(x))))))``.
    """

    def __init__(self, in_channels: int, act_ratio: float = 0.125) -> None:
        super().__init__()
        reduce_channels = int(in_channels * act_ratio)
        self.norm = nn.LayerNorm(in_channels)
        self.global_reduce = nn.Linear(in_channels, reduce_channels)
        self.act_fn = nn.GELU()
        self.channel_select = nn.Linear(reduce_channels, in_channels)
        self.gate_fn = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(x).mean(1, keepdim=True)
        return x * self.gate_fn(self.channel_select(self.act_fn(self.global_reduce(pooled))))


class _MultiScan(nn.Module):
    """Holds the direction gate under the official key ``multi_scan.attn``."""

    def __init__(self, dim: int, directions: Sequence[str]) -> None:
        super().__init__()
        self.directions = tuple(directions)
        self.attn = DirectionGate(dim)

    def extra_repr(self) -> str:
        return ', '.join(self.directions)


def _dt_projection(dt_rank: int, d_inner: int, dt_scale: float, dt_init: str, dt_min: float, dt_max: float,
                   dt_init_floor: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mamba's dt projection init: weight (d_inner, R) uniform, bias = softplus^-1 of dt in [dt_min, dt_max]."""
    std = dt_rank**-0.5 * dt_scale
    if dt_init == 'constant':
        weight = torch.full((d_inner, dt_rank), std)
    elif dt_init == 'random':
        weight = torch.empty(d_inner, dt_rank).uniform_(-std, std)
    else:
        raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    bias = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    return weight, bias


class SS2D(nn.Module):
    """Multi-direction selective-scan mixer. (B, H, W, C) [, (B, h, w, C)] -> (B, H, W, C).

    Args:
        d_model: channels C of the input/output.
        directions: scan direction names (``'w8'``, ``'c_w64_flip'``...; see :mod:`mambacsr_arch.dis`);
            for ``cross_scale=True`` the window is the high-resolution one (must be even).
        d_state: SSM state size N. ssm_ratio: d_inner / d_model. dt_rank: R (``'auto'`` = ceil(C / 16)).
        d_conv: depth-wise conv size (< 2: no conv). cross_scale: build the two-scale fusion mixer.
        scan_backend: forwarded to :func:`mambacsr_arch.ops.selective_scan` (``None`` = automatic).
    """

    def __init__(self, d_model: int, directions: Sequence[str], d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank='auto', d_conv: int = 3, conv_bias: bool = True, bias: bool = False, dropout: float = 0.,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = 'random', dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, cross_scale: bool = False, scan_backend: Optional[str] = None) -> None:
        super().__init__()
        if not directions:
            raise ValueError('SS2D needs at least one scan direction, e.g. ["w8", "w8_flip"]')
        self.parsed = [dis.parse_direction(name) for name in directions]
        if cross_scale:
            for name, parsed in zip(directions, self.parsed):
                if parsed.kind != 'window' or parsed.window % 2:
                    raise ValueError(f'cross-scale direction {name!r} must be a window scan with an even window '
                                     f'(e.g. "w16", "c_w16_flip")')
        self.directions = tuple(directions)
        self.cross_scale = cross_scale
        self.scan_backend = scan_backend
        d_inner = int(ssm_ratio * d_model)
        self.d_inner = d_inner
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == 'auto' else int(dt_rank)
        self.d_state = int(d_state)
        self.d_conv = d_conv
        k = len(directions)

        self.out_norm = nn.LayerNorm(d_inner)
        self.in_proj = nn.Linear(d_model, d_inner * 2, bias=bias)
        self.act = nn.SiLU()
        if d_conv > 1:
            self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                    bias=conv_bias)
        if cross_scale:
            self.in_proj_down = nn.Linear(d_model, d_inner * 2, bias=bias)
            self.act_down = nn.SiLU()
            if d_conv > 1:
                self.conv2d2 = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                         bias=conv_bias)

        x_proj = torch.empty(k, self.dt_rank + 2 * self.d_state, d_inner)
        bound = 1 / math.sqrt(d_inner)  # nn.Linear's default init
        self.x_proj_weight = nn.Parameter(x_proj.uniform_(-bound, bound))
        dt = [_dt_projection(self.dt_rank, d_inner, dt_scale, dt_init, dt_min, dt_max, dt_init_floor) for _ in range(k)]
        self.dt_projs_weight = nn.Parameter(torch.stack([w for w, _ in dt]))
        self.dt_projs_bias = nn.Parameter(torch.stack([b for _, b in dt]))
        a_log = torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(a_log)
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.Ds._no_weight_decay = True

        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0. else nn.Identity()
        self.multi_scan = _MultiScan(d_inner, directions)

    # ------------------------------------------------------------------ scan helpers
    def _scan_all(self, x: torch.Tensor, x_down: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """(B, D, H, W) -> one (B, D, L_k) sequence per direction."""
        if self.cross_scale:
            return [dis.cross_scale_scan(x, x_down, d.window, d.column_first, d.flip) for d in self.parsed]
        return [dis.window_scan(x, d.window, d.column_first, d.flip) for d in self.parsed]

    def _merge(self, seq: torch.Tensor, k: int, size: Tuple[int, int]) -> torch.Tensor:
        """(B, D, L_k) sequence of direction k -> (B, H, W, D) map."""
        d = self.parsed[k]
        if self.cross_scale:
            return dis.cross_scale_merge(seq, d.window, size, d.column_first, d.flip, channels_last=True)
        return dis.window_merge(seq, d.window, size, d.column_first, d.flip, channels_last=True)

    def ssm(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scan, selective-scan, merge, gate, sum and normalise. (B, D, H, W) -> (B, H, W, D) float32-normed.

        ``x_down`` (B, D, h, w) is required (and only used) for the cross-scale mixer.
        """
        b, d, h, w = x.shape
        seqs = self._scan_all(x, x_down)
        lengths = [s.shape[-1] for s in seqs]
        length = max(lengths)
        # pad at the end (causal scan: trailing padding never changes earlier outputs) and batch all K
        xs = torch.stack([F.pad(s, (0, length - s.shape[-1])) if s.shape[-1] < length else s for s in seqs], 1)
        k = xs.shape[1]
        x_dbl = torch.einsum('bkdl,kcd->bkcl', xs, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum('bkrl,kdr->bkdl', dts, self.dt_projs_weight)
        ys = ops.selective_scan(
            xs.reshape(b, k * d, length).float(),
            dts.reshape(b, k * d, length).float(),
            -torch.exp(self.A_logs.float()),
            bs.float().contiguous(),
            cs.float().contiguous(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        ).reshape(b, k, d, length)
        out = None
        for i, n in enumerate(lengths):
            y = self._merge(ys[:, i, :, :n], i, (h, w)).reshape(b, h * w, d)
            y = self.multi_scan.attn(y)
            out = y if out is None else out + y
        return self.out_norm(out).reshape(b, h, w, d)

    # ------------------------------------------------------------------ forward
    def _project(self, x: torch.Tensor, proj: nn.Linear, conv: Optional[nn.Module], act: nn.Module,
                 need_z: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, H, W, C) -> x (B, D, H, W) after conv/SiLU, and the gate z (B, H, W, D) if wanted."""
        if conv is None:  # official d_conv < 2 path: SiLU before the split
            xz = act(proj(x))
            x, z = xz.chunk(2, dim=-1)
            return x.permute(0, 3, 1, 2).contiguous(), z
        z = None
        if need_z:
            x, z = proj(x).chunk(2, dim=-1)
            z = act(z)
        else:  # the fusion module never uses the low-resolution gate: compute only the x half
            bias = None if proj.bias is None else proj.bias[:self.d_inner]
            x = F.linear(x, proj.weight[:self.d_inner], bias)
        return act(conv(x.permute(0, 3, 1, 2).contiguous())), z

    def mix(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, H, W, C) [, (B, h, w, C) for cross-scale] -> (B, H, W, C)."""
        if self.cross_scale and x_down is None:
            raise ValueError('the cross-scale SS2D needs x_down, the (B, h, w, C) half-resolution features')
        xs, z = self._project(x, self.in_proj, getattr(self, 'conv2d', None), self.act, True)
        xs_down = None
        if self.cross_scale:
            xs_down, _ = self._project(x_down, self.in_proj_down, getattr(self, 'conv2d2', None), self.act_down,
                                       False)
        y = self.ssm(xs, xs_down).to(z.dtype) * z
        return self.dropout(self.out_proj(y))

    def forward(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.mix(x, x_down)

    def extra_repr(self) -> str:
        return (f'd_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, '
                f'directions={list(self.directions)}, cross_scale={self.cross_scale}')
