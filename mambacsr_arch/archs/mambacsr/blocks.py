"""DIS blocks of MambaCSR: the scan schedule, ``DISBlock``, ``CrossScaleBlock`` and the residual groups.

* :func:`dis_directions` is the official per-block scan schedule.
* :class:`DISBlock` (official ``RLMBlock``): LayerNorm -> SS2D + 0.01 * CAB branch with a learnable
  ``skip_scale``, then LayerNorm -> MLP with ``skip_scale2``. Standalone use: (B, C, H, W) -> same.
* :class:`CrossScaleBlock` (official ``Cross_SS2D``): the two-scale fusion module, an SS2D with
  ``cross_scale=True`` plus its norms, skips and MLP (4 x dim, d_state 16 by default, as official).
  Standalone use: (B, C, H, W), (B, C, H/2, W/2) -> (B, C, H, W).
* :class:`DISLayer` / :class:`ResidualDISGroup` (official ``BasicLayer`` / ``ResidualLocalGroup``):
  a stack of DIS blocks (optional gradient checkpointing) closed by a conv and a residual.

Both blocks are registered in BasicSR's ARCH_REGISTRY, so other architectures can build them by name.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as torch_checkpoint
from basicsr.archs.swinir_arch import DropPath, Mlp
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from ...registry import registers
from ..layers import CAB, make_resi_conv
from .ss2d import SS2D

__all__ = ['dis_directions', 'DISBlock', 'CrossScaleBlock', 'DISLayer', 'ResidualDISGroup']

#: Depth below which the official code scans cross-scale-model groups with 32-windows only.
SHALLOW_GROUP_DEPTH = 6


def dis_directions(index: int, depth: int, scan_size: int = 8, dual_interleaved_scan: bool = True,
                   cross_scale_scan: bool = False) -> List[str]:
    """Scan directions of block ``index`` in a group of ``depth`` blocks (official ``BasicLayer`` rule).

    * DIS (``dual_interleaved_scan`` or ``cross_scale_scan``): by ``index % 4``:
      [wS, wS_flip], [c_wS, c_wS_flip], [w64, w64_flip], [c_w64, c_w64_flip] with S = ``scan_size``.
    * DIS off (and no cross-scale): every block uses [wS, wS_flip, c_wS, c_wS_flip].
    * Official quirk, reproduced: in a cross-scale model, a group with ``depth < 6`` uses 32-windows
      instead: [w32, w32_flip], [c_w32, c_w32_flip], repeating. A cross-scale model always uses the
      DIS schedule, whatever ``dual_interleaved_scan`` says.
    """
    s = scan_size
    if cross_scale_scan and depth < SHALLOW_GROUP_DEPTH:
        cycle = [['w32', 'w32_flip'], ['c_w32', 'c_w32_flip']] * 2
    elif cross_scale_scan or dual_interleaved_scan:
        cycle = [[f'w{s}', f'w{s}_flip'], [f'c_w{s}', f'c_w{s}_flip'], ['w64', 'w64_flip'], ['c_w64', 'c_w64_flip']]
    else:
        return [f'w{s}', f'w{s}_flip', f'c_w{s}', f'c_w{s}_flip']
    return list(cycle[index % 4])


@registers(ARCH_REGISTRY)
class DISBlock(nn.Module):
    """Residual DIS block (official ``RLMBlock``). (B, C, H, W) -> (B, C, H, W); see :meth:`forward_nhwc`.

    Args:
        dim: channels C. directions: scan directions of the SS2D mixer (e.g. ``['w8', 'w8_flip']``).
        d_state: SSM state size. mlp_ratio: MLP hidden size / dim. drop_path: stochastic depth rate.
        compress_ratio, squeeze_factor: of the CAB branch (official: 24 and 24; needs dim >= both).
    """

    def __init__(self, dim: int, directions: Sequence[str] = ('w8', 'w8_flip'), d_state: int = 16,
                 mlp_ratio: float = 2., drop_path: float = 0., norm_layer=nn.LayerNorm, compress_ratio: int = 24,
                 squeeze_factor: int = 24) -> None:
        super().__init__()
        if dim < compress_ratio or dim < squeeze_factor:
            raise ValueError(f'DISBlock: dim={dim} is too small for the CAB branch (compress_ratio={compress_ratio}, '
                             f'squeeze_factor={squeeze_factor}); use dim >= {max(compress_ratio, squeeze_factor)} '
                             f'or smaller ratios')
        self.dim = dim
        self.ln_1 = norm_layer(dim)
        self.self_attention = SS2D(dim, directions, d_state=d_state)
        self.skip_scale = nn.Parameter(torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.conv_block = CAB(dim, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor)
        self.ln_2 = nn.LayerNorm(dim)
        self.skip_scale2 = nn.Parameter(torch.ones(dim))
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=0.)

    @property
    def directions(self) -> Tuple[str, ...]:
        return self.self_attention.directions

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        h = self.ln_1(x)
        # a channels-last view: the convolutions run in that memory format, no transposing copies
        conv_x = self.conv_block(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if torch.is_grad_enabled() or self.training:
            # fused products and sums: fewer passes over (B, H, W, C) in forward and backward
            x = torch.addcmul(self.drop_path(self.self_attention(h)), x, self.skip_scale).add_(conv_x, alpha=0.01)
            return torch.addcmul(self.drop_path(self.mlp(self.ln_2(x))), x, self.skip_scale2)
        # inference (drop_path is the identity): accumulate into the fresh branch outputs in place
        x = self.self_attention(h).addcmul_(x, self.skip_scale).add_(conv_x, alpha=0.01)
        return self.mlp(self.ln_2(x)).addcmul_(x, self.skip_scale2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.forward_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


@registers(ARCH_REGISTRY)
class CrossScaleBlock(SS2D):
    """Cross-scale fusion block (official ``Cross_SS2D``). (B, C, H, W), (B, C, h, w) -> (B, C, H, W).

    ``x_down`` is the half-resolution branch: h = H / 2 (H even) or ceil(H / 2). It is an SS2D with
    ``cross_scale=True`` (flat parameter names, as in official checkpoints) plus ``ln_1``, ``ln_2``,
    ``skip_scale``, ``skip_scale2`` and an MLP of ``mlp_ratio * dim`` (official: 4, d_state 16).
    """

    def __init__(self, dim: int, directions: Sequence[str] = ('w16', 'w16_flip', 'c_w16', 'c_w16_flip'),
                 d_state: int = 16, mlp_ratio: float = 4.) -> None:
        super().__init__(dim, directions, d_state=d_state, cross_scale=True)
        self.dim = dim
        self.ln_1 = nn.LayerNorm(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=0.)
        self.skip_scale = nn.Parameter(torch.ones(dim))
        self.skip_scale2 = nn.Parameter(torch.ones(dim))

    def forward_nhwc(self, x: torch.Tensor, x_down: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C), (B, h, w, C) -> (B, H, W, C)."""
        out = torch.addcmul(self.mix(self.ln_1(x), x_down), x, self.skip_scale)
        return torch.addcmul(self.mlp(self.ln_2(out)), out, self.skip_scale2)

    def forward(self, x: torch.Tensor, x_down: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, C, H, W), (B, C, h, w) -> (B, C, H, W)."""
        out = self.forward_nhwc(x.permute(0, 2, 3, 1), x_down.permute(0, 2, 3, 1))
        return out.permute(0, 3, 1, 2).contiguous()


class DISLayer(nn.Module):
    """A stack of :class:`DISBlock` following :func:`dis_directions` (official ``BasicLayer``).

    (B, H, W, C) -> (B, H, W, C). ``use_checkpoint`` recomputes each block in backward
    (``torch.utils.checkpoint``, non-reentrant) to save activation memory.
    """

    def __init__(self, dim: int, depth: int, d_state: int = 16, mlp_ratio: float = 2.,
                 drop_path: Union[float, Sequence[float]] = 0., norm_layer=nn.LayerNorm, use_checkpoint: bool = False,
                 dual_interleaved_scan: bool = False, cross_scale_scan: bool = False, scan_size: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            DISBlock(dim, dis_directions(i, depth, scan_size, dual_interleaved_scan, cross_scale_scan),
                     d_state=d_state, mlp_ratio=mlp_ratio, drop_path=rates[i], norm_layer=norm_layer)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch_checkpoint.checkpoint(block.forward_nhwc, x, use_reentrant=False)
            else:
                x = block.forward_nhwc(x)
        return x

    def extra_repr(self) -> str:
        return f'dim={self.dim}, depth={self.depth}, use_checkpoint={self.use_checkpoint}'


class ResidualDISGroup(nn.Module):
    """Residual group (official ``ResidualLocalGroup``): DISLayer -> conv -> + input.

    Tokens (B, H*W, C) with ``x_size = (H, W)`` -> (B, H*W, C), as in the official interface.
    """

    def __init__(self, dim: int, depth: int, d_state: int = 16, mlp_ratio: float = 2.,
                 drop_path: Union[float, Sequence[float]] = 0., norm_layer=nn.LayerNorm, use_checkpoint: bool = False,
                 resi_connection: str = '1conv', dual_interleaved_scan: bool = False, cross_scale_scan: bool = False,
                 scan_size: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.residual_group = DISLayer(dim, depth, d_state=d_state, mlp_ratio=mlp_ratio, drop_path=drop_path,
                                       norm_layer=norm_layer, use_checkpoint=use_checkpoint,
                                       dual_interleaved_scan=dual_interleaved_scan, cross_scale_scan=cross_scale_scan,
                                       scan_size=scan_size)
        self.conv = make_resi_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        b, _, c = x.shape
        y = self.residual_group(x.reshape(b, x_size[0], x_size[1], c))
        y = self.conv(y.permute(0, 3, 1, 2))  # channels-last memory format in and out
        return y.flatten(2).transpose(1, 2) + x
