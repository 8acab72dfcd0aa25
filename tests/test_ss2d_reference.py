"""Every fast path of SS2D against its plain reference forward (``SS2D.forward_reference``).

Paths: the channels-first window mixer (d_conv 3), the token path without conv (d_conv 1), the
cross-scale mixer; each without autograd (the in-place inference path) and with autograd in training
mode (outputs and the gradients of the input and every parameter). Sizes: multiples of the windows
and sizes with clipped border windows. The fused pieces of :mod:`mambacsr_arch.archs.mambacsr.fused`
with a closed form (the two norms, the layout-changing linear layer) are also checked on their own,
outputs and gradients (``gradcheck``), with and without autograd.
"""
import pytest
import torch
import torch.nn.functional as F

from mambacsr_arch.archs.mambacsr import fused
from mambacsr_arch.archs.mambacsr.ss2d import SS2D

CASES = [
    # (directions, d_conv, cross_scale, size)
    (['w4', 'w4_flip', 'c_w4', 'c_w4_flip'], 3, False, (8, 8)),
    (['w4', 'w4_flip', 'c_w8', 'c_w8_flip'], 3, False, (6, 10)),  # clipped windows, mixed sizes
    (['w64', 'c_w64_flip'], 3, False, (5, 7)),  # map smaller than a window
    (['w4', 'c_w4_flip'], 1, False, (6, 5)),
    (['w4', 'w4_flip', 'c_w4', 'c_w4_flip'], 3, True, (8, 8)),
    (['w4', 'c_w4_flip'], 3, True, (6, 10)),
    # three directions of one token order (a group of three: scanned, merged and unscanned once)
    (['w4', 'w4_flip', 'w4', 'c_w4'], 3, False, (6, 10)),
    (['w4', 'w4_flip', 'w4'], 1, True, (8, 6)),
]


def _module(directions, d_conv, cross_scale):
    torch.manual_seed(0)
    m = SS2D(8, directions, d_state=4, d_conv=d_conv, cross_scale=cross_scale)
    with torch.no_grad():  # non-trivial values everywhere (LayerNorm affine, D, biases)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _inputs(size, cross_scale):
    torch.manual_seed(1)
    h, w = size
    x = torch.randn(2, h, w, 8)
    x_down = torch.randn(2, (h + 1) // 2, (w + 1) // 2, 8) if cross_scale else None
    return x, x_down


@pytest.mark.parametrize('directions, d_conv, cross_scale, size', CASES)
def test_inference_path_matches_the_reference(directions, d_conv, cross_scale, size):
    m = _module(directions, d_conv, cross_scale).eval()
    x, x_down = _inputs(size, cross_scale)
    with torch.no_grad():
        fast = m(x, x_down)
        ref = m.forward_reference(x, x_down)
    assert fast.shape == ref.shape == x.shape
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('directions, d_conv, cross_scale, size', CASES)
def test_training_path_matches_the_reference_outputs_and_gradients(directions, d_conv, cross_scale, size):
    m = _module(directions, d_conv, cross_scale).train()
    x, x_down = _inputs(size, cross_scale)
    weight = torch.randn(x.shape)
    results = []
    for forward in (m.forward, m.forward_reference):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        xd = x_down.clone().requires_grad_(True) if x_down is not None else None
        out = forward(xi, xd)
        (out * weight).sum().backward()
        grads = {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}
        grads['input'] = xi.grad.clone()
        if xd is not None:
            grads['input_down'] = xd.grad.clone()
        results.append((out.detach(), grads))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    assert fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-3, atol=1e-4, msg=name)


def test_training_under_bf16_autocast_keeps_dtypes_and_stays_close():
    """Autocast (AMP) training: the hand-written backwards run the products under the forward's autocast
    and return every gradient in its tensor's dtype, close to the float32 ones."""
    m = _module(['w4', 'w4_flip', 'c_w4', 'c_w4_flip'], 3, False).train()
    x, _ = _inputs((8, 8), False)
    weight = torch.randn(x.shape)
    results = []
    for enabled in (False, True):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=enabled):
            out = m(xi)
        (out.float() * weight).sum().backward()
        grads = {name: p.grad.clone() for name, p in m.named_parameters()}
        grads['input'] = xi.grad.clone()
        results.append(grads)
    full, mixed = results
    for name, g in mixed.items():
        assert g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        assert (g - full[name]).norm() <= 0.05 * full[name].norm() + 1e-6, name


# ----------------------------------------------------------------------------- fused pieces on their own
def _double(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_channel_layer_norm_is_layer_norm_over_the_channels():
    y, weight, bias = _double(2, 6, 5), _double(6, seed=1), _double(6, seed=2)
    expected = F.layer_norm(y.transpose(1, 2), (6, ), weight, bias, 1e-5).transpose(1, 2)
    with torch.no_grad():  # the in-place inference version overwrites its input
        torch.testing.assert_close(fused.channel_layer_norm(y.clone(), weight, bias, 1e-5), expected)
    args = tuple(t.clone().requires_grad_(True) for t in (y, weight, bias))
    torch.testing.assert_close(fused.channel_layer_norm(*args, 1e-5), expected)
    assert torch.autograd.gradcheck(lambda *t: fused.channel_layer_norm(*t, 1e-5), args)


@pytest.mark.parametrize('masked', [False, True])
def test_pooled_token_norm_is_the_mean_of_the_map_tokens_layer_norm(masked):
    ys = _double(2, 3, 6, 10)
    mask = (_double(3, 10, seed=1) > 0).double() if masked else None
    count = int(mask.sum(-1)[0]) if masked else 10
    if masked:
        mask[1:] = mask[0]  # every direction has the same number of map tokens, as in SS2D
    normed = F.layer_norm(ys.transpose(-1, -2), (6, ), eps=1e-5)  # (B, K, L, D)
    if masked:
        normed = normed * mask[:, :, None]
    expected = normed.sum(-2) / count
    with torch.no_grad():
        torch.testing.assert_close(fused.pooled_token_norm(ys, mask, count, 1e-5), expected)
        torch.testing.assert_close(fused.pooled_token_norm(ys, mask, count, 1e-5, torch.empty_like(ys)), expected)
    leaf = ys.clone().requires_grad_(True)
    torch.testing.assert_close(fused.pooled_token_norm(leaf, mask, count, 1e-5), expected)
    assert torch.autograd.gradcheck(lambda t: fused.pooled_token_norm(t, mask, count, 1e-5), (leaf, ))


@pytest.mark.parametrize('channels_first', [True, False])
@pytest.mark.parametrize('needs', [(True, True), (True, False), (False, True)])
def test_layout_linear_is_a_linear_layer_that_changes_layout(channels_first, needs):
    if channels_first:  # tokens (B, L, C), weight (D, C) -> (B, D, L)
        x, weight = _double(2, 7, 4), _double(5, 4, seed=1)
        expected = F.linear(x, weight).transpose(1, 2)
    else:  # y (B, D, L), weight (C, D) -> (B, L, C)
        x, weight = _double(2, 5, 7), _double(4, 5, seed=1)
        expected = F.linear(x.transpose(1, 2), weight)
    with torch.no_grad():
        torch.testing.assert_close(fused.layout_linear(x, weight, channels_first), expected)
    args = (x.clone().requires_grad_(needs[0]), weight.clone().requires_grad_(needs[1]))
    out = fused.layout_linear(*args, channels_first)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert (args[0].grad is not None, args[1].grad is not None) == needs
    assert torch.autograd.gradcheck(lambda *t: fused.layout_linear(*t, channels_first), args)
