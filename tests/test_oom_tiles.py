"""Out-of-memory errors during inference: smaller tiles, the same pixels as a run started at that size.

The GPU's out-of-memory error is simulated on the CPU by a network wrapper that raises
``torch.cuda.OutOfMemoryError`` (or a RuntimeError saying so) for inputs above a pixel budget.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambacsr_arch.models import inference
from mambacsr_arch.models.inference import restore_image


class GlobalNet(nn.Module):
    """x2 upscale plus the input's mean: every output pixel depends on the whole input, so the tile
    layout shows in the output (a tile-size change cannot go unnoticed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode='nearest') + x.mean(dim=(-2, -1), keepdim=True)


class OutOfMemoryAbove(nn.Module):
    """``net`` that raises a CUDA out-of-memory error for inputs of more than ``max_pixels`` px."""

    def __init__(self, net: nn.Module, max_pixels: int, error: Optional[Exception] = None) -> None:
        super().__init__()
        self.net, self.max_pixels, self.error = net, max_pixels, error
        self.inputs: List[Tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > self.max_pixels:
            raise self.error or torch.cuda.OutOfMemoryError(
                'CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)')
        return self.net(x)


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, '_OOM_NOTED', set())


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def warnings_of(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if 'out of memory' in r.getMessage()]


def test_whole_image_falls_back_to_halving_tiles(caplog: pytest.LogCaptureFixture) -> None:
    """40x600 LR: whole image, then tiles of 512, 256 fail; 128 fits. Same pixels as --tile 128."""
    lq = image(40, 600)
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=40 * 130)
    with caplog.at_level(logging.WARNING, logger='basicsr'):
        out = restore_image(net, lq, 2, pad_multiple=8)
    expected = restore_image(GlobalNet(), lq, 2, tile_mode='blend', tile_size=128, pad_multiple=8)
    assert torch.equal(out, expected)
    assert [w for _, w in net.inputs[:3]] == [600, 512, 256] and all(w <= 128 for _, w in net.inputs[3:])
    notes = warnings_of(caplog)
    assert len(notes) == 3
    assert 'restoring 40x600 LR px as a whole: retrying with tiles of 512 LR px' in notes[0]
    assert 'tiles of 512 LR px: retrying with tiles of 256 LR px' in notes[1]
    assert 'retrying with tiles of 128 LR px (pass --tile 128' in notes[2]
    with caplog.at_level(logging.WARNING, logger='basicsr'):
        caplog.clear()
        again = restore_image(net, lq, 2, pad_multiple=8)
    assert torch.equal(again, expected) and warnings_of(caplog) == []  # said once per process


def test_the_tiles_actually_differ_from_the_whole_image() -> None:
    """The comparison above can fail: this net's output depends on the tile size."""
    lq = image(40, 600)
    whole = restore_image(GlobalNet(), lq, 2, tile_mode='none')
    assert not torch.allclose(whole, restore_image(GlobalNet(), lq, 2, tile_mode='blend', tile_size=128))
    assert not torch.allclose(restore_image(GlobalNet(), lq, 2, tile_mode='blend', tile_size=256),
                              restore_image(GlobalNet(), lq, 2, tile_mode='blend', tile_size=128))


def test_small_whole_image_halves_its_longer_side() -> None:
    lq = image(200, 180)
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=120 * 120)
    out = restore_image(net, lq, 2, tile_mode='none')
    assert net.inputs[:2] == [(200, 180), (100, 100)]
    assert torch.equal(out, restore_image(GlobalNet(), lq, 2, tile_size=100, tile_overlap=32))


def test_blend_tiles_halve_and_message_string_detected() -> None:
    """A RuntimeError whose message says 'out of memory' (not the typed error) is handled too."""
    lq = image(96, 300)
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=96 * 100, error=RuntimeError('CUDA error: out of memory'))
    out = restore_image(net, lq, 2, tile_size=192, tile_overlap=16)
    assert torch.equal(out, restore_image(GlobalNet(), lq, 2, tile_size=96, tile_overlap=16))


def test_hat_tiles_stay_hat_tiles() -> None:
    lq = image(130, 130)
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=100 * 100)
    out = restore_image(net, lq, 2, tile_mode='hat', tile_size=128, tile_overlap=8, pad_multiple=4)
    assert torch.equal(out, restore_image(GlobalNet(), lq, 2, tile_mode='hat', tile_size=64, tile_overlap=8,
                                          pad_multiple=4))


def test_self_ensemble_keeps_the_smaller_tiles_for_all_eight() -> None:
    lq = image(40, 200)
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=40 * 110)
    out = restore_image(net, lq, 2, tile_mode='none', self_ensemble=True)
    assert torch.equal(out, restore_image(GlobalNet(), lq, 2, tile_size=100, self_ensemble=True))
    assert sum(1 for shape in net.inputs if max(shape) > 110) == 1  # one failure, not one per transform


def test_at_the_floor_the_error_says_what_may_help() -> None:
    lq = image(200, 200)
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=50 * 50)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r'even with tiles of 64 LR px.*smaller --tile.*--fp16'):
        restore_image(net, lq, 2, pad_multiple=8)
    assert [max(shape) for shape in net.inputs] == [200, 104, 64]  # 200, then 100 (padded to 104), then 64
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        restore_image(OutOfMemoryAbove(GlobalNet(), 50 * 50), lq, 2, amp_dtype=torch.bfloat16)
    assert '--fp16' not in str(info.value) and 'Tried to allocate 2.00 GiB' in str(info.value)


def test_floor_is_the_pad_multiple_when_larger() -> None:
    lq = image(300, 300)
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=10)
    with pytest.raises(torch.cuda.OutOfMemoryError, match='tiles of 96 LR px'):
        restore_image(net, lq, 2, pad_multiple=96, tile_overlap=8)


def test_official_protocol_is_not_tiled_differently() -> None:
    lq = image(100, 100)
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=10)
    with pytest.raises(torch.cuda.OutOfMemoryError, match='official MambaCSR chops.*--no-official-protocol'):
        restore_image(net, lq, 2, official_protocol=True)


def test_other_errors_are_not_retried() -> None:
    net = OutOfMemoryAbove(GlobalNet(), max_pixels=10, error=RuntimeError('shape mismatch'))
    with pytest.raises(RuntimeError, match='^shape mismatch$'):
        restore_image(net, image(100, 100), 2)
    assert len(net.inputs) == 1
