"""x8 self-ensemble (``val.self_ensemble``, ``basicsr infer --self-ensemble``): the mean of 8 transformed restores."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from mambacsr_arch.models.inference import (InferenceSettings, SELF_ENSEMBLE_TRANSFORMS, resolve_inference_settings,
                                            restore_image)


class Asymmetric(nn.Module):
    """x2 net that is NOT flip/transpose-equivariant (a fixed, lopsided 3x3 conv, then pixel shuffle).

    Also counts calls and records the (H, W) of every input it sees.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 12, 3, padding=1, padding_mode='replicate')
        self.sizes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        # the global per-row mean makes the output depend on what a tile/chop sees, as a real net's context does
        return F.pixel_shuffle(self.conv(x), 2) + x.mean(-1, keepdim=True).repeat_interleave(2, -2).mean(1, True)


class PointwiseX2(nn.Module):
    """x2 net built from a 1x1 conv and nearest upsampling: equivariant under every flip and transpose."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2, mode='nearest')


def _manual_mean(net, lq, **kwargs):
    """The x8 self-ensemble written out: 8 explicit restores, each undone by hand, averaged."""
    outs = []
    for tr in (False, True):
        for fh in (False, True):
            for fw in (False, True):
                x = lq
                x = x.flip(-1) if fw else x
                x = x.flip(-2) if fh else x
                x = x.transpose(-2, -1) if tr else x
                y = restore_image(net, x, 2, **kwargs)
                y = y.transpose(-2, -1) if tr else y
                y = y.flip(-2) if fh else y
                outs.append(y.flip(-1) if fw else y)
    assert len(outs) == len(SELF_ENSEMBLE_TRANSFORMS) == 8
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize('kwargs', [
    dict(tile_mode='none'),
    dict(tile_size=12, tile_overlap=4),  # blended tiles inside every transformed restore
    dict(tile_mode='hat', tile_size=8, tile_overlap=2, pad_multiple=4),
    dict(official_protocol=True, official_chop=16, official_padding_size=8),
], ids=['whole', 'blend', 'hat', 'official'])
def test_equals_manual_mean_of_8_transformed_restores(kwargs):
    net = Asymmetric().eval()
    lq = torch.rand(1, 3, 23, 17)
    ens = restore_image(net, lq, 2, self_ensemble=True, **kwargs)
    assert ens.shape == (1, 3, 46, 34)
    torch.testing.assert_close(ens, _manual_mean(net, lq, **kwargs), rtol=0, atol=1e-6)
    plain = restore_image(net, lq, 2, **kwargs)
    assert (ens - plain).abs().max() > 1e-3  # the net is not equivariant: the ensemble does change pixels


def test_runs_the_8_transposed_shapes():
    net = Asymmetric().eval()
    restore_image(net, torch.rand(1, 3, 11, 7), 2, tile_mode='none', self_ensemble=True)
    assert sorted(net.sizes) == sorted([(11, 7)] * 4 + [(7, 11)] * 4)


def test_identity_for_an_equivariant_network():
    net = PointwiseX2().eval()
    lq = torch.rand(2, 3, 13, 9)
    plain = restore_image(net, lq, 2, tile_mode='none')
    torch.testing.assert_close(restore_image(net, lq, 2, tile_mode='none', self_ensemble=True), plain,
                               rtol=0, atol=1e-6)
    # with blended tiles too: tiles of an equivariant, local net are exact, so the ensemble stays the identity
    torch.testing.assert_close(restore_image(net, lq, 2, tile_size=6, tile_overlap=2, self_ensemble=True), plain,
                               rtol=0, atol=1e-6)


def test_settings_from_option_file_and_flag():
    assert resolve_inference_settings({}).self_ensemble is False
    on = resolve_inference_settings({'val': {'self_ensemble': True}})
    assert on.self_ensemble and any('8x the time' in note for note in on.notes)
    assert on.restore_kwargs(PointwiseX2())['self_ensemble'] is True
    assert resolve_inference_settings({'val': {'self_ensemble': True}}, self_ensemble=False).self_ensemble is False
    assert resolve_inference_settings({}, self_ensemble=True) == InferenceSettings(self_ensemble=True)
    # composes with the official protocol and tiles
    both = resolve_inference_settings({'padding_size': 64, 'val': {'self_ensemble': True}})
    assert both.official_protocol and both.self_ensemble
    with pytest.raises(ValueError, match='val.self_ensemble must be true or false'):
        resolve_inference_settings({'val': {'self_ensemble': 'yes'}})


def test_infer_flag_reaches_the_settings(tmp_path):
    import argparse

    from mambacsr_arch.cli import infer

    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    assert '--self-ensemble' in parser.format_help() and '8x the time' in ' '.join(parser.format_help().split())
    base = ['-i', str(tmp_path), '-o', str(tmp_path / 'out'), '--arch', 'MambaCSR', '--weights', 'w.pth',
            '--scale', '2']
    assert infer.resolve_setup(parser.parse_args(base + ['--self-ensemble'])).settings.self_ensemble is True
    assert infer.resolve_setup(parser.parse_args(base)).settings.self_ensemble is False
    assert infer.resolve_setup(parser.parse_args(base + ['--no-self-ensemble'])).settings.self_ensemble is False
