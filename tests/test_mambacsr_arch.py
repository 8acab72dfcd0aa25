"""MambaCSR, DISBlock and CrossScaleBlock: golden outputs, scan schedule, any size, checkpointing, AMP, loading."""
import os.path as osp

import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from basicsr.utils.registry import ARCH_REGISTRY
from mambacsr_arch import ops
from mambacsr_arch.archs.mambacsr.blocks import CrossScaleBlock, DISBlock, dis_directions
from mambacsr_arch.archs.mambacsr.arch import MambaCSR
from mambacsr_arch.archs.mambacsr.checkpoint import infer_mambacsr_config

GOLDEN = osp.join(osp.dirname(__file__), 'data', 'golden')
TINY = dict(embed_dim=24, depths=[1], depths2=[1], d_state=4, upscale=2, img_range=1., upsampler='pixelshuffle',
            resi_connection='1conv', drop_path_rate=0.)


def load_golden(name):
    return torch.load(osp.join(GOLDEN, f'{name}.pt'), weights_only=True)


def tiny(**overrides):
    torch.manual_seed(0)
    return MambaCSR(**{**TINY, **overrides})


def block_directions(group):
    return [list(b.directions) for b in group.residual_group.blocks]


# ----------------------------------------------------------------------------------------- golden
@pytest.mark.slow
@pytest.mark.parametrize('name', ['mambacsr_dis', 'mambacsr_dis_crossscale'])
def test_golden_outputs(name):
    golden = load_golden(name)
    assert golden['type'] == 'MambaCSR'
    net = ARCH_REGISTRY.get(golden['type'])(**golden['network_g']).eval()
    net.load_state_dict(golden['state_dict'], strict=True)
    with torch.no_grad():
        out = net(golden['input'])
    assert out.shape == golden['output'].shape
    assert (out - golden['output']).abs().max().item() <= 1e-4


@pytest.mark.parametrize('name', ['mambacsr_dis', 'mambacsr_dis_crossscale'])
def test_golden_config_is_inferred_from_state_dict(name):
    golden = load_golden(name)
    cfg = infer_mambacsr_config(golden['state_dict'])
    net_g = golden['network_g']
    for key in ('embed_dim', 'd_state', 'depths', 'upscale', 'cross_scale_scan', 'in_chans', 'resi_connection'):
        assert cfg[key] == net_g[key], key
    assert cfg['mlp_ratio'] == net_g['mlp_ratio']
    if net_g['cross_scale_scan']:
        assert cfg['depths2'] == net_g['depths2']


def test_released_parameter_counts():
    released = dict(embed_dim=180, depths=[6] * 6, depths2=[6], d_state=16, mlp_ratio=2, upscale=4, scan_size=8,
                    dual_interleaved_scan=True)
    counts = {}
    for cross_scale in (True, False):
        with torch.device('meta'):  # shapes only: no memory, no init cost
            net = MambaCSR(cross_scale_scan=cross_scale, **released)
        counts[cross_scale] = sum(p.numel() for p in net.parameters())
    assert round(counts[True] / 1e6, 2) == 22.05
    assert round(counts[False] / 1e6, 2) == 18.37


def test_registered():
    for name in ('MambaCSR', 'DISBlock', 'CrossScaleBlock'):
        assert ARCH_REGISTRY.get(name).__module__.startswith('mambacsr_arch')
        assert ARCH_REGISTRY.get(f'mambacsr_arch.{name}') is ARCH_REGISTRY.get(name)


# ----------------------------------------------------------------------------------------- schedule
def test_dis_schedule_rule():
    dis_on = [['w8', 'w8_flip'], ['c_w8', 'c_w8_flip'], ['w64', 'w64_flip'], ['c_w64', 'c_w64_flip']]
    assert [dis_directions(i, 6, 8, True, False) for i in range(6)] == dis_on + dis_on[:2]
    assert dis_directions(0, 6, 4, True, False) == ['w4', 'w4_flip']
    assert dis_directions(3, 6, 8, False, False) == ['w8', 'w8_flip', 'c_w8', 'c_w8_flip']
    assert dis_directions(3, 6, 16, False, False) == ['w16', 'w16_flip', 'c_w16', 'c_w16_flip']
    # cross-scale: DIS schedule regardless of dual_interleaved_scan; 32-windows when depth < 6
    assert [dis_directions(i, 6, 8, False, True) for i in range(4)] == dis_on
    shallow = [['w32', 'w32_flip'], ['c_w32', 'c_w32_flip']] * 2
    assert [dis_directions(i, 5, 8, True, True) for i in range(4)] == shallow
    assert dis_directions(0, 5, 8, True, False) == ['w8', 'w8_flip']  # the depth rule is cross-scale only


def test_model_schedule():
    net = MambaCSR(embed_dim=24, depths=[6, 2], depths2=[6], d_state=4, upscale=2, scan_size=4,
                   cross_scale_scan=True)
    assert block_directions(net.layers[0]) == [[f'{p}{w}', f'{p}{w}_flip'] for p, w in
                                               [('w', 4), ('c_w', 4), ('w', 64), ('c_w', 64), ('w', 4), ('c_w', 4)]]
    assert block_directions(net.layers[1]) == [['w32', 'w32_flip'], ['c_w32', 'c_w32_flip']]
    # the half-resolution group never receives scan_size: 8-windows
    assert block_directions(net.layers2[0])[:2] == [['w8', 'w8_flip'], ['c_w8', 'c_w8_flip']]
    assert list(net.layers3[0].directions) == ['w16', 'w16_flip', 'c_w16', 'c_w16_flip']
    shallow = MambaCSR(embed_dim=24, depths=[1], depths2=[3], d_state=4, upscale=2, cross_scale_scan=True)
    assert block_directions(shallow.layers2[0]) == [['w32', 'w32_flip'], ['c_w32', 'c_w32_flip'], ['w32', 'w32_flip']]
    off = MambaCSR(embed_dim=24, depths=[2], d_state=4, upscale=2, dual_interleaved_scan=False)
    assert block_directions(off.layers[0]) == [['w8', 'w8_flip', 'c_w8', 'c_w8_flip']] * 2
    assert off.layers[0].residual_group.blocks[0].self_attention.x_proj_weight.shape[0] == 4


def test_fusion_keeps_official_d_state_and_mlp():
    net = MambaCSR(embed_dim=24, depths=[1], depths2=2, d_state=4, mlp_ratio=1.5, upscale=2, cross_scale_scan=True)
    fusion = net.layers3[0]
    assert len(net.layers3) == 1 and len(net.layers2) == 1  # depths2 given as an int
    assert fusion.A_logs.shape == (4 * 48, 16)
    assert fusion.mlp.fc1.weight.shape == (96, 24)
    assert net.layers[0].residual_group.blocks[0].mlp.fc1.weight.shape == (36, 24)
    assert net.layers[0].residual_group.blocks[0].self_attention.A_logs.shape == (2 * 48, 4)


# ----------------------------------------------------------------------------------------- any size
@pytest.mark.parametrize('cross_scale', [False, True])
def test_any_size_forward_backward(cross_scale):
    net = tiny(cross_scale_scan=cross_scale)
    for size in [(1, 1), (5, 7), (9, 4), (17, 18)]:
        net.zero_grad()
        x = torch.rand(2, 3, *size, requires_grad=True)
        out = net(x)
        assert out.shape == (2, 3, 2 * size[0], 2 * size[1])
        out.square().mean().backward()
        assert torch.isfinite(x.grad).all()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # batch elements do not interact
    net.eval()
    x = torch.rand(2, 3, 9, 6)
    with torch.no_grad():
        both, first, second = net(x), net(x[:1]), net(x[1:])
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)


def _transposed_copy(block, directions):
    """Same block with column-first directions and transposed conv kernels: f(x) == g(x^T)^T."""
    twin = CrossScaleBlock(block.dim, directions, d_state=block.d_state)
    state = {k: (v.transpose(-2, -1) if k in ('conv2d.weight', 'conv2d2.weight') else v)
             for k, v in block.state_dict().items()}
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize('size', [(12, 20), (9, 14)])
def test_cross_scale_block_non_square_is_transpose_consistent(size):
    """Row-first scans of x equal column-first scans of x^T: fails if a reverse scrambles non-square maps."""
    torch.manual_seed(1)
    block = CrossScaleBlock(24, ('w8', 'w8_flip'), d_state=4).eval()
    twin = _transposed_copy(block, ('c_w8', 'c_w8_flip')).eval()
    h, w = size
    x, x_down = torch.randn(2, 24, h, w), torch.randn(2, 24, (h + 1) // 2, (w + 1) // 2)
    with torch.no_grad():
        out = block(x, x_down)
        out_t = twin(x.transpose(-2, -1), x_down.transpose(-2, -1)).transpose(-2, -1)
    assert out.shape == x.shape
    assert torch.allclose(out, out_t, atol=1e-5)


def test_dis_block_standalone_nchw():
    torch.manual_seed(0)
    block = ARCH_REGISTRY.get('DISBlock')(24, ['w4', 'c_w4_flip', 'w64'], d_state=4)
    x = torch.randn(2, 24, 7, 10, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.mean().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match='too small'):
        DISBlock(12, ['w8'])


# ----------------------------------------------------------------------------------------- training
def _grads(net, x):
    net.zero_grad()
    net(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _saved_bytes(net, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).mean().backward()
    return total[0]


def test_checkpoint_same_gradients_less_memory():
    x = torch.rand(1, 3, 12, 10)
    plain, ckpt = tiny(depths=[2], cross_scale_scan=True), tiny(depths=[2], cross_scale_scan=True, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    g_plain, g_ckpt = _grads(plain, x), _grads(ckpt, x)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        assert torch.allclose(g_plain[name], g_ckpt[name], atol=1e-6, rtol=1e-4), name
    assert _saved_bytes(ckpt, x) < 0.7 * _saved_bytes(plain, x)


def test_bf16_autocast_keeps_scan_float32(monkeypatch):
    dtypes = []
    original = ops.selective_scan

    def spy(u, delta, A, B, C, *args, **kwargs):
        dtypes.append({t.dtype for t in (u, delta, A, B, C)})
        return original(u, delta, A, B, C, *args, **kwargs)

    monkeypatch.setattr(ops, 'selective_scan', spy)
    net = tiny(cross_scale_scan=True)
    x = torch.rand(2, 3, 10, 12)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert dtypes and all(d == {torch.float32} for d in dtypes)


# ----------------------------------------------------------------------------------------- options, loading
def test_official_option_quirks_are_fixed():
    tiny(mlp_ratio=2., depths2=1, cross_scale_scan=True)  # float mlp_ratio and int depths2 crash officially
    with pytest.warns(UserWarning, match='unknown network_g option'):
        tiny(window_size=8)
    with pytest.raises(ValueError, match='upsampler'):
        tiny(upsampler='')
    with pytest.raises(ValueError, match='depths2'):
        tiny(depths=[1], depths2=[1, 1], cross_scale_scan=True)


def test_state_dict_mismatch_errors_name_the_hyper_parameter():
    golden = load_golden('mambacsr_dis')
    cfg = golden['network_g']
    cases = [
        (dict(cfg, d_state=16), 'd_state'),
        (dict(cfg, embed_dim=36), 'embed_dim'),
        (dict(cfg, depths=[6]), 'depths'),
        (dict(cfg, upscale=2), 'upscale'),
        (dict(cfg, cross_scale_scan=True), 'cross_scale_scan'),
        (dict(cfg, dual_interleaved_scan=False), 'dual_interleaved_scan'),
    ]
    for net_cfg, culprit in cases:
        net = MambaCSR(**net_cfg)
        with pytest.raises(RuntimeError, match=f'network_g.{culprit}: model has'):
            net.load_state_dict(golden['state_dict'])
    net = MambaCSR(**cfg)
    with pytest.raises(RuntimeError, match='params_ema'):
        net.load_state_dict({'params_ema': golden['state_dict']})
    with pytest.raises(RuntimeError, match="'module.'"):
        net.load_state_dict({f'module.{k}': v for k, v in golden['state_dict'].items()})
    # non-strict loading of a subset still works
    partial = {k: v for k, v in golden['state_dict'].items() if k.startswith('conv_first')}
    result = net.load_state_dict(partial, strict=False)
    assert 'conv_last.weight' in result.missing_keys
    assert torch.equal(net.conv_first.weight, golden['state_dict']['conv_first.weight'])


def test_scan_backend_is_no_network_option():
    """The backend is ``ops.use_backend`` / MAMBACSR_SCAN_BACKEND (tests/test_use_backend.py), never a module
    attribute: the old ``scan_backend`` key is refused with the replacement, no mixer stores a backend."""
    with pytest.raises(ValueError, match=r"scan_backend was removed.*MAMBACSR_SCAN_BACKEND.*use_backend\('<name>'\)"):
        MambaCSR(**TINY, scan_backend='torch')
    net = tiny(cross_scale_scan=True)
    assert not hasattr(net, 'set_scan_backend')
    assert not any(hasattr(m, 'scan_backend') for m in net.modules())
    for cls in (DISBlock, CrossScaleBlock):
        with pytest.raises(TypeError, match='scan_backend'):
            cls(24, scan_backend='torch')
