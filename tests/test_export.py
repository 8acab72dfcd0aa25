"""`basicsr export`: ONNX models of MambaCSR and HAT checked with onnxruntime; safetensors weights; bad requests."""
import json

import numpy as np
import pytest
import torch

import mambacsr_arch  # noqa: F401  (first: its torchvision shim lets basicsr import; registers the archs)
from basicsr.archs import build_network
from mambacsr_arch.cli.main import main
from mambacsr_arch.models.weights import read_checkpoint

pytestmark = pytest.mark.hostile

MAMBA = dict(type='MambaCSR', img_size=16, embed_dim=24, depths=[1], d_state=4, mlp_ratio=1., upscale=2,
             cross_scale_scan=True, depths2=[1])
HAT = dict(type='HAT', img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, compress_ratio=3,
           squeeze_factor=4, mlp_ratio=1., upscale=3, upsampler='pixelshuffle')


def _checkpoint(tmp_path, opt, name='net_g.pth'):
    torch.manual_seed(0)
    net = build_network(dict(opt)).eval()
    path = tmp_path / name
    torch.save({'params_ema': {'module.' + k: v for k, v in net.state_dict().items()}}, path)
    return net, path


@pytest.mark.slow
@pytest.mark.parametrize('opt', [MAMBA, HAT], ids=['MambaCSR', 'HAT'])
def test_onnx_export_matches_pytorch_at_a_non_square_size(tmp_path, capsys, monkeypatch, opt):
    import onnxruntime

    # PyTorch side on the portable scan: the export is checked here, the backends' agreement in test_scan_dispatch
    monkeypatch.setenv('MAMBACSR_SCAN_BACKEND', 'torch')

    net, weights = _checkpoint(tmp_path, opt)
    out = tmp_path / 'model.onnx'
    assert main(['export', '--weights', str(weights), '-o', str(out), '--size', '8', '14']) == 0
    printed = capsys.readouterr().out
    assert f"detected {opt['type']} x{opt['upscale']}" in printed and 'max abs difference' in printed
    assert float(printed.split('max abs difference ')[1].split()[0]) <= 1e-5  # float32 noise, not a wrong order
    # independently of the command's own check: another input, our run vs onnxruntime
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    x = torch.rand(1, 3, 8, 14, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = net(x).numpy()
    got = session.run(None, {'lq': x.numpy()})[0]
    assert got.shape == (1, 3, 8 * opt['upscale'], 14 * opt['upscale'])
    assert np.abs(got - expected).max() <= 1e-5
    if opt['type'] == 'MambaCSR':  # the scan is plain ONNX operators, no custom domain
        import onnx

        domains = {node.domain for node in onnx.load(str(out)).graph.node}
        assert domains <= {'', 'ai.onnx'}, domains


def test_safetensors_export_and_reuse(tmp_path, capsys):
    net, weights = _checkpoint(tmp_path, HAT)
    out = tmp_path / 'net_g.safetensors'
    assert main(['export', '--weights', str(weights), '-o', str(out), '--arch-opt', 'img_size=32']) == 0
    assert 'img_size' in capsys.readouterr().out
    state = read_checkpoint(out)
    assert sorted(state) == sorted(net.state_dict())
    from safetensors import safe_open

    with safe_open(str(out), framework='pt') as f:
        assert json.loads(f.metadata()['network_g'])['img_size'] == 32
    again = tmp_path / 'again.safetensors'  # a safetensors file is accepted wherever a .pth is
    assert main(['export', '--weights', str(out), '-o', str(again)]) == 0


@pytest.mark.parametrize('args,message', [
    (['-o', '{tmp}/m.onnx'], '--size H W'),
    (['-o', '{tmp}/m.txt'], '.onnx model or .safetensors'),
    (['-o', '{tmp}/net_g.pth'], '-o .* is the --weights file'),
    (['-o', '{tmp}/missing/m.onnx', '--size', '8', '8'], 'does not exist'),
    (['-o', '{tmp}/m.onnx', '--size', '8', '8', '--opset', '11'], 'opset from 18 to'),
    (['-o', '{tmp}/m.onnx', '--size', '8', '8', '--opset', '99'], 'opset from 18 to'),
    (['-o', '{tmp}/m.onnx', '--size', '100000', '8'], 'at most 4096 per side'),
    (['-o', '{tmp}/m.onnx', '--size', '8', '8', '--tolerance', 'inf'], 'finite number > 0'),
    (['-o', '{tmp}/m.safetensors', '--arch-opt', 'embed_dim=48'], 'embed_dim'),
])
def test_bad_requests_are_config_errors(tmp_path, capsys, args, message):
    _checkpoint(tmp_path, HAT)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ['export', '--weights', str(tmp_path / 'net_g.pth')] + [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no input replaced


def test_unrelated_checkpoint_is_named(tmp_path, capsys):
    msr = build_network(dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, upscale=4))
    torch.save({'params': msr.state_dict()}, tmp_path / 'msr.pth')
    assert main(['export', '--weights', str(tmp_path / 'msr.pth'), '-o', str(tmp_path / 'm.onnx'),
                 '--size', '8', '8']) == 2
    assert 'cannot detect the architecture' in capsys.readouterr().err


HAT2 = dict(HAT, depths=[2])  # two blocks: the second attends in shifted windows (the mask), as released HATs
MAMBA_DIS = dict(MAMBA, cross_scale_scan=False)


@pytest.mark.parametrize('opt', [HAT2, pytest.param(MAMBA_DIS, marks=pytest.mark.slow),
                                 pytest.param(MAMBA, marks=pytest.mark.slow)], ids=['HAT', 'MambaCSR', 'cross-scale'])
def test_dynamic_export_runs_at_any_size(tmp_path, capsys, monkeypatch, opt):
    import onnxruntime

    if opt is MAMBA:  # the cross-scale graph is checked here, the scan's chunk size by the others: short chunks
        from mambacsr_arch.ops import export_scan  # about halve this export's time (112 s vs 245 s, 2 cores)

        monkeypatch.setattr(export_scan, 'CHUNK', 4)
    net, weights = _checkpoint(tmp_path, opt)
    out = tmp_path / 'dyn.onnx'
    assert main(['export', '--weights', str(weights), '-o', str(out), '--size', '8', '12', '--dynamic']) == 0
    printed = capsys.readouterr().out
    low = {id(HAT2): 4, id(MAMBA): 3}.get(id(opt), 2)  # HAT: window_size (reflect padding); cross-scale: 3
    checked = [line for line in printed.splitlines() if 'max abs difference' in line]
    assert len(checked) == 4 and f'at input (3, 3, {low}, {low})' in printed, printed
    # float32 noise only (a batch fixed in the graph once reshuffled channels at other batches: 2e-4 here)
    assert max(float(line.split('max abs difference ')[1].split()[0]) for line in checked) <= 1e-5, printed
    assert f'(N, 3, H, W), H, W >= {low}' in printed
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    for shape in [(2, 3, 9, 13), (1, 3, low, 11)]:  # sizes the command did not check: odd, no window multiple
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = net(x).numpy()
        got = session.run(None, {'lq': x.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-3


@pytest.mark.parametrize('opt,size,low', [(HAT2, 3, 4), (MAMBA, 2, 3), (MAMBA_DIS, 1, 2)],
                         ids=['HAT', 'cross-scale', 'MambaCSR'])
def test_dynamic_size_below_the_minimum_is_a_config_error(tmp_path, capsys, opt, size, low):
    _, weights = _checkpoint(tmp_path, opt)
    assert main(['export', '--weights', str(weights), '-o', str(tmp_path / 'd.onnx'), '--size', str(size), '8',
                 '--dynamic']) == 2
    assert f'>= {low}' in capsys.readouterr().err and not (tmp_path / 'd.onnx').exists()


def test_a_killed_exports_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    """kill -9 mid-export left '.m.safetensors.<pid>.tmp' (MBs) for good; the next export of m removes it."""
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    _, weights = _checkpoint(tmp_path, HAT)
    stale = tmp_path / f'.m.safetensors.{dead.pid}.tmp'
    live = tmp_path / f'.m.safetensors.{os.getppid()}.tmp'  # pytest's parent is alive: its writer may run
    other = tmp_path / f'.n.safetensors.{dead.pid}.tmp'  # another output's: not this run's business
    for path in (stale, live, other):
        path.write_bytes(b'partial')
    assert main(['export', '--weights', str(weights), '-o', str(tmp_path / 'm.safetensors')]) == 0
    assert not stale.exists() and live.exists() and other.exists()
