"""Token orders of mambacsr_arch.dis: literal orders on small grids and exact scan/merge round trips."""
import random

import pytest
import torch

import mambacsr_arch  # noqa: F401  (shims before basicsr)
from mambacsr_arch import dis
from mambacsr_arch.dis import Direction, parse_direction


def grid(h, w):
    """(1, 1, H, W) map whose value is the row-major index."""
    return torch.arange(h * w).reshape(1, 1, h, w)


@pytest.mark.parametrize('name, expected', [
    ('w8', Direction(8, False, False, 'window')),
    ('w8_flip', Direction(8, False, True, 'window')),
    ('c_w64', Direction(64, True, False, 'window')),
    ('c_w16_flip', Direction(16, True, True, 'window')),
    ('h', Direction(None, False, False, 'raster')),
    ('v_flip', Direction(None, True, True, 'raster')),
])
def test_parse_direction(name, expected):
    assert parse_direction(name) == expected


@pytest.mark.parametrize('name', ['x8', 'w', 'c_w', 'w8_flop', 'cw8', 'w0', '', 'w8flip'])
def test_parse_direction_rejects(name):
    with pytest.raises(ValueError, match='scan direction'):
        parse_direction(name)


# 4 x 4 grid, values = row-major index:
#  0  1  2  3
#  4  5  6  7
#  8  9 10 11
# 12 13 14 15
W2 = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
C_W2 = [0, 4, 1, 5, 8, 12, 9, 13, 2, 6, 3, 7, 10, 14, 11, 15]


@pytest.mark.parametrize('window, column_first, flip, expected', [
    (2, False, False, W2),
    (2, False, True, W2[::-1]),
    (2, True, False, C_W2),
    (2, True, True, C_W2[::-1]),
    (4, False, False, list(range(16))),
    (4, True, False, [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]),
    (None, True, False, [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]),
])
def test_window_scan_literal_order(window, column_first, flip, expected):
    seq = dis.window_scan(grid(4, 4), window, column_first, flip)
    assert seq.flatten().tolist() == expected


def test_window_scan_clips_border_windows():
    # 3 x 3 grid (values 1..9), window 2: windows 2x2, 2x1 | 1x2, 1x1; no padding is scanned
    x = grid(3, 3) + 1
    seq = dis.window_scan(x, 2).flatten().tolist()
    assert seq == [1, 2, 4, 5, 3, 6, 7, 8, 9]
    assert dis.scan_length((3, 3), 2) == 9
    col = dis.window_scan(x, 2, column_first=True).flatten().tolist()
    assert col == [1, 4, 2, 5, 7, 8, 3, 6, 9]
    # a map smaller than one window is a single window: a plain raster scan
    small = grid(3, 5)
    assert dis.window_scan(small, 64).flatten().tolist() == list(range(15))
    assert dis.window_scan(small, 64, column_first=True).flatten().tolist() == \
        small[0, 0].t().flatten().long().tolist()


def _padded_reference_scan(x, window, column_first):
    """The pre-0.2 order (zero-padded to whole windows) with the padding tokens removed: the clipped
    order must equal it, since clipping keeps the relative order of the real tokens."""
    b, c, h, w = x.shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    ids = torch.zeros(1, 1, hp, wp)
    ids[..., :h, :w] = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w)
    ids = ids.reshape(1, 1, hp // window, window, wp // window, window)
    perm = (0, 1, 4, 2, 5, 3) if column_first else (0, 1, 2, 4, 3, 5)
    order = ids.permute(perm).flatten()
    order = order[order > 0].long() - 1
    return x.flatten(2)[..., order]


@pytest.mark.parametrize('column_first', [False, True])
def test_clipped_order_is_the_padded_order_without_padding(column_first):
    for h, w in _sizes(6, seed=3):
        for window in (2, 3, 8):
            x = torch.randn(1, 2, h, w)
            expected = _padded_reference_scan(x, window, column_first)
            assert torch.equal(dis.window_scan(x, window, column_first), expected), (h, w, window)


def test_window_scan_non_square_literal():
    # 2 x 4 grid, window 2: two windows side by side
    x = grid(2, 4)
    assert dis.window_scan(x, 2).flatten().tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert dis.window_scan(x, 2, column_first=True).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # 4 x 2 grid: column-first visits the windows top to bottom too (only one window column)
    y = grid(4, 2)
    assert dis.window_scan(y, 2, column_first=True).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_cross_scale_literal_order():
    # high 4 x 4 (values 0..15), low 2 x 2 (values 100..103), window 4 -> low window 2
    high, low = grid(4, 4), grid(2, 2) + 100
    seq = dis.cross_scale_scan(high, low, 4).flatten().tolist()
    assert seq == [100, 0, 1, 4, 5, 101, 2, 3, 6, 7, 102, 8, 9, 12, 13, 103, 10, 11, 14, 15]
    col = dis.cross_scale_scan(high, low, 4, column_first=True).flatten().tolist()
    assert col == [100, 0, 4, 1, 5, 102, 8, 12, 9, 13, 101, 2, 6, 3, 7, 103, 10, 14, 11, 15]
    # flip reverses the low and high sequences separately: every group still starts with its low token
    flip = dis.cross_scale_scan(high, low, 4, flip=True).flatten().tolist()
    assert flip == [103, 15, 14, 11, 10, 102, 13, 12, 9, 8, 101, 7, 6, 3, 2, 100, 5, 4, 1, 0]
    assert dis.cross_scale_length((4, 4), 4) == 20


def test_cross_scale_window_grid():
    # high 8 x 4 with window 4: two windows stacked; low 4 x 2, window 2
    high, low = grid(8, 4), grid(4, 2) + 100
    seq = dis.cross_scale_scan(high, low, 4).reshape(-1, 5)
    assert seq[:, 0].tolist() == [100, 101, 102, 103, 104, 105, 106, 107]
    assert seq[4].tolist() == [104, 16, 17, 20, 21]
    col = dis.cross_scale_scan(high, low, 4, column_first=True).reshape(-1, 5)
    assert col[:, 0].tolist() == [100, 102, 101, 103, 104, 106, 105, 107]


def _sizes(n, seed=0):
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 9), (7, 1), (8, 8), (16, 8), (5, 12), (13, 13), (24, 17)]
    sizes += [(rng.randint(1, 40), rng.randint(1, 40)) for _ in range(n)]
    return sizes


@pytest.mark.parametrize('name', ['w1', 'w2', 'w3', 'w8', 'w8_flip', 'c_w8', 'c_w8_flip', 'w16', 'c_w32_flip', 'w64',
                                  'c_w64_flip', 'h', 'h_flip', 'v', 'v_flip'])
def test_window_round_trip(name):
    d = parse_direction(name)
    for h, w in _sizes(6, seed=len(name)):
        x = torch.randn(2, 3, h, w)
        seq = dis.window_scan(x, d.window, d.column_first, d.flip)
        assert seq.shape == (2, 3, dis.scan_length((h, w), d.window))
        back = dis.window_merge(seq, d.window, (h, w), d.column_first, d.flip)
        assert torch.equal(back, x), (name, h, w)
        back_nhwc = dis.window_merge(seq, d.window, (h, w), d.column_first, d.flip, channels_last=True)
        assert torch.equal(back_nhwc, x.permute(0, 2, 3, 1)), (name, h, w)
        # every token appears exactly once in the sequence (no padding is scanned)
        ids = dis.window_scan(grid(h, w) + 1, d.window, d.column_first, d.flip).flatten()
        assert sorted(ids.tolist()) == list(range(1, h * w + 1))


@pytest.mark.parametrize('window', [2, 4, 8, 16])
@pytest.mark.parametrize('column_first', [False, True])
@pytest.mark.parametrize('flip', [False, True])
def test_cross_scale_round_trip(window, column_first, flip):
    for h, w in _sizes(4, seed=window):
        for down in [((h + 1) // 2, (w + 1) // 2)]:
            x, x_down = torch.randn(2, 3, h, w), torch.randn(2, 3, *down)
            seq = dis.cross_scale_scan(x, x_down, window, column_first, flip)
            assert seq.shape[-1] == dis.cross_scale_length((h, w), window)
            back = dis.cross_scale_merge(seq, window, (h, w), column_first, flip)
            assert torch.equal(back, x), (window, column_first, flip, h, w)
            back_nhwc = dis.cross_scale_merge(seq, window, (h, w), column_first, flip, channels_last=True)
            assert torch.equal(back_nhwc, x.permute(0, 2, 3, 1)), (window, column_first, flip, h, w)


@pytest.mark.parametrize('column_first', [False, True])
@pytest.mark.parametrize('flip', [False, True])
def test_cross_scale_position_alignment(column_first, flip):
    """Each low token is followed by exactly the 4 high tokens of its 2 x 2 block (non-square, padded)."""
    h, w, window = 22, 36, 8
    row = torch.arange(h).view(1, 1, h, 1).expand(1, 1, h, w)
    col = torch.arange(w).view(1, 1, 1, w).expand(1, 1, h, w)
    high = torch.cat([row, col], 1) + 1  # +1: padding tokens are 0
    low = torch.cat([torch.arange(h // 2).view(1, 1, -1, 1).expand(1, 1, h // 2, w // 2),
                     torch.arange(w // 2).view(1, 1, 1, -1).expand(1, 1, h // 2, w // 2)], 1) + 1
    groups = dis.cross_scale_scan(high, low, window, column_first, flip).reshape(2, -1, 5)
    real = groups[0, :, 0] > 0
    assert int(real.sum()) == (h // 2) * (w // 2)
    for g in groups[:, real].permute(1, 0, 2):  # (2, 5): rows, cols
        lr, lc = g[0, 0] - 1, g[1, 0] - 1
        assert sorted(zip((g[0, 1:] - 1).tolist(), (g[1, 1:] - 1).tolist())) == \
            [(2 * lr + i, 2 * lc + j) for i in (0, 1) for j in (0, 1)]


def test_errors_are_actionable():
    with pytest.raises(ValueError, match='expected 16 tokens'):
        dis.window_merge(torch.zeros(1, 1, 15), 2, (4, 4))
    with pytest.raises(ValueError, match='even'):
        dis.cross_scale_scan(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), 3)
    with pytest.raises(ValueError, match='ceil'):
        dis.cross_scale_scan(torch.zeros(1, 1, 17, 8), torch.zeros(1, 1, 8, 4), 16)
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        dis.window_scan(torch.zeros(4, 4), 2)


@pytest.mark.parametrize('cross_scale', [False, True], ids=['window', 'cross-scale'])
def test_graph_mode_orders_equal_the_eager_ones(monkeypatch, cross_scale):
    """While a graph exporter traces, token orders are gathers (no copies into a buffer): the same tokens."""
    from mambacsr_arch.archs.mambacsr import fused

    names = ['w8', 'w8_flip', 'c_w8', 'c_w8_flip'] if cross_scale else ['w4', 'w4_flip', 'c_w4_flip', 'h', 'v_flip']
    plan = fused.DirectionGroups.of([parse_direction(n) for n in names], cross_scale)
    cases = []
    for h, w in [(8, 8), (6, 10), (16, 12)] + ([] if cross_scale else [(5, 7), (1, 9), (13, 4)]):
        x = torch.randn(2, 3, h, w)
        x_down = torch.randn(2, 3, (h + 1) // 2, (w + 1) // 2) if cross_scale else None
        cases.append((x, x_down, fused._scan(plan, x, x_down)))
    monkeypatch.setattr(torch.compiler, 'is_exporting', lambda: True)
    assert dis.graph_mode(8, 8)
    for x, x_down, eager in cases:
        size = tuple(x.shape[2:])
        assert torch.equal(fused._scan(plan, x, x_down), eager), size
        for k, d in enumerate(plan.directions):
            if cross_scale:
                back = dis.cross_scale_merge(eager[:, k], d.window, size, d.column_first, d.flip)
            else:
                back = dis.window_merge(eager[:, k], d.window, size, d.column_first, d.flip)
            assert torch.equal(back, x), (size, d)
