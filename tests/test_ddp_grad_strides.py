"""DDP on CPU (gloo, world size 1): MambaCSR's gradients have the layout of their parameters.

When a parameter's gradient is laid out differently from the parameter (the depth-wise conv of SS2D
sees channels-last inputs, so its weight gradient comes out channels-last), DDP warns "Grad strides
do not match bucket view strides" and copies that gradient into its bucket on every step.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import mambacsr_arch  # noqa: F401  (registers the archs before basicsr builds them)
from basicsr.archs import build_network
from mambacsr_arch.archs.layers import channels_last_weight_

TINY = dict(type='MambaCSR', upscale=2, in_chans=3, embed_dim=24, d_state=4, depths=[2], depths2=[2], mlp_ratio=2,
            cross_scale_scan=True, dual_interleaved_scan=True, drop_path_rate=0.)


@pytest.fixture
def process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip('a process group is already initialised in this process')
    dist.init_process_group('gloo', init_method=(tmp_path / 'store').as_uri(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mismatched(net: torch.nn.Module):
    return [(name, tuple(p.stride()), tuple(p.grad.stride())) for name, p in net.named_parameters()
            if p.grad is not None and p.grad.stride() != p.stride()]


def test_mambacsr_ddp_step_has_grad_strides_of_its_parameters(process_group):
    torch.manual_seed(0)
    net = build_network(dict(TINY))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(2):  # the second step accumulates into the bucket views of the first
            ddp.zero_grad(set_to_none=False)
            ddp(torch.rand(2, 3, 12, 16)).abs().mean().backward()
    messages = [str(w.message) for w in caught if 'Grad strides' in str(w.message)]
    assert not messages, messages[0]
    assert not _mismatched(net)
    assert all(p.grad is not None for p in net.parameters())


def test_depthwise_weights_are_stored_like_their_gradients():
    """Without DDP: every conv weight's gradient (autograd's layout) has the parameter's strides."""
    torch.manual_seed(0)
    net = build_network(dict(TINY))
    net(torch.rand(1, 3, 8, 8)).mean().backward()
    assert not _mismatched(net)
    # the condition is real: a plain (contiguous) depth-wise weight gets a differently strided gradient
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.rand(1, 4, 4, 6).permute(0, 3, 1, 2)  # channels-last view, as SS2D feeds it
    conv(x).sum().backward()
    assert conv.weight.grad.stride() != conv.weight.stride()
    channels_last_weight_(conv)
    conv.weight.grad = None
    conv(x).sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()


def test_channels_last_weight_keeps_values_and_state_dict_loading():
    conv = torch.nn.Conv2d(5, 5, 3, groups=5)
    before = conv.weight.detach().clone()
    channels_last_weight_(conv)
    assert torch.equal(conv.weight, before)
    strides = conv.weight.stride()
    conv.load_state_dict({'weight': torch.randn(5, 1, 3, 3), 'bias': torch.zeros(5)})
    assert conv.weight.stride() == strides
