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

Reading order: :class:`SS2D` ``__init__``, ``forward`` (the fast path), ``forward_reference`` (the same
computation written to be read, one direction at a time), then the fast path's steps. Its fused pieces
(the scan and merge of all directions, the norms, the layout-changing linear layers, each with its
backward written out) live in :mod:`mambacsr_arch.archs.mambacsr.fused`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ... import dis, ops
from ..layers import channels_last_weight_
from . import fused

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

    The selective-scan backend is not a setting of the module: :mod:`mambacsr_arch.ops` chooses it
    (``mambacsr_arch.ops.use_backend(name)`` blocks, the ``MAMBACSR_SCAN_BACKEND`` environment variable,
    else automatically).
    """

    def __init__(self, d_model: int, directions: Sequence[str], d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank='auto', d_conv: int = 3, conv_bias: bool = True, bias: bool = False, dropout: float = 0.,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = 'random', dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, cross_scale: bool = False) -> None:
        super().__init__()
        if not directions:
            raise ValueError('SS2D needs at least one scan direction, e.g. ["w8", "w8_flip"]')
        parsed = [dis.parse_direction(name) for name in directions]
        if cross_scale:
            for name, p in zip(directions, parsed):
                if p.kind != 'window' or p.window % 2:
                    raise ValueError(f'cross-scale direction {name!r} must be a window scan with an even window '
                                     f'(e.g. "w16", "c_w16_flip")')
        self.directions = tuple(directions)
        self.cross_scale = cross_scale
        self.plan = fused.DirectionGroups.of(parsed, cross_scale)  # directions grouped by token order
        d_inner = int(ssm_ratio * d_model)
        self.d_inner = d_inner
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == 'auto' else int(dt_rank)
        self.d_state = int(d_state)
        k = len(directions)

        self.out_norm = nn.LayerNorm(d_inner)
        self.in_proj = nn.Linear(d_model, d_inner * 2, bias=bias)
        self.act = nn.SiLU()
        if d_conv > 1:
            # its inputs are channels-last views: a channels-last weight matches its gradient (DDP buckets)
            self.conv2d = channels_last_weight_(
                nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias))
        if cross_scale:
            self.in_proj_down = nn.Linear(d_model, d_inner * 2, bias=bias)
            self.act_down = nn.SiLU()
            if d_conv > 1:
                self.conv2d2 = channels_last_weight_(
                    nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias))

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

    def forward(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, H, W, C) [, (B, h, w, C) for cross-scale] -> (B, H, W, C); the fast path of
        :meth:`forward_reference` (same outputs and gradients)."""
        return self.mix(x, x_down)

    def extra_repr(self) -> str:
        return (f'd_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, '
                f'directions={list(self.directions)}, cross_scale={self.cross_scale}')

    # ------------------------------------------------------------------ reference
    def forward_reference(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mixer written to be read (the official algorithm, one direction at a time). Slow: tests only.

        (B, H, W, C) [, (B, h, w, C)] -> (B, H, W, C). Every fast path of this class (the channels-first
        window mixer, the in-place inference path, the cross-scale mixer) is tested against it, outputs
        and gradients; its selective scan is the sequential ``reference`` backend.
        """
        b, h, w, _ = x.shape
        d = self.d_inner
        conv = getattr(self, 'conv2d', None)
        if conv is None:  # official d_conv < 2: SiLU on both halves before the split
            xs, z = self.act(self.in_proj(x)).chunk(2, dim=-1)
            xs = xs.permute(0, 3, 1, 2)
        else:
            xs, z = self.in_proj(x).chunk(2, dim=-1)
            z = self.act(z)
            xs = self.act(conv(xs.permute(0, 3, 1, 2)))  # (B, D, H, W)
        xs_down = None
        if self.cross_scale:
            if x_down is None:
                raise ValueError('the cross-scale SS2D needs x_down, the (B, h, w, C) half-resolution features')
            conv_down = getattr(self, 'conv2d2', None)
            if conv_down is None:
                xs_down = self.act_down(self.in_proj_down(x_down)).chunk(2, dim=-1)[0].permute(0, 3, 1, 2)
            else:
                xs_down = self.act_down(conv_down(self.in_proj_down(x_down).chunk(2, dim=-1)[0].permute(0, 3, 1, 2)))
        total = 0
        for k, p in enumerate(self.plan.directions):
            if self.cross_scale:
                seq = dis.cross_scale_scan(xs, xs_down, p.window, p.column_first, p.flip)
            else:
                seq = dis.window_scan(xs, p.window, p.column_first, p.flip)  # (B, D, L)
            x_dbl = torch.einsum('cd,bdl->bcl', self.x_proj_weight[k], seq)
            dt, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
            dt = torch.einsum('dr,brl->bdl', self.dt_projs_weight[k], dt)
            y = ops.selective_scan(seq, dt, -torch.exp(self.A_logs[k * d:(k + 1) * d]), bs, cs,
                                   self.Ds[k * d:(k + 1) * d], delta_bias=self.dt_projs_bias[k],
                                   delta_softplus=True, backend='reference')
            if self.cross_scale:
                merged = dis.cross_scale_merge(y, p.window, (h, w), p.column_first, p.flip, channels_last=True)
            else:
                merged = dis.window_merge(y, p.window, (h, w), p.column_first, p.flip, channels_last=True)
            total = total + self.multi_scan.attn(merged.reshape(b, h * w, d))  # gate each direction, sum
        y = self.out_norm(total).reshape(b, h, w, d) * z
        return self.dropout(self.out_proj(y))

    # ------------------------------------------------------------------ fast path
    def mix(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, H, W, C) [, (B, h, w, C) for cross-scale] -> (B, H, W, C)."""
        if self.cross_scale and x_down is None:
            raise ValueError('the cross-scale SS2D needs x_down, the (B, h, w, C) half-resolution features')
        if not self.cross_scale and getattr(self, 'conv2d', None) is not None:
            return self._mix_channels_first(x)
        xs, z = self._project(x, self.in_proj, getattr(self, 'conv2d', None), self.act, True)
        xs_down = None
        if self.cross_scale:
            xs_down, _ = self._project(x_down, self.in_proj_down, getattr(self, 'conv2d2', None), self.act_down,
                                       False)
        y = self.ssm(xs, xs_down).to(z.dtype) * z
        return self.dropout(self.out_proj(y))

    def _mix_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """The window-scan mixer computed in (B, D, H*W) layout: (B, H, W, C) -> (B, H, W, C).

        Linear layers on (B, H*W, C) tokens are matrix products with a transposed operand, so the
        projections produce and consume channels-first maps without any transposing copy.
        """
        b, h, w, c = x.shape
        d = self.d_inner
        tokens = x.reshape(b, h * w, c)
        weight, bias = self.in_proj.weight, self.in_proj.bias
        # x half: channels-last, where the depth-wise conv is several times faster than on (B, D, H, W)
        xs = F.linear(tokens, weight[:d], None if bias is None else bias[:d]).reshape(b, h, w, d)
        xs = self.act(self.conv2d(xs.permute(0, 3, 1, 2)))
        # z half: channels-first, as a bmm with a transposed operand (matmul would broadcast and copy)
        z = fused.layout_linear(tokens, weight[d:], channels_first=True)  # (B, D, HW)
        if bias is not None:
            z = z + bias[d:, None]
        z = self.act(z)
        ys, gates, scratch = self._scan_and_gate(xs, None)
        y = fused.merge_directions(self.plan, ys, gates, (h, w), channels_first=True, scratch=scratch)
        y = y.reshape(b, d, h * w)
        norm = self.out_norm  # without autograd, in place
        y = fused.channel_layer_norm(y, norm.weight, norm.bias, norm.eps).to(z.dtype)
        y = y * z if torch.is_grad_enabled() else y.mul_(z)
        out = fused.layout_linear(y, self.out_proj.weight, channels_first=False)  # (B, HW, C)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return self.dropout(out.reshape(b, h, w, c))

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
        return act(conv(x.permute(0, 3, 1, 2))), z  # channels-last memory format

    def ssm(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scan, selective-scan, merge, gate, sum and normalise. (B, D, H, W) -> (B, H, W, D) float32-normed.

        ``x_down`` (B, D, h, w) is required (and only used) for the cross-scale mixer.
        """
        ys, gates, _ = self._scan_and_gate(x, x_down)
        return self.out_norm(fused.merge_directions(self.plan, ys, gates, tuple(x.shape[2:])))

    def _scan_and_gate(self, x: torch.Tensor, x_down: Optional[torch.Tensor]):
        """Scan all directions, run the selective scan, compute the direction gates.

        Returns ys (B, K, D, L), gates (B, K, D) and, without autograd, the dead scan-input buffer shaped
        like ys (else None) for reuse."""
        b, d, h, w = x.shape
        xs = fused.scan_directions(self.plan, x, x_down)
        k, length = xs.shape[1], xs.shape[-1]
        r, n = self.dt_rank, self.d_state
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (B, K, R + 2N, L)
        # one split (its backward is one concatenation; three slices would each zero-fill a full gradient)
        dt_in, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)  # bs, cs (B, K, N, L) views: the kernel transposes them
        # the rank-R dt projection is the scan's delta_weight: the cpu kernel projects inside (no (B, K, D, L)
        # dt tensor; a rank-12 product is memory-bound), other backends get it projected by the dispatcher
        ys = ops.selective_scan(
            xs.reshape(b, k * d, length).float(),
            dt_in.float(),
            -torch.exp(self.A_logs.float()),
            bs.float(),
            cs.float(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            delta_weight=self.dt_projs_weight.reshape(k * d, r).float(),
        ).reshape(b, k, d, length)
        # without autograd, xs is dead after the scan: reuse its memory (fresh large buffers page-fault)
        # (not in a graph exporter's trace: writes into a view of a buffer become ScatterElements in ONNX)
        reuse = not (torch.is_grad_enabled() or torch.compiler.is_exporting())
        scratch = xs if reuse and xs.shape == ys.shape and xs.dtype == ys.dtype else None
        gates = self._direction_gates(ys, self._map_token_mask((h, w), x_down, ys.device), h * w, scratch)
        return ys, gates, scratch

    def _direction_gates(self, ys: torch.Tensor, mask: Optional[torch.Tensor], count: int,
                         scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-direction channel gates (B, K, D) of :class:`DirectionGate`, computed on the sequences.

        The gate pools ``LayerNorm(y)`` over the tokens of the map, which does not depend on their
        order: mean_l(norm(y_l)) = weight * sum_l (y_l - mu_l) * rstd_l / count + bias.
        ``scratch``: a dead buffer shaped like ``ys`` to hold ``ys ** 2`` (saves a fresh allocation).
        """
        gate = self.multi_scan.attn
        pooled = fused.pooled_token_norm(ys, mask, count, gate.norm.eps, scratch)
        pooled = pooled * gate.norm.weight + gate.norm.bias
        return gate.gate_fn(gate.channel_select(gate.act_fn(gate.global_reduce(pooled))))

    def _map_token_mask(self, size: Tuple[int, int], x_down: Optional[torch.Tensor],
                        device: torch.device) -> Optional[torch.Tensor]:
        """(K, L) float mask of the tokens that land on the output map; None when all do (window scans).

        A cross-scale sequence also holds the low-resolution tokens (and, for an odd size, the padding of
        the 2 x 2 blocks): the direction gate pools only the high-resolution tokens inside the map.
        """
        if not self.cross_scale:
            return None
        ones = torch.ones((1, 1) + tuple(size), device=device)
        zeros = torch.zeros((1, 1) + tuple(x_down.shape[2:]), device=device)
        return torch.stack([dis.cross_scale_scan(ones, zeros, p.window, p.column_first, p.flip).reshape(-1)
                            for p in self.plan.directions])
