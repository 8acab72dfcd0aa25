"""restore_image: padding, blended tiles (PSNR on a real photo), automatic tiling, official protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from basicsr.metrics import calculate_psnr
from helpers_images import photo_bgr
from mambacsr_arch.data.degradations import degrade_csr
from mambacsr_arch.models.inference import restore_image


class NearestX4(nn.Module):
    """Purely local x4 net: nearest upsampling. Tiling must reproduce it exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=4, mode='nearest')


class Recorder(nn.Module):
    """Records input sizes; output = nearest x4 plus the per-call global mean (tile dependent)."""

    def __init__(self, multiple: int = 1) -> None:
        super().__init__()
        self.multiple = multiple
        self.sizes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        assert x.shape[-2] % self.multiple == 0 and x.shape[-1] % self.multiple == 0, x.shape
        return F.interpolate(x, scale_factor=4, mode='nearest') + x.mean((2, 3), keepdim=True)


class BicubicPlusResidual(nn.Module):
    """A realistic-looking SR net: bicubic x4 plus a random tiny MambaCSR's residual (global receptive field)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=4, mode='bicubic', align_corners=False) + 0.2 * self.body(x)


def to_tensor(bgr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)[None].float() / 255


def to_bgr(t: torch.Tensor) -> np.ndarray:
    return (t[0].clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1] * 255).round().astype(np.uint8)


@pytest.mark.parametrize('size', [(37, 53), (64, 40)])
@pytest.mark.parametrize('tile,overlap', [(16, 4), (24, 8)])
def test_tiled_equals_whole_for_a_local_net(size, tile, overlap):
    lq = torch.rand(2, 3, *size)
    whole = restore_image(NearestX4(), lq, 4)
    tiled = restore_image(NearestX4(), lq, 4, tile_size=tile, tile_overlap=overlap, pad_multiple=8)
    assert tiled.shape == (2, 3, size[0] * 4, size[1] * 4)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)


class CornerRecorder(nn.Module):
    """Nearest x4; records each tile's top-left LR corner, read from the coordinate-valued input."""

    def __init__(self) -> None:
        super().__init__()
        self.corners = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.corners.append((int(x[0, 0, 0, 0]), int(x[0, 1, 0, 0]), x.shape[-2], x.shape[-1]))
        return F.interpolate(x, scale_factor=4, mode='nearest')


def coordinate_image(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w): channel 0 holds the row index, channel 1 the column index."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing='ij')
    return torch.stack([ys, xs, torch.zeros_like(ys)])[None]


def test_tiles_cover_the_image_with_min_overlap():
    """The engine's own tiles (recorded by the network): every pixel covered, neighbours overlap >= 8 px."""
    net = CornerRecorder()
    lq = coordinate_image(70, 45)
    out = restore_image(net, lq, 4, tile_size=32, tile_overlap=8)
    assert torch.equal(out, F.interpolate(lq, scale_factor=4, mode='nearest'))  # blending a local net is exact
    assert {(th, tw) for _, _, th, tw in net.corners} == {(32, 32)}
    ys, xs = sorted({y for y, _, _, _ in net.corners}), sorted({x for _, x, _, _ in net.corners})
    assert ys[0] == 0 and ys[-1] + 32 == 70 and xs[0] == 0 and xs[-1] + 32 == 45
    assert all(b - a <= 32 - 8 for a, b in zip(ys, ys[1:]))
    assert all(b - a <= 32 - 8 for a, b in zip(xs, xs[1:]))
    assert len(net.corners) == len(ys) * len(xs)


def test_padding_to_multiple_and_tiny_image_fallback():
    net = Recorder(multiple=16)
    for size in [(5, 7), (16, 33), (1, 1)]:  # (5, 7): pad larger than the image -> replicate fallback
        out = restore_image(net, torch.rand(1, 3, *size), 4, pad_multiple=16)
        assert out.shape == (1, 3, size[0] * 4, size[1] * 4)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in net.sizes)


def test_no_grad_inside_and_mode_untouched():
    net = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.PixelShuffle(4)).train()
    out = restore_image(net, torch.rand(1, 3, 10, 10), 4, tile_size=6, tile_overlap=2)
    assert not out.requires_grad and net.training


def test_automatic_tiling_above_pixel_budget():
    net = Recorder()
    restore_image(net, torch.rand(1, 3, 40, 40), 4, max_pixels=0)
    assert net.sizes == [(40, 40)]
    net.sizes.clear()
    out = restore_image(net, torch.rand(1, 3, 40, 40), 4, max_pixels=24 * 24, tile_overlap=4)
    assert out.shape == (1, 3, 160, 160)
    assert len(net.sizes) > 1 and max(h * w for h, w in net.sizes) <= 24 * 24


def test_errors_are_actionable():
    with pytest.raises(ValueError, match='tile.overlap'):
        restore_image(NearestX4(), torch.rand(1, 3, 20, 20), 4, tile_size=8, tile_overlap=8)
    with pytest.raises(ValueError, match='upscale'):
        restore_image(NearestX4(), torch.rand(1, 3, 20, 20), 2)


@pytest.mark.parametrize('size,chops', [
    ((100, 130), [(128, 192)]),  # one chop: always padded by at least one pixel up to the next 64
    ((200, 64), [(128, 128), (128, 128)]),  # 2 rows: split 100, shave 25 -> chops of 125 rows
    ((500, 333), None),
])
def test_official_protocol_sizes(size, chops):
    net = Recorder()
    lq = torch.rand(1, 3, *size)
    out = restore_image(net, lq, 4, official_protocol=True)
    assert out.shape == (1, 3, size[0] * 4, size[1] * 4)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in net.sizes)
    parts = (size[0] // 192 + 1) * (size[1] // 192 + 1)
    assert len(net.sizes) == parts
    if chops is not None:
        assert net.sizes == chops
    # with a local net the pasted result equals the whole-image output
    torch.testing.assert_close(restore_image(NearestX4(), lq, 4, official_protocol=True),
                               NearestX4()(lq), rtol=0, atol=0)


@pytest.fixture(scope='module')
def photo_pair():
    gt = photo_bgr('astronaut', (128, 128))
    return gt, to_tensor(degrade_csr(gt, 4, 10))


@pytest.fixture(scope='module')
def tiny_mambacsr():
    from mambacsr_arch.archs.mambacsr.arch import MambaCSR

    torch.manual_seed(0)
    body = MambaCSR(upscale=4, embed_dim=24, d_state=4, scan_size=4, depths=[1], depths2=[1], mlp_ratio=1.0,
                    cross_scale_scan=True)
    return BicubicPlusResidual(body).eval()


@pytest.mark.slow
def test_tiled_psnr_within_005_db_of_whole_on_photo(photo_pair, tiny_mambacsr):
    gt, lq = photo_pair
    whole = restore_image(tiny_mambacsr, lq, 4)
    recorder = CornerRecorder()
    restore_image(recorder, coordinate_image(32, 32), 4, tile_size=20, tile_overlap=6)
    assert len(recorder.corners) == 4  # a 2 x 2 grid of tiles
    tiled = restore_image(tiny_mambacsr, lq, 4, tile_size=20, tile_overlap=6)
    psnr_whole = calculate_psnr(to_bgr(whole), gt, 4, test_y_channel=True)
    psnr_tiled = calculate_psnr(to_bgr(tiled), gt, 4, test_y_channel=True)
    assert abs(psnr_whole - psnr_tiled) <= 0.05, (psnr_whole, psnr_tiled)
    assert not torch.equal(whole, tiled)  # the net is not local: tiling really changed something


@pytest.mark.slow
def test_official_protocol_runs_mambacsr(photo_pair, tiny_mambacsr):
    _, lq = photo_pair
    out = restore_image(tiny_mambacsr, lq, 4, official_protocol=True)
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()
