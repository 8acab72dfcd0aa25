"""``basicsr export``: a checkpoint as a verified ONNX model (or as plain ``.safetensors`` weights).

Usage::

    basicsr export --weights net_g.pth -o model.onnx --size 64 64 [--dynamic] [--opset 18]
    basicsr export --weights net_g.pth --opt options/test_mambacsr_x4.yml -o model.onnx --size 128 96
    basicsr export --weights net_g.pth -o net_g.safetensors        # weights only, no ONNX

The network and weights come from the one resolver :func:`mambacsr_arch.cli.common.resolve_network`
(as ``basicsr infer``; printed once): ``network_g`` of ``--opt``, else the ``network_g`` stored in a
``.safetensors`` this project wrote, else detected from the weights; ``--arch-opt KEY=VALUE``
overrides any of them. The entry loaded follows the one rule of :mod:`mambacsr_arch.models.weights`
(``path.param_key_g``, else ``params``, with ``--opt``; ``params_ema`` then ``params`` without);
the weights are loaded strictly. A ``.safetensors`` output records in its metadata the entry it
holds, the ``network_g`` that rebuilds it exactly, and where the source's other entries are; it
is written with normal file permissions. ``--size``/``--dynamic``/``--opset``/``--tolerance`` with
a ``.safetensors`` output are refused (they only apply to ONNX).

ONNX: traced with torch's ``torch.export``-based exporter (needs the ``[export]`` extra: onnx,
onnxscript, onnxruntime) for a (1, in_chans, H, W) input, H x W = ``--size``. MambaCSR's
selective scan is exported as plain ONNX operators: the ``export`` backend
(:mod:`mambacsr_arch.ops.export_scan`, chosen with ``use_backend('export')`` while tracing), a graph
of fixed size whatever H x W. The exported model is then run with onnxruntime (CPU) on a random
input and compared with PyTorch: the command prints the max abs difference and fails (exit 1,
nothing written) above ``--tolerance`` (default 1e-3). The ``.onnx`` is written atomically and
self-contained (no external-data file; models under 2 GB).

``--dynamic`` makes batch, height and width symbolic: any size from :func:`dynamic_minimum` up
(HAT: window_size; MambaCSR: 2, with ``cross_scale_scan`` 3), odd sizes included; it is verified
at 4 inputs (the traced ``--size``, default an odd size, and others: odd, non-window multiples,
batch 1-3).

Exit codes: 0 exported and verified; 1 verification failed; 2 configuration error.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import re
import sys
import time
import warnings
from typing import Any, Dict, List, Tuple

from mambacsr_arch.errors import ConfigError

EXIT_OK, EXIT_MISMATCH = 0, 1
DEFAULT_OPSET = 18
DEFAULT_TOLERANCE = 1e-3
MAX_SIZE = 4096  # --size per side: a traced LR of 4096 x 4096 already takes tens of GiB at x4


class ExportConfigError(ConfigError):
    """A problem the user must fix (flags, option file, weights, missing packages)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``basicsr export``'s flags on ``parser``."""
    parser.add_argument('--weights', required=True, help='checkpoint: .pth or .safetensors')
    parser.add_argument('-o', '--output', required=True, help='model.onnx, or X.safetensors for the weights only')
    parser.add_argument('--opt', help='option file whose network_g builds the network (default: detect from weights)')
    parser.add_argument('--arch-opt', nargs='+', default=[], metavar='KEY=VALUE',
                        help='network_g overrides; values parsed as YAML: scan_size=16 "depths=[6,6]"')
    parser.add_argument('--param-key', help='checkpoint entry (default, as every command: path.param_key_g, else '
                        'params, with --opt; params_ema, falling back to params, without)')
    parser.add_argument('--size', nargs=2, type=int, metavar=('H', 'W'),
                        help='LR input height and width of a fixed-size ONNX model (the traced size with --dynamic)')
    parser.add_argument('--dynamic', action='store_true', help='symbolic batch, height and width (any size from '
                        'the minimum up; verified with onnxruntime at 4 sizes); --size is then the traced size')
    parser.add_argument('--opset', type=int, help=f'ONNX opset (default {DEFAULT_OPSET})')
    parser.add_argument('--tolerance', type=float,
                        help=f'max abs difference onnxruntime vs PyTorch (default {DEFAULT_TOLERANCE:g})')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random check input (default 0)')


# ----------------------------------------------------------------------------- network


def resolve_network(args: argparse.Namespace) -> Any:
    """The network and weights of ``--weights``/``--opt``/``--arch-opt``: the one resolver
    (:func:`mambacsr_arch.cli.common.resolve_network`, as ``basicsr infer``), loaded strictly."""
    from mambacsr_arch.cli.common import load_option_file, parse_arch_opts
    from mambacsr_arch.cli.common import resolve_network as resolve

    opt = load_option_file(args.opt) if args.opt else None
    return resolve(args.weights, opt=opt, opt_path=args.opt, param_key=args.param_key,
                   overrides=parse_arch_opts(args.arch_opt), strict=True)


def build_network_from(resolved: Any) -> Any:
    """The resolved network with its weights loaded strictly, in eval mode, on the CPU."""
    from mambacsr_arch.cli.common import build_and_load

    return build_and_load(resolved).eval()


# ----------------------------------------------------------------------------- ONNX


def _require_export_packages() -> None:
    missing = []
    for name in ('onnx', 'onnxscript', 'onnxruntime'):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportConfigError(f"ONNX export needs {', '.join(missing)}: pip install 'mambacsr-arch[export]' "
                                f"(or pip install {' '.join(missing)}).")


def dynamic_minimum(net: Any) -> int:
    """Smallest height/width a ``--dynamic`` model accepts: the input multiple the network pads to
    (HAT: window_size, whose reflect padding needs pad < size; MambaCSR: 2), at least 2; 3 for a
    cross-scale MambaCSR (its half-resolution map must be >= 2 px for the traced convolutions)."""
    if getattr(net, 'cross_scale_scan', False):
        return 3
    return max(2, int(getattr(net, 'pad_multiple', 1)))


def dynamic_check_shapes(net: Any, size: Tuple[int, int], in_chans: int) -> List[Tuple[int, ...]]:
    """Inputs a ``--dynamic`` model is verified at besides the traced one: batch 3 at the minimum size,
    batch 2 at an odd, non-square size that is no window multiple, and batch 1 at a larger odd one."""
    low = dynamic_minimum(net)
    odd = low + 1 if low % 2 == 0 else low + 2
    return [(3, in_chans, low, low), (2, in_chans, odd, low + 3), (1, in_chans, size[0] + 7, size[1] + 2 * low + 1)]


def export_onnx(net: Any, path: str, size: Tuple[int, int], dynamic: bool, opset: int) -> None:
    """Export ``net`` to ``path`` (self-contained .onnx), traced at a (1, C, H, W) input, ``size = (H, W)``;
    ``dynamic``: batch, height and width symbolic (traced at batch 2), height and width >= :func:`dynamic_minimum`.

    The selective scan runs on the ``export`` backend (:mod:`mambacsr_arch.ops.export_scan`: plain
    tensor ops, a graph of fixed size whatever H x W), chosen by the scoped ``use_backend('export')``.
    """
    import torch

    from mambacsr_arch.ops import use_backend

    in_chans = int(net.conv_first.weight.shape[1])
    # a dynamic size is traced at 2 (torch.export specialises a size-1 dimension to 1)
    example = torch.rand(2 if dynamic else 1, in_chans, *size)
    dynamic_shapes = None
    if dynamic:
        low = dynamic_minimum(net)
        dynamic_shapes = ({0: torch.export.Dim('batch', min=1, max=4096), 2: torch.export.Dim('height', min=low),
                           3: torch.export.Dim('width', min=low)}, )
    try:
        with torch.no_grad(), use_backend('export'), warnings.catch_warnings():
            # HAT caches its attention masks per size (eager only): a fixed-size trace stores one, harmlessly
            warnings.filterwarnings('ignore', message='.*was assigned during export', category=UserWarning)
            program = torch.onnx.export(net, (example, ), None, dynamo=True, opset_version=opset, verbose=False,
                                        input_names=['lq'], output_names=['sr'], dynamic_shapes=dynamic_shapes)
    except Exception as err:  # torch.export's errors are long; the first line says what failed
        first = re.sub(r'\x1b\[[0-9;]*m', '', str(err).strip().splitlines()[0] if str(err).strip() else '')
        fix = ' Export without --dynamic (a fixed --size) instead.' if dynamic else ''
        raise ExportConfigError(f'ONNX export failed: {type(err).__name__}: {first}{fix}') from err
    program.save(path, external_data=False)


def onnx_difference(net: Any, path: str, shape: Tuple[int, ...], seed: int) -> float:
    """Max abs difference between onnxruntime (CPU) and PyTorch for one random input of ``shape``."""
    import numpy as np
    import onnxruntime
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=generator)
    with torch.no_grad():
        expected = net(x).numpy()
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != expected.shape:
        return float('inf')
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())


def _check_output(args: argparse.Namespace) -> str:
    out = args.output
    ext = osp.splitext(out)[1].lower()
    for flag, other in (('--weights', args.weights), ('--opt', args.opt)):
        if other and osp.exists(out) and osp.exists(other) and osp.samefile(out, other):
            raise ExportConfigError(f"-o '{out}' is the {flag} file; choose another output name.")
    if ext not in ('.onnx', '.safetensors'):
        raise ExportConfigError(f"-o '{out}': name a .onnx model or .safetensors weights file.")
    if osp.isdir(out):
        raise ExportConfigError(f"-o '{out}' is a folder; name a file.")
    parent = osp.dirname(osp.abspath(out))
    if not osp.isdir(parent):
        raise ExportConfigError(f"-o '{out}': folder '{parent}' does not exist.")
    given = (('--size', args.size is not None), ('--dynamic', args.dynamic), ('--opset', args.opset is not None),
             ('--tolerance', args.tolerance is not None))
    onnx_only = [flag for flag, present in given if present]
    if ext == '.safetensors' and onnx_only:
        verb = 'is an option' if len(onnx_only) == 1 else 'are options'
        raise ExportConfigError(f"{', '.join(onnx_only)} {verb} of ONNX export only; -o '{out}' writes the weights "
                                'only (.safetensors): drop them, or name a .onnx output.')
    if ext == '.onnx':
        args.opset = DEFAULT_OPSET if args.opset is None else args.opset
        args.tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
        if args.size is None and not args.dynamic:
            raise ExportConfigError('ONNX export needs the input size: --size H W (LR pixels), e.g. --size 64 64, '
                                    'or --dynamic (any size).')
        if args.size is not None and min(args.size) < 2:
            raise ExportConfigError(f'--size {args.size[0]} {args.size[1]}: height and width must be >= 2.')
        if args.size is not None and max(args.size) > MAX_SIZE:
            raise ExportConfigError(f'--size {args.size[0]} {args.size[1]}: at most {MAX_SIZE} per side (the model is '
                                    'traced and checked at this size); --dynamic exports one model for any size.')
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not 18 <= args.opset <= newest:
            raise ExportConfigError(f'--opset {args.opset}: the exporter needs an opset from 18 to {newest} (the '
                                    f'newest this onnx {onnx.__version__} knows); the default is {DEFAULT_OPSET}.')
        if not 0 < args.tolerance < float('inf'):
            raise ExportConfigError(f'--tolerance must be a finite number > 0, got {args.tolerance}.')
    return ext


def _temporary(path: str) -> str:
    from mambacsr_arch.fileio import temp_path_for

    return temp_path_for(path)  # written, checked with onnxruntime, then renamed over the output


def _prepare(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any], str]:
    """Check the request, resolve and build the network: ``(net, network_g options, output extension)``."""
    ext = _check_output(args)
    if ext == '.onnx':
        _require_export_packages()
    resolved = resolve_network(args)
    for line in resolved.summary or [f"network_g of '{args.opt}'"]:
        print(f'basicsr export: {line}')
    args.resolved = resolved  # the entry loaded and the source's entries: recorded in a .safetensors' metadata
    return build_network_from(resolved), resolved.network_opt, ext


def run(args: argparse.Namespace) -> int:
    """Run ``basicsr export``; returns the exit code (see module doc)."""
    from mambacsr_arch.cli.runtime import load_plugins

    load_plugins()
    # configuration errors (ConfigError) propagate to mambacsr_arch.cli.main: one line, exit 2, nothing written
    net, network_opt, ext = _prepare(args)
    from mambacsr_arch.fileio import remove_stale_temp_files

    # a killed export's temporaries of this output (MBs each); another export still running keeps its own
    remove_stale_temp_files(osp.dirname(osp.abspath(args.output)), targets=osp.basename(args.output).__eq__)
    if ext == '.onnx':
        return _export_and_verify(net, args)
    from mambacsr_arch.models.weights import project_metadata, save_safetensors

    resolved = args.resolved
    key = resolved.key_used or 'none'
    entries = dict(resolved.entries, **{key: osp.basename(args.output)})
    save_safetensors(net.state_dict(), args.output, metadata=project_metadata(key, network_opt, entries))
    print(f"basicsr export: wrote {args.output} ({len(net.state_dict())} tensors of '{key}', network_g in its "
          'metadata).')
    return EXIT_OK


def _export_and_verify(net: Any, args: argparse.Namespace) -> int:
    in_chans = int(net.conv_first.weight.shape[1])
    if args.size is None:  # --dynamic without --size: traced at an odd, non-square size above the minimum
        low = dynamic_minimum(net)
        args.size = [2 * low + 3, 2 * low + 5]
    size = (int(args.size[0]), int(args.size[1]))
    if args.dynamic and min(size) < dynamic_minimum(net):
        raise ExportConfigError(f'--size {size[0]} {size[1]} with --dynamic: trace at height and width >= '
                                f'{dynamic_minimum(net)} (the smallest size the dynamic model accepts).')
    tmp = _temporary(args.output)
    try:
        start = time.perf_counter()
        export_onnx(net, tmp, size, args.dynamic, args.opset)
        exported = time.perf_counter() - start
        checks: List[Tuple[Tuple[int, ...], float]] = []
        shapes = [(1, in_chans) + size]
        if args.dynamic:  # other batches and sizes (odd, not window multiples): a size baked into the graph shows
            shapes = [(1, in_chans) + size] + dynamic_check_shapes(net, size, in_chans)
        for shape in shapes:
            try:
                checks.append((shape, onnx_difference(net, tmp, shape, args.seed)))
            except Exception as err:  # onnxruntime refusing the shape: a fixed size inside the graph
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                print(f'basicsr export: FAILED: onnxruntime cannot run the model at {shape}: {first}. Export '
                      'without --dynamic (a fixed --size).', file=sys.stderr)
                return EXIT_MISMATCH
        for shape, diff in checks:
            print(f'basicsr export: onnxruntime vs PyTorch at input {tuple(shape)}: max abs difference {diff:.3g} '
                  f'(tolerance {args.tolerance:g})')
        worst = max(diff for _, diff in checks)
        if not worst <= args.tolerance:
            print(f'basicsr export: FAILED: the exported model differs from PyTorch by {worst:.3g} > '
                  f'{args.tolerance:g}; nothing written.', file=sys.stderr)
            return EXIT_MISMATCH
        os.replace(tmp, args.output)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    kind = f"input (N, {in_chans}, H, W), H, W >= {dynamic_minimum(net)}" if args.dynamic else \
        f'input (1, {in_chans}, {size[0]}, {size[1]})'
    print(f'basicsr export: wrote {args.output} ({kind}, opset {args.opset}, exported in {exported:.0f} s).')
    return EXIT_OK
