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

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ... import dis, ops
from ..layers import channels_last_weight_

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


# ---------------------------------------------------------------------- hand-written backward passes
# Autograd through SS2D's fast paths was about a quarter of a training step outside the scan kernel:
# every strided in-place copy into a buffer zero-fills and clones the whole buffer in backward, a flip
# costs a copy each way, and the channel statistics taken by (1, D) matrix products come back as
# outer products. The functions below are the same computations with their backward written out
# (each checked against ``SS2D.forward_reference`` in tests/test_ss2d_reference.py).


class _Reorder(torch.autograd.Function):
    """``forward_fn(*tensors)``, a pure reordering of tokens; its backward is ``backward_fn(grad)``, the
    inverse reordering (one tuple entry per tensor, None for those that need no gradient)."""

    @staticmethod
    def forward(ctx, forward_fn, backward_fn, *tensors):
        ctx.backward_fn = backward_fn
        return forward_fn(*tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return (None, None) + tuple(ctx.backward_fn(grad))


def _pooled_token_norm(ys: torch.Tensor, mask: Optional[torch.Tensor], count: int, eps: float,
                       scratch: Optional[torch.Tensor] = None):
    """(B, K, D, L) -> pooled (B, K, D) = sum_l w_l * (y_l - mu_l), w_l = rstd_l * mask_l / count: the mean
    over the map's tokens of the un-affined LayerNorm of each token's D channels. Also returns mu, rstd
    and w (B, K, 1, L). ``scratch``: a dead buffer shaped like ``ys`` to hold ``ys ** 2``."""
    d = ys.shape[2]
    # channel statistics per token by matrix products (a reduction over the middle dim is slow)
    avg = ys.new_full((1, d), 1.0 / d)
    mu = torch.matmul(avg, ys)  # (B, K, 1, L)
    squares = ys * ys if scratch is None else torch.mul(ys, ys, out=scratch)
    var = (torch.matmul(avg, squares) - mu * mu).clamp_(min=0)
    rstd = torch.rsqrt(var + eps)
    w = rstd if mask is None else rstd * mask[:, None, :]
    w = w / count
    pooled = (torch.matmul(w, ys.transpose(-1, -2)) - (mu * w).sum(-1, keepdim=True)).squeeze(-2)
    return pooled, mu, rstd, w


class _PooledTokenNorm(torch.autograd.Function):
    """:func:`_pooled_token_norm` with its backward by hand: LayerNorm's backward for an upstream gradient
    g_d * mask_l / count, i.e. dy_dl = g_d w_l - y_dl b_l + c_l (one matrix-vector product, two passes)."""

    @staticmethod
    def forward(ctx, ys, mask, count, eps):
        with torch.autocast(ys.device.type, enabled=False):  # in the dtype of ys (float32), as the backward
            pooled, mu, rstd, w = _pooled_token_norm(ys, mask, count, eps)
        ctx.save_for_backward(ys, mu, rstd, w)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ys, mu, rstd, w = ctx.saved_tensors
        grad = grad.to(ys.dtype)
        g_mean = grad.mean(-1, keepdim=True)[..., None]  # (B, K, 1, 1)
        g_dot_y = torch.matmul(grad[..., None, :], ys)  # (B, K, 1, L)
        b = w * rstd * rstd * (g_dot_y / ys.shape[2] - mu * g_mean)
        # dy = (mu b - g_mean w) - y b + g (x) w, in two passes
        grad_ys = torch.addcmul(mu * b - g_mean * w, ys, b, value=-1).addcmul_(grad[..., None], w)
        return grad_ys, None, None, None


class _ChannelNorm(torch.autograd.Function):
    """LayerNorm over the channels of a (B, D, L) tensor without transposing it, backward by hand."""

    @staticmethod
    def forward(ctx, y, weight, bias, eps):
        avg = y.new_full((1, y.shape[1]), 1.0 / y.shape[1])
        with torch.autocast(y.device.type, enabled=False):  # in the dtype of y (float32), as the backward
            centred = y - torch.matmul(avg, y)
            rstd = torch.rsqrt(torch.matmul(avg, centred * centred) + eps)
        normed = centred.mul_(rstd)
        ctx.save_for_backward(normed, rstd, weight)
        return torch.addcmul(bias[:, None], normed, weight[:, None])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad = grad.to(normed.dtype)
        avg = grad.new_full((1, grad.shape[1]), 1.0 / grad.shape[1])
        prod = grad * normed
        grad_weight = prod.sum((0, 2))
        grad_bias = grad.sum((0, 2))
        mean_prod = torch.matmul(avg, prod.mul_(weight[:, None]))  # mean_d(weight * grad * normed)
        scaled = grad * weight[:, None]
        grad_y = scaled.sub_(torch.matmul(avg, scaled)).addcmul_(normed, mean_prod, value=-1).mul_(rstd)
        return grad_y, grad_weight, grad_bias, None


class _GatedMerge(torch.autograd.Function):
    """``mixer._merge_gated(ys, gates, ...)`` with its backward by hand (``mixer._merge_gated_backward``)."""

    @staticmethod
    def forward(ctx, mixer, ys, gates, lengths, size, channels_first):
        ctx.mixer, ctx.lengths, ctx.size, ctx.channels_first = mixer, lengths, size, channels_first
        ctx.save_for_backward(ys, gates)
        return mixer._merge_gated(ys, gates, lengths, size, channels_first)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ys, gates = ctx.saved_tensors
        grad_ys, grad_gates = ctx.mixer._merge_gated_backward(grad, ys, gates, ctx.lengths, ctx.size,
                                                              ctx.channels_first)
        return None, grad_ys, grad_gates, None, None, None


class _LayoutLinear(torch.autograd.Function):
    """A bias-free linear layer that changes layout, with a backward that keeps each tensor's own layout.

    ``channels_first=True``: tokens (B, L, C), weight (D, C) -> (B, D, L) = weight @ tokens^T.
    ``channels_first=False``: y (B, D, L), weight (C, D) -> tokens (B, L, C) = y^T @ weight^T.
    Autograd's own formula hands the input a gradient in the *output's* layout (a transposed view), and
    every elementwise backward behind it then mixes a transposed operand with contiguous ones (several
    times slower per element); here each input's gradient is one matrix product in the input's layout.
    """

    @staticmethod
    def forward(ctx, x, weight, channels_first):
        device = x.device.type
        ctx.channels_first = channels_first
        # the backward's products run under the forward's autocast (bf16 GEMMs on a GPU under AMP)
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(x, weight)
        return _layout_product(x, weight, channels_first)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        b = x.shape[0]
        grad_x = grad_w = None
        autocast = (torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1]) if ctx.autocast is not None else
                    contextlib.nullcontext())
        with autocast:
            if ctx.channels_first:  # grad (B, D, L), x (B, L, C)
                if ctx.needs_input_grad[0]:
                    grad_x = torch.bmm(grad.transpose(1, 2), weight.expand(b, -1, -1))
                if ctx.needs_input_grad[1]:
                    grad_w = torch.bmm(grad, x).sum(0)
            else:  # grad (B, L, C), x (B, D, L)
                if ctx.needs_input_grad[0]:
                    grad_x = torch.bmm(weight.t().expand(b, -1, -1), grad.transpose(1, 2))
                if ctx.needs_input_grad[1]:
                    grad_w = torch.bmm(grad.transpose(1, 2), x.transpose(1, 2)).sum(0)
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None)


def _layout_product(x: torch.Tensor, weight: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """The product of :class:`_LayoutLinear` (bmm with a transposed operand: no copy, no broadcast)."""
    b = x.shape[0]
    if channels_first:
        return torch.bmm(weight.expand(b, -1, -1), x.transpose(1, 2))
    return torch.bmm(x.transpose(1, 2), weight.t().expand(b, -1, -1))


def _layout_linear(x: torch.Tensor, weight: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """:class:`_LayoutLinear` with autograd; the same products without it."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LayoutLinear.apply(x, weight, channels_first)
    return _layout_product(x, weight, channels_first)


def _cross_flip(seq: torch.Tensor) -> torch.Tensor:
    """A cross-scale ``_flip`` of grouped tokens (B, D, G, 5) -> new (B, D, G, 5): the low tokens reversed
    over the groups, the high ones over groups and inside each group (its own inverse)."""
    out = torch.empty_like(seq)
    out[..., :1] = seq[..., :1].flip(-2)
    out[..., 1:] = seq[..., 1:].flip((-2, -1))
    return out


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

    # ------------------------------------------------------------------ scan helpers
    def _partner(self, i: int) -> Optional[int]:
        """Index j < i of a direction that differs from direction i only by ``flip`` (None if none)."""
        d = self.parsed[i]
        for j in range(i):
            e = self.parsed[j]
            if (e.window, e.column_first, e.kind) == (d.window, d.column_first, d.kind) and e.flip != d.flip:
                return j
        return None

    def _scan_into(self, x: torch.Tensor, x_down: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, D, H, W) -> (B, K, D, L) sequences of all directions, built in one buffer.

        A direction whose flip partner was already scanned is derived from it by reversing (no second
        reorder); every other one is copied straight from the permuted view of the map. Shorter
        sequences (none with the current orders, which all scan every token of the map) would be
        zero-padded at the end (causal scan: trailing padding never changes earlier outputs).
        """
        b, d = x.shape[:2]
        size = x.shape[2:]
        if self.cross_scale:
            dis.check_cross_inputs(x, x_down, self.parsed[0].window)
            lengths = [dis.cross_scale_length(size, p.window) for p in self.parsed]
        else:
            lengths = [dis.scan_length(size, p.window) for p in self.parsed]
        length = max(lengths)
        k = len(self.parsed)
        xs = (x.new_empty if min(lengths) == length else x.new_zeros)((b, k, d, length))
        for i, p in enumerate(self.parsed):
            n = lengths[i]
            out = xs[:, i, :, :n]
            j = self._partner(i)
            if self.cross_scale:
                grouped = out.unflatten(-1, (n // 5, 5))
                if j is not None:
                    src = xs[:, j, :, :n].unflatten(-1, (n // 5, 5))
                    grouped[..., :1].copy_(src[..., :1].flip(-2))
                    grouped[..., 1:].copy_(src[..., 1:].flip((-2, -1)))
                    continue
                # reorder whole channel vectors in (B, H, W, D), then transpose once into the buffer
                tokens = dis.cross_scale_tokens(x.permute(0, 2, 3, 1), x_down.permute(0, 2, 3, 1), p.window,
                                                p.column_first)
                out.copy_(tokens.reshape(b, n, d).transpose(1, 2))
                if p.flip:
                    grouped[..., :1].copy_(grouped[..., :1].flip(-2))
                    grouped[..., 1:].copy_(grouped[..., 1:].flip((-2, -1)))
            else:
                if j is not None:
                    out.copy_(xs[:, j, :, :n].flip(-1))
                    continue
                dis.scan_tokens(x.permute(0, 2, 3, 1), p.window, p.column_first, out=out.transpose(-1, -2))
                if p.flip:
                    out.copy_(out.flip(-1))
        return xs, lengths

    def _scan_directions(self, x: torch.Tensor, x_down: Optional[torch.Tensor]):
        """:meth:`_scan_into`; with autograd, as one reordering whose backward is :meth:`_unscan`."""
        if not torch.is_grad_enabled():
            return self._scan_into(x, x_down)
        lengths = []

        def scan(*inputs):
            xs, found = self._scan_into(*inputs)
            lengths.extend(found)
            return xs

        size, down = tuple(x.shape[2:]), None if x_down is None else tuple(x_down.shape[2:])
        xs = _Reorder.apply(scan, lambda grad: self._unscan(grad, size, down), x, x_down)
        return xs, lengths

    def _unscan(self, grad: torch.Tensor, size: Tuple[int, int], down_size: Optional[Tuple[int, int]]):
        """Backward of :meth:`_scan_into`: (B, K, D, L) -> gradients of x (B, D, H, W) [and x_down], both
        channels-last in memory. Each direction is merged once, summed with its flip partners first."""
        b, _, d, _ = grad.shape
        h, w = size
        grad_x = grad_down = None
        if self.cross_scale:
            grad_x = grad.new_zeros((b, h, w, d))
            grad_down = grad.new_zeros((b, down_size[0], down_size[1], d))
            n = dis.cross_scale_length(size, self.parsed[0].window)
        else:
            n = dis.scan_length(size, self.parsed[0].window)
        for i, p in enumerate(self.parsed):
            if self._partner(i) is not None:
                continue  # summed into the direction it was derived from
            members = [i] + [j for j in range(i + 1, len(self.parsed)) if self._partner(j) == i]
            total, owned = None, False
            for m in sorted(members, key=lambda j: self.parsed[j].flip):  # an unflipped one first: no flip
                g = grad[:, m, :, :n]
                flip = self.parsed[m].flip
                if self.cross_scale:
                    g = g.unflatten(-1, (n // 5, 5))
                    g = _cross_flip(g) if flip else g
                elif flip:
                    g = g.flip(-1)
                if total is None:
                    total, owned = g, flip
                elif owned:
                    total.add_(g)
                else:
                    total, owned = total + g, True
            if self.cross_scale:
                grad_down.add_(dis.merge_tokens(total[..., 0].transpose(1, 2), p.window // 2, down_size,
                                                p.column_first))
                grad_x.add_(dis.cross_scale_merge_tokens(total[..., 1:].permute(0, 2, 3, 1), p.window, size,
                                                         p.column_first))
            elif grad_x is None:
                grad_x = dis.merge_tokens(total.transpose(1, 2), p.window, size, p.column_first)
            else:
                grad_x.add_(dis.merge_tokens(total.transpose(1, 2), p.window, size, p.column_first))
        return grad_x.permute(0, 3, 1, 2), None if grad_down is None else grad_down.permute(0, 3, 1, 2)

    def _valid_mask(self, size: Tuple[int, int], down_size: Optional[Tuple[int, int]], length: int,
                    lengths: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
        """(K, L) float mask of the tokens that land on the output map (None when all of them do)."""
        if not self.cross_scale and all(n == length and n == size[0] * size[1] for n in lengths):
            return None
        ones = torch.ones((1, 1) + tuple(size), device=device)
        rows = []
        for p, n in zip(self.parsed, lengths):
            if self.cross_scale:
                zeros = torch.zeros((1, 1) + tuple(down_size), device=device)
                seq = dis.cross_scale_scan(ones, zeros, p.window, p.column_first, p.flip)
            else:
                seq = dis.window_scan(ones, p.window, p.column_first, p.flip)
            rows.append(F.pad(seq.reshape(-1), (0, length - n)))
        return torch.stack(rows)

    def _direction_gates(self, ys: torch.Tensor, mask: Optional[torch.Tensor], count: int,
                         scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-direction channel gates (B, K, D) of :class:`DirectionGate`, computed on the sequences.

        The gate pools ``LayerNorm(y)`` over the tokens of the map, which does not depend on their
        order: mean_l(norm(y_l)) = weight * sum_l (y_l - mu_l) * rstd_l / count + bias.
        ``scratch``: a dead buffer shaped like ``ys`` to hold ``ys ** 2`` (saves a fresh allocation).
        """
        gate = self.multi_scan.attn
        if torch.is_grad_enabled():
            pooled = _PooledTokenNorm.apply(ys, mask, count, gate.norm.eps)
        else:
            pooled = _pooled_token_norm(ys, mask, count, gate.norm.eps, scratch)[0]
        pooled = pooled * gate.norm.weight + gate.norm.bias
        return gate.gate_fn(gate.channel_select(gate.act_fn(gate.global_reduce(pooled))))

    def _merge_gated(self, ys: torch.Tensor, gates: torch.Tensor, lengths: Sequence[int],
                     size: Tuple[int, int], channels_first: bool = False,
                     scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sum over directions of merge(y_k) * gate_k. (B, K, D, L), (B, K, D) -> (B, H, W, D), or
        (B, D, H, W) with ``channels_first`` (window scans only).

        Flip partners are summed in the order of their partner first, so one merge serves both.
        ``scratch``: a dead buffer shaped like ``ys`` to hold the gated window sums.
        """
        out = None
        done = set()
        for i, p in enumerate(self.parsed):
            if i in done:
                continue
            n = lengths[i]
            partner = next((j for j in range(i + 1, len(self.parsed)) if self._partner(j) == i), None)
            base = ys[:, i, :, :n]
            g = gates[:, i, :, None]
            if self.cross_scale:
                base = base.unflatten(-1, (n // 5, 5))[..., 1:]
                if p.flip:
                    base = base.flip((-2, -1))
                comb = base * g[..., None]
                if partner is not None:
                    other = ys[:, partner, :, :n].unflatten(-1, (n // 5, 5))[..., 1:]
                    other = other if p.flip else other.flip((-2, -1))
                    comb = comb.addcmul_(other, gates[:, partner, :, None, None])
                merged = dis.cross_scale_merge_tokens(comb.permute(0, 2, 3, 1), p.window, size, p.column_first)
            else:
                if p.flip:
                    base = base.flip(-1)
                comb = base * g if scratch is None else torch.mul(base, g, out=scratch[:, i, :, :n])
                if partner is not None:
                    other = ys[:, partner, :, :n]
                    other = other if p.flip else other.flip(-1)
                    comb = comb.addcmul_(other, gates[:, partner, :, None])
                if channels_first:
                    merged = dis.window_merge(comb, p.window, size, p.column_first)
                else:
                    merged = dis.merge_tokens(comb.transpose(1, 2), p.window, size, p.column_first)
            done.update((i, partner))
            out = merged if out is None else out + merged
        return out

    def _merge(self, ys: torch.Tensor, gates: torch.Tensor, lengths: Sequence[int], size: Tuple[int, int],
               channels_first: bool = False, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`_merge_gated`; with autograd, with its hand-written backward (:meth:`_merge_gated_backward`)."""
        if torch.is_grad_enabled():
            return _GatedMerge.apply(self, ys, gates, tuple(lengths), tuple(size), channels_first)
        return self._merge_gated(ys, gates, lengths, size, channels_first, scratch)

    def _merge_gated_backward(self, grad: torch.Tensor, ys: torch.Tensor, gates: torch.Tensor,
                              lengths: Sequence[int], size: Tuple[int, int], channels_first: bool):
        """Gradients (of ys, of gates) of :meth:`_merge_gated` for the gradient ``grad`` of its output.

        Per merged group (a direction and its flip partners): the output gradient is scanned once into
        the group's token order, then each member gets it times its gate (reversed for a flipped member);
        a gate gets the sum over tokens of that gradient times the member's sequence.
        """
        grad_ys = ys.new_zeros(ys.shape) if self.cross_scale else ys.new_empty(ys.shape)
        grad_gates = torch.empty_like(gates)
        b, _, d, _ = ys.shape
        done = set()
        for i, p in enumerate(self.parsed):
            if i in done:
                continue
            n = lengths[i]
            group = [i] + [j for j in range(i + 1, len(self.parsed)) if self._partner(j) == i]
            if self.cross_scale:
                h2, w2 = -(-size[0] // 2), -(-size[1] // 2)
                zeros = grad.new_zeros(()).expand(b, h2, w2, d)  # the low-resolution tokens get no gradient
                tokens = dis.cross_scale_tokens(grad, zeros, p.window, p.column_first)[:, :, 1:]
                tokens = tokens.permute(0, 3, 1, 2)  # (B, D, G, 4)
                dims, reverse = (-2, -1), (lambda t: t.flip((-2, -1)))
            else:
                tokens = ys.new_empty((b, d, n))
                grid = grad if not channels_first else grad.permute(0, 2, 3, 1)
                dis.scan_tokens(grid, p.window, p.column_first, out=tokens.transpose(1, 2))
                dims, reverse = (-1, ), (lambda t: t.flip(-1))
            flipped = reverse(tokens)
            for m in group:
                seq_grad = flipped if self.parsed[m].flip else tokens  # in member m's token order
                target = grad_ys[:, m, :, :n]
                seq = ys[:, m, :, :n]
                if self.cross_scale:
                    target = target.unflatten(-1, (n // 5, 5))[..., 1:]
                    seq = seq.unflatten(-1, (n // 5, 5))[..., 1:]
                gate = gates[:, m].reshape((b, d) + (1, ) * len(dims))
                target.copy_(seq_grad * gate)  # not mul(out=view): torch.compile breaks its graph there
                grad_gates[:, m] = (seq_grad * seq).sum(dims)
            done.update(group)
        return grad_ys, grad_gates

    def _scan_and_gate(self, x: torch.Tensor, x_down: Optional[torch.Tensor]):
        """Scan all directions, run the selective scan, compute the direction gates.

        Returns ys (B, K, D, L), gates (B, K, D), the per-direction lengths and, without autograd, the
        dead scan-input buffer shaped like ys (else None) for reuse."""
        b, d, h, w = x.shape
        xs, lengths = self._scan_directions(x, x_down)
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
            backend=self.scan_backend,
            delta_weight=self.dt_projs_weight.reshape(k * d, r).float(),
        ).reshape(b, k, d, length)
        down = tuple(x_down.shape[2:]) if x_down is not None else None
        mask = self._valid_mask((h, w), down, length, lengths, ys.device)
        # without autograd, xs is dead after the scan: reuse its memory (fresh large buffers page-fault)
        scratch = xs if not torch.is_grad_enabled() and xs.shape == ys.shape and xs.dtype == ys.dtype else None
        gates = self._direction_gates(ys, mask, h * w, scratch)
        return ys, gates, lengths, scratch

    def ssm(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scan, selective-scan, merge, gate, sum and normalise. (B, D, H, W) -> (B, H, W, D) float32-normed.

        ``x_down`` (B, D, h, w) is required (and only used) for the cross-scale mixer.
        """
        ys, gates, lengths, _ = self._scan_and_gate(x, x_down)
        return self.out_norm(self._merge(ys, gates, lengths, tuple(x.shape[2:])))

    def _layer_norm_channels_first(self, y: torch.Tensor) -> torch.Tensor:
        """``out_norm`` over the channels of a (B, D, L) tensor, without transposing it."""
        norm = self.out_norm
        if torch.is_grad_enabled():
            return _ChannelNorm.apply(y, norm.weight, norm.bias, norm.eps)
        avg = y.new_full((1, y.shape[1]), 1.0 / y.shape[1])
        # inference: in place, no fresh (B, D, L) buffers besides one for the squares
        centred = y.sub_(torch.matmul(avg, y))
        rstd = torch.rsqrt(torch.matmul(avg, centred * centred) + norm.eps)
        return centred.mul_(rstd).mul_(norm.weight[:, None]).add_(norm.bias[:, None])

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
        z = _layout_linear(tokens, weight[d:], channels_first=True)  # (B, D, HW)
        if bias is not None:
            z = z + bias[d:, None]
        z = self.act(z)
        ys, gates, lengths, scratch = self._scan_and_gate(xs, None)
        y = self._merge(ys, gates, lengths, (h, w), channels_first=True, scratch=scratch)
        y = y.reshape(b, d, h * w)
        y = self._layer_norm_channels_first(y).to(z.dtype)
        y = y * z if torch.is_grad_enabled() else y.mul_(z)
        out = _layout_linear(y, self.out_proj.weight, channels_first=False)  # (B, HW, C)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return self.dropout(out.reshape(b, h, w, c))

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
        for k, p in enumerate(self.parsed):
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
        return act(conv(x.permute(0, 3, 1, 2))), z  # channels-last memory format

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

    def forward(self, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.mix(x, x_down)

    def extra_repr(self) -> str:
        return (f'd_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, '
                f'directions={list(self.directions)}, cross_scale={self.cross_scale}')
