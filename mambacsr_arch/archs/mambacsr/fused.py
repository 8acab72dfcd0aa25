"""SS2D's fused pieces: the same computations as :meth:`SS2D.forward_reference
<mambacsr_arch.archs.mambacsr.ss2d.SS2D.forward_reference>`, arranged for speed, each with its backward
written out (kept apart from the mixer, as ``mamba_ssm`` keeps ``MambaInnerFn`` apart from its modules).

Autograd through SS2D's fast paths was about a quarter of a training step outside the scan kernel:
every strided in-place copy into a buffer zero-fills and clones the whole buffer in backward, a flip
costs a copy each way, and channel statistics taken by (1, D) matrix products come back as outer
products. Each function below picks, by ``torch.is_grad_enabled()``, its autograd Function (hand-written
backward) or a plain (often in-place) inference version:

* :func:`scan_directions`  (B, D, H, W) [, x_down] -> (B, K, D, L) sequences of all K directions;
* :func:`pooled_token_norm` (B, K, D, L) -> (B, K, D): mean over the map's tokens of LayerNorm(y)
  without affine (the pooled input of the direction gate);
* :func:`merge_directions` (B, K, D, L), gates (B, K, D) -> (B, H, W, D) or (B, D, H, W): sum over
  directions of merge(y_k) * gate_k;
* :func:`channel_layer_norm` LayerNorm over the channels of a (B, D, L) tensor, not transposed;
* :func:`layout_linear` a bias-free linear layer that changes layout (tokens <-> channels-first).

Every one is checked against ``SS2D.forward_reference`` (outputs and gradients) in
tests/test_ss2d_reference.py, and the two norms also on their own.

Directions that differ only by ``_flip`` (or not at all) form a :class:`DirectionGroups` group: the map
is reordered once per group (the others are reversals or copies of it), merged once per group, and
each gradient likewise.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from ... import dis

__all__ = ['DirectionGroups', 'scan_directions', 'pooled_token_norm', 'merge_directions', 'channel_layer_norm',
           'layout_linear']


class DirectionGroups(NamedTuple):
    """The scan directions of a mixer, grouped by token order.

    directions: the parsed directions (:func:`mambacsr_arch.dis.parse_direction`), K of them.
    cross_scale: two-scale (groups of 5 tokens ``[low, high x 4]``) instead of window scans.
    groups: per token order (kind, window, column_first), the indices of its directions in
    increasing order; the first is the group's root, the one actually reordered.
    """
    directions: Tuple[dis.Direction, ...]
    cross_scale: bool
    groups: Tuple[Tuple[int, ...], ...]

    @classmethod
    def of(cls, directions: Sequence[dis.Direction], cross_scale: bool) -> 'DirectionGroups':
        groups = {}
        for i, p in enumerate(directions):
            groups.setdefault((p.kind, p.window, p.column_first), []).append(i)
        return cls(tuple(directions), cross_scale, tuple(tuple(g) for g in groups.values()))

    def length(self, size: Sequence[int]) -> int:
        """Tokens per direction for a (H, W) map (the same for every direction: windows are clipped)."""
        window = self.directions[0].window
        return dis.cross_scale_length(size, window) if self.cross_scale else dis.scan_length(size, window)


def _cross_flip(seq: torch.Tensor) -> torch.Tensor:
    """A cross-scale ``_flip`` of grouped tokens (B, D, G, 5) -> new (B, D, G, 5): the low tokens reversed
    over the groups, the high ones over groups and inside each group (its own inverse)."""
    out = torch.empty_like(seq)
    out[..., :1] = seq[..., :1].flip(-2)
    out[..., 1:] = seq[..., 1:].flip((-2, -1))
    return out


# ---------------------------------------------------------------------- scan of all directions


def _scan(plan: DirectionGroups, x: torch.Tensor, x_down: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, D, H, W) -> (B, K, D, L) sequences of all directions, built in one buffer.

    Each group's root is copied straight from the permuted view of the map (flipped after, if it is a
    flipped direction); every other member is a copy of the root, reversed where its flip differs.
    """
    b, d = x.shape[:2]
    if plan.cross_scale:
        dis.check_cross_inputs(x, x_down, plan.directions[0].window)
    if dis.graph_mode(*x.shape[2:]):  # a graph exporter's trace: gathers and one stack (no copies into a buffer)
        return torch.stack([dis.cross_scale_scan(x, x_down, p.window, p.column_first, p.flip) if plan.cross_scale
                            else dis.window_scan(x, p.window, p.column_first, p.flip) for p in plan.directions], 1)
    n = plan.length(x.shape[2:])
    xs = x.new_empty((b, len(plan.directions), d, n))
    for group in plan.groups:
        root = plan.directions[group[0]]
        out = xs[:, group[0]]
        if plan.cross_scale:
            # reorder whole channel vectors in (B, H, W, D), then transpose once into the buffer
            tokens = dis.cross_scale_tokens(x.permute(0, 2, 3, 1), x_down.permute(0, 2, 3, 1), root.window,
                                            root.column_first)
            out.copy_(tokens.reshape(b, n, d).transpose(1, 2))
            grouped = out.unflatten(-1, (n // 5, 5))
            if root.flip:
                grouped[..., :1].copy_(grouped[..., :1].flip(-2))
                grouped[..., 1:].copy_(grouped[..., 1:].flip((-2, -1)))
        else:
            dis.scan_tokens(x.permute(0, 2, 3, 1), root.window, root.column_first, out=out.transpose(-1, -2))
            if root.flip:
                out.copy_(out.flip(-1))
        for m in group[1:]:
            target = xs[:, m]
            if plan.directions[m].flip == root.flip:
                target.copy_(out)
            elif plan.cross_scale:
                target, src = target.unflatten(-1, (n // 5, 5)), out.unflatten(-1, (n // 5, 5))
                target[..., :1].copy_(src[..., :1].flip(-2))
                target[..., 1:].copy_(src[..., 1:].flip((-2, -1)))
            else:
                target.copy_(out.flip(-1))
    return xs


def _tokens_last(seq: torch.Tensor) -> torch.Tensor:
    """(B, D, L) -> contiguous (B, L, D), one 2-D transposing copy per batch element: torch copies a 2-D
    transpose in cache blocks (1.6 ms for 360 x 4096 floats with cold caches), a 3-D one element by element
    with strided reads (4.2 ms), and the reorder to the map then moves whole contiguous channel vectors."""
    out = seq.new_empty((seq.shape[0], seq.shape[2], seq.shape[1]))
    for i in range(seq.shape[0]):
        out[i].copy_(seq[i].t())
    return out


def _unscan(plan: DirectionGroups, grad: torch.Tensor, size: Tuple[int, int],
            down_size: Optional[Tuple[int, int]]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backward of :func:`_scan`: (B, K, D, L) -> gradients of x (B, D, H, W) [and x_down], both
    channels-last in memory. Each group is merged once, its members summed first."""
    b, _, d, n = grad.shape
    h, w = size
    grad_x = grad_down = None
    if plan.cross_scale:
        grad_x = grad.new_zeros((b, h, w, d))
        grad_down = grad.new_zeros((b, down_size[0], down_size[1], d))
    for group in plan.groups:
        p = plan.directions[group[0]]
        total, owned = None, False
        for m in sorted(group, key=lambda j: plan.directions[j].flip):  # an unflipped one first: no flip
            g = grad[:, m]
            flip = plan.directions[m].flip
            if plan.cross_scale:
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
        if plan.cross_scale:
            grad_down.add_(dis.merge_tokens(total[..., 0].transpose(1, 2), p.window // 2, down_size,
                                            p.column_first))
            grad_x.add_(dis.cross_scale_merge_tokens(total[..., 1:].permute(0, 2, 3, 1), p.window, size,
                                                     p.column_first))
        elif grad_x is None:
            grad_x = dis.merge_tokens(_tokens_last(total), p.window, size, p.column_first)
        else:
            grad_x.add_(dis.merge_tokens(_tokens_last(total), p.window, size, p.column_first))
    return grad_x.permute(0, 3, 1, 2), None if grad_down is None else grad_down.permute(0, 3, 1, 2)


class _ScanDirections(torch.autograd.Function):
    """:func:`_scan`, a pure reordering of tokens; its backward is the inverse reordering :func:`_unscan`."""

    @staticmethod
    def forward(ctx, plan, x, x_down):
        ctx.plan = plan
        ctx.size, ctx.down_size = tuple(x.shape[2:]), None if x_down is None else tuple(x_down.shape[2:])
        return _scan(plan, x, x_down)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return (None, ) + _unscan(ctx.plan, grad, ctx.size, ctx.down_size)


def scan_directions(plan: DirectionGroups, x: torch.Tensor, x_down: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, D, H, W) [, (B, D, h, w) for cross-scale] -> (B, K, D, L), the sequences of every direction."""
    if torch.is_grad_enabled():
        return _ScanDirections.apply(plan, x, x_down)
    return _scan(plan, x, x_down)


# ---------------------------------------------------------------------- pooled token norm (the gate's input)


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


def pooled_token_norm(ys: torch.Tensor, mask: Optional[torch.Tensor], count: int, eps: float,
                      scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, K, D, L) -> (B, K, D): mean over the map's tokens of ``LayerNorm(y_l)`` without its affine.

    ``mask`` (K, L): 1 for the tokens that land on the map, 0 for the others (None: all do); ``count``:
    the number of map tokens. Differentiable in ``ys``. ``scratch`` (inference only): a dead buffer shaped
    like ``ys`` to hold ``ys ** 2`` (saves a fresh allocation).
    """
    if torch.is_grad_enabled():
        return _PooledTokenNorm.apply(ys, mask, count, eps)
    return _pooled_token_norm(ys, mask, count, eps, scratch)[0]


# ---------------------------------------------------------------------- gated merge of all directions


def _merge(plan: DirectionGroups, ys: torch.Tensor, gates: torch.Tensor, size: Tuple[int, int],
           channels_first: bool = False, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over directions of merge(y_k) * gate_k. (B, K, D, L), (B, K, D) -> (B, H, W, D), or
    (B, D, H, W) with ``channels_first`` (window scans only).

    The members of a group are brought to the root's unflipped order and summed there, root first, so
    one merge serves the group. ``scratch``: a dead buffer shaped like ``ys`` for the gated window sums.
    """
    n = ys.shape[-1]
    out = None
    for group in plan.groups:
        i = group[0]
        p = plan.directions[i]
        base = ys[:, i]
        g = gates[:, i, :, None]
        if plan.cross_scale:
            base = base.unflatten(-1, (n // 5, 5))[..., 1:]
            if p.flip:
                base = base.flip((-2, -1))
            comb = base * g[..., None]
            for m in group[1:]:
                other = ys[:, m].unflatten(-1, (n // 5, 5))[..., 1:]
                other = other.flip((-2, -1)) if plan.directions[m].flip else other
                comb = comb.addcmul_(other, gates[:, m, :, None, None])
            merged = dis.cross_scale_merge_tokens(comb.permute(0, 2, 3, 1), p.window, size, p.column_first)
        else:
            if p.flip:
                base = base.flip(-1)
            comb = base * g if scratch is None else torch.mul(base, g, out=scratch[:, i])
            for m in group[1:]:
                other = ys[:, m]
                other = other.flip(-1) if plan.directions[m].flip else other
                comb = comb.addcmul_(other, gates[:, m, :, None])
            if channels_first:
                merged = dis.window_merge(comb, p.window, size, p.column_first)
            else:
                merged = dis.merge_tokens(comb.transpose(1, 2), p.window, size, p.column_first)
        out = merged if out is None else out + merged
    return out


def _merge_backward(plan: DirectionGroups, grad: torch.Tensor, ys: torch.Tensor, gates: torch.Tensor,
                    size: Tuple[int, int], channels_first: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients (of ys, of gates) of :func:`_merge` for the gradient ``grad`` of its output.

    Per group: the output gradient is scanned once into the group's token order, then each member gets
    it times its gate (reversed for a flipped member); a gate gets the sum over tokens of that gradient
    times the member's sequence.
    """
    grad_ys = ys.new_zeros(ys.shape) if plan.cross_scale else ys.new_empty(ys.shape)
    grad_gates = torch.empty_like(gates)
    b, _, d, n = ys.shape
    for group in plan.groups:
        p = plan.directions[group[0]]
        if plan.cross_scale:
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
            seq_grad = flipped if plan.directions[m].flip else tokens  # in member m's token order
            target = grad_ys[:, m]
            seq = ys[:, m]
            if plan.cross_scale:
                target = target.unflatten(-1, (n // 5, 5))[..., 1:]
                seq = seq.unflatten(-1, (n // 5, 5))[..., 1:]
            gate = gates[:, m].reshape((b, d) + (1, ) * len(dims))
            target.copy_(seq_grad * gate)  # not mul(out=view): torch.compile breaks its graph there
            grad_gates[:, m] = (seq_grad * seq).sum(dims)
    return grad_ys, grad_gates


class _MergeDirections(torch.autograd.Function):
    """:func:`_merge` with its backward by hand (:func:`_merge_backward`)."""

    @staticmethod
    def forward(ctx, plan, ys, gates, size, channels_first):
        ctx.plan, ctx.size, ctx.channels_first = plan, size, channels_first
        ctx.save_for_backward(ys, gates)
        return _merge(plan, ys, gates, size, channels_first)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ys, gates = ctx.saved_tensors
        grad_ys, grad_gates = _merge_backward(ctx.plan, grad, ys, gates, ctx.size, ctx.channels_first)
        return None, grad_ys, grad_gates, None, None


def merge_directions(plan: DirectionGroups, ys: torch.Tensor, gates: torch.Tensor, size: Sequence[int],
                     channels_first: bool = False, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over directions of merge(y_k) * gate_k: (B, K, D, L), (B, K, D) -> (B, H, W, D), or (B, D, H, W)
    with ``channels_first`` (window scans only). ``scratch`` (inference only): a dead buffer shaped like
    ``ys``."""
    if torch.is_grad_enabled():
        return _MergeDirections.apply(plan, ys, gates, tuple(size), channels_first)
    return _merge(plan, ys, gates, tuple(size), channels_first, scratch)


# ---------------------------------------------------------------------- LayerNorm over channels, channels-first


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


def channel_layer_norm(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channels D of a (B, D, L) tensor, without transposing it.

    Without autograd it works in place: ``y`` is overwritten and returned (no fresh (B, D, L) buffers
    besides one for the squares).
    """
    if torch.is_grad_enabled():
        return _ChannelNorm.apply(y, weight, bias, eps)
    avg = y.new_full((1, y.shape[1]), 1.0 / y.shape[1])
    centred = y.sub_(torch.matmul(avg, y))
    rstd = torch.rsqrt(torch.matmul(avg, centred * centred) + eps)
    return centred.mul_(rstd).mul_(weight[:, None]).add_(bias[:, None])


# ---------------------------------------------------------------------- linear layer that changes layout


def _layout_product(x: torch.Tensor, weight: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """The product of :class:`_LayoutLinear` (bmm with a transposed operand: no copy, no broadcast)."""
    b = x.shape[0]
    if channels_first:
        return torch.bmm(weight.expand(b, -1, -1), x.transpose(1, 2))
    return torch.bmm(x.transpose(1, 2), weight.t().expand(b, -1, -1))


class _LayoutLinear(torch.autograd.Function):
    """:func:`layout_linear`, with a backward that keeps each tensor's own layout.

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


def layout_linear(x: torch.Tensor, weight: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """A bias-free linear layer that changes layout.

    ``channels_first=True``: tokens (B, L, C), weight (D, C) -> (B, D, L) = weight @ tokens^T.
    ``channels_first=False``: y (B, D, L), weight (C, D) -> tokens (B, L, C) = y^T @ weight^T.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LayoutLinear.apply(x, weight, channels_first)
    return _layout_product(x, weight, channels_first)
