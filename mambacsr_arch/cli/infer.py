"""``basicsr infer``: super-resolve a folder (or one file) of compressed LR images; no ground truth needed.

Usage::

    basicsr infer -i LQ_DIR_OR_FILE -o OUT_DIR --opt options/test.yml
    basicsr infer -i LQ_DIR -o OUT_DIR --arch MambaCSR --weights net_g.pth \\
        --arch-opt embed_dim=180 'depths=[6,6,6,6,6,6]' --scale 4 [--tile 256 --tile-overlap 32]

The network comes from an option file (``network_g``, ``path.pretrain_network_g``,
``path.param_key_g``, ``path.strict_load_g``, ``scale``) or from ``--arch`` + ``--weights``;
``--network-opt JSON`` then ``--arch-opt key=value`` override constructor kwargs. Inference
settings (tiles, max_pixels, pad multiple, AMP, official protocol) come from ONE resolver,
:func:`mambacsr_arch.models.inference.resolve_inference_settings`, which ``MambaCSRModel``/
``HATModel.test`` use too, so ``basicsr infer --opt X`` restores images like ``basicsr test -opt X``:
``val.tile.{size,overlap}`` (blended tiles), HAT's top-level ``tile.{tile_size,tile_pad}`` (HAT's
hard-cropped tiles), top-level ``padding_size`` (the official MambaCSR chop test, unless
``val.official_protocol: false``), ``val.max_pixels``, ``val.pad_multiple``, ``val.use_amp``.
The ``run`` flags override the option file (``--tile``, ``--tile-overlap``, ``--tile-mode``,
``--max-pixels``, ``--pad-multiple``, ``--[no-]official-protocol``, ``--padding-size``,
``--fp16``/``--bf16``/``--fp32``). The input multiple is ``val.pad_multiple``, else the
network's ``pad_multiple`` attribute (:func:`mambacsr_arch.models.inference.arch_pad_multiple`).
Checkpoints are read by
:func:`mambacsr_arch.models.weights.load_weights` (``params``/``params_ema``/bare state dict,
``module.`` prefixes stripped).

Images are decoded like the datasets do (:func:`mambacsr_arch.data.image_io.read_image_bgr8`:
grayscale replicated, alpha dropped, 16-bit scaled to 8-bit), restored by
:func:`mambacsr_arch.models.inference.restore_image` (any size, optional overlapping tiles) and
written as 8-bit images (values exactly as BasicSR's ``tensor2img``) of exactly ``scale`` x the
input size, named ``<stem><suffix>.<ext>``, atomically (hidden temporary file, then rename).
Existing outputs are skipped unless ``--overwrite``; an output never replaces its input.

Exit codes: 0 every image written or skipped; 1 at least one image failed (each failure is
reported, the others are still processed); 2 configuration error (nothing processed).
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

EXIT_OK, EXIT_FAILED_IMAGES, EXIT_CONFIG = 0, 1, 2
OUTPUT_EXTENSIONS = ('png', 'jpg', 'jpeg', 'bmp', 'tif', 'tiff', 'webp')


class InferConfigError(Exception):
    """A configuration problem the user must fix (bad option file, weights, device, flags)."""


@dataclass
class InferSetup:
    """Everything resolved from the option file and flags before the first image is read."""
    network_opt: Dict[str, Any]
    weights: str
    param_key: Optional[str]
    strict: bool
    scale: int
    settings: Any  # mambacsr_arch.models.inference.InferenceSettings: tiles, pad multiple, AMP, official protocol
    notes: List[str] = field(default_factory=list)  # lines to show once, e.g. the official protocol in use


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``basicsr infer``'s flags on ``parser``."""
    io = parser.add_argument_group('input / output')
    io.add_argument('-i', '--input', required=True, help='an image file or a folder of images (not recursive)')
    io.add_argument('-o', '--output', required=True, help='output folder (created)')
    io.add_argument('--suffix', default='', help="appended to each output's stem, e.g. _x4 (default: none)")
    io.add_argument('--ext', default='png', choices=OUTPUT_EXTENSIONS, help='output format (default: png)')
    io.add_argument('--overwrite', action='store_true', help='redo images whose output already exists')
    net = parser.add_argument_group('network')
    net.add_argument('--opt', help='BasicSR option file (network_g, path.pretrain_network_g, scale, tile)')
    net.add_argument('--arch', help='registered arch name, e.g. MambaCSR or HAT (overrides network_g.type)')
    net.add_argument('--weights', help='checkpoint .pth (overrides path.pretrain_network_g)')
    net.add_argument('--param-key', help="checkpoint entry: params, params_ema (falls back to params) or none "
                     "for a bare state dict (default: path.param_key_g, else params with --opt as BasicSR, "
                     "params_ema without)")
    net.add_argument('--network-opt', help='JSON object of constructor kwargs, e.g. \'{"embed_dim": 60}\'')
    net.add_argument('--arch-opt', nargs='+', default=[], metavar='KEY=VALUE',
                     help='constructor kwargs; values parsed as YAML: embed_dim=60 "depths=[6,6]"')
    net.add_argument('--no-strict', action='store_true', help='load matching weights only (strict_load_g: false)')
    run_ = parser.add_argument_group('run')
    run_.add_argument('--scale', type=int, help='upscaling factor (default: option file scale, else upscale kwarg)')
    run_.add_argument('--tile', type=int, help='LR tile size in px; 0 = never tile (default: val.tile.size or the '
                      'top-level tile.tile_size, else whole images up to 512x512 LR px and 256 px tiles above). '
                      'MambaCSR: use a multiple of 64 (its 64-px scan windows are zero-padded)')
    run_.add_argument('--tile-overlap', type=int, help='blended tiles: minimum overlap; hat tiles: tile_pad; LR px '
                      '(default: the option file, else 32)')
    run_.add_argument('--tile-mode', choices=('auto', 'blend', 'hat', 'none'),
                      help="blend: our blended tiles (val.tile); hat: XPixelGroup/HAT's hard-cropped tiles (top-level "
                      'tile); auto: whole image up to --max-pixels, blended tiles above; none: never tile')
    run_.add_argument('--max-pixels', type=int, help='auto mode: tile images with more LR px than this; 0 = never '
                      '(default: val.max_pixels, else 262144)')
    run_.add_argument('--pad-multiple', type=int, help="pad inputs to this multiple (default: val.pad_multiple, else "
                      "the network's pad_multiple)")
    run_.add_argument('--official-protocol', action=argparse.BooleanOptionalAction, default=None,
                      help="renyulin-f/MambaCSR's chop test (default: on iff the option file sets padding_size, "
                      'unless val.official_protocol says otherwise)')
    run_.add_argument('--padding-size', type=int, help='official protocol pad multiple; turns the protocol on, as '
                      'the top-level padding_size key does (default: the option file, else 64)')
    run_.add_argument('--device', default='auto', help='cpu, cuda, cuda:N or auto (cuda if available; default)')
    precision = run_.add_mutually_exclusive_group()
    precision.add_argument('--fp16', action='store_true', help='float16 autocast')
    precision.add_argument('--bf16', action='store_true', help='bfloat16 autocast')
    precision.add_argument('--fp32', action='store_true', help='no autocast, whatever val.use_amp says')
    run_.add_argument('--no-progress', action='store_true', help='no progress bar')


# ----------------------------------------------------------------------------- configuration


def _load_option_file(path: str) -> Dict[str, Any]:
    import yaml
    from basicsr.utils.options import ordered_yaml

    if not osp.isfile(path):
        raise InferConfigError(f"option file '{path}' does not exist (--opt).")
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except yaml.YAMLError as err:
        raise InferConfigError(f"option file '{path}' is not valid YAML: {err}") from err
    if not isinstance(opt, Mapping):
        raise InferConfigError(f"option file '{path}' must be a YAML mapping with a network_g section.")
    return dict(opt)


def _parse_arch_opts(items: Sequence[str]) -> Dict[str, Any]:
    import yaml

    kwargs = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise InferConfigError(f"--arch-opt '{item}' is not KEY=VALUE (e.g. embed_dim=60).")
        try:
            kwargs[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise InferConfigError(f"--arch-opt '{item}': value is not valid YAML ({err}).") from err
    return kwargs


def resolve_setup(args: argparse.Namespace) -> InferSetup:
    """Merge option file and flags into an :class:`InferSetup`; raises :class:`InferConfigError`."""
    opt: Dict[str, Any] = _load_option_file(args.opt) if args.opt else {}
    source = f"option file '{args.opt}'" if args.opt else 'the command line'
    network_opt = dict(opt.get('network_g') or {})
    if args.network_opt:
        try:
            extra = json.loads(args.network_opt)
        except json.JSONDecodeError as err:
            raise InferConfigError(f'--network-opt is not valid JSON ({err}).') from err
        if not isinstance(extra, dict):
            raise InferConfigError('--network-opt must be a JSON object, e.g. \'{"embed_dim": 60}\'.')
        network_opt.update(extra)
    network_opt.update(_parse_arch_opts(args.arch_opt))
    if args.arch:
        network_opt['type'] = args.arch
    if not network_opt.get('type'):
        raise InferConfigError(f'no network: {source} has no network_g.type; pass --opt test.yml or --arch NAME.')

    path_opt = opt.get('path') or {}
    weights = args.weights or path_opt.get('pretrain_network_g')
    if not weights:
        raise InferConfigError(f'no weights: pass --weights X.pth or set path.pretrain_network_g in {source}.')
    # with an option file, BasicSR's default ('params', as `basicsr test` loads); bare --weights: the EMA
    # weights of released checkpoints, falling back to 'params'
    default_key = 'params' if args.opt else 'params_ema'
    param_key = args.param_key if args.param_key is not None else path_opt.get('param_key_g', default_key)
    strict = not args.no_strict and bool(path_opt.get('strict_load_g', True))

    if args.scale is not None:
        scale, scale_from = args.scale, '--scale'
    elif opt.get('scale') is not None:
        scale, scale_from = opt['scale'], f'scale in {source}'
    else:
        scale, scale_from = network_opt.get('upscale') or network_opt.get('scale'), 'network_g.upscale'
    if scale is None:
        raise InferConfigError(f'cannot tell the upscaling factor: pass --scale N or set scale in {source}.')
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise InferConfigError(f'{scale_from} must be an integer >= 1 (got {scale!r}), e.g. --scale 4.')

    from mambacsr_arch.models.inference import resolve_inference_settings

    amp = 'fp16' if args.fp16 else 'bf16' if args.bf16 else 'fp32' if args.fp32 else None
    try:
        settings = resolve_inference_settings(
            opt, source=source, tile_size=args.tile, tile_overlap=args.tile_overlap, tile_mode=args.tile_mode,
            max_pixels=args.max_pixels, pad_multiple=args.pad_multiple, amp=amp,
            official_protocol=args.official_protocol, padding_size=args.padding_size)
    except ValueError as err:
        raise InferConfigError(str(err)) from err
    return InferSetup(network_opt=network_opt, weights=str(weights), param_key=param_key, strict=strict,
                      scale=int(scale), settings=settings, notes=list(settings.notes))


def restore_kwargs(setup: InferSetup, net: Any) -> Dict[str, Any]:
    """Keyword arguments of :func:`restore_image` for ``setup`` and the built (bare) ``net``."""
    return setup.settings.restore_kwargs(net)


def resolve_device(name: str):
    """``torch.device`` for ``--device``; a CUDA request without CUDA raises :class:`InferConfigError`."""
    import torch

    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InferConfigError(f"--device '{name}' is not a device (use cpu, cuda, cuda:N or auto).") from err
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            fix = ('no GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES' if torch.version.cuda else
                   'this torch is a CPU-only build: install a CUDA build of torch')
            raise InferConfigError(f'--device {name}: CUDA is not available (torch {torch.__version__}); {fix}, '
                                   'or use --device cpu.')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InferConfigError(f'--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible.')
    elif device.type != 'cpu':
        raise InferConfigError(f"--device '{name}': only cpu and cuda are supported.")
    return device


def build_model(setup: InferSetup, device) -> Any:
    """Build ``network_g``, load the weights, move to ``device``, eval mode."""
    from basicsr.archs import build_network

    from mambacsr_arch.cli.option_checks import OptionError, check_network, print_notes
    from mambacsr_arch.models.weights import load_weights

    arch = setup.network_opt['type']
    try:  # registered arch, every key a constructor option, upscale == scale: before anything is built
        print_notes('infer', check_network(setup.network_opt, 'network_g', scale=setup.scale,
                                           scale_label='scale (--scale or the option file)'))
    except OptionError as err:
        raise InferConfigError(str(err)) from err
    try:
        net = build_network(setup.network_opt)
    except (TypeError, ValueError) as err:  # wrong or inconsistent constructor kwargs
        raise InferConfigError(f"cannot build {arch} with {dict(setup.network_opt)}: {err}. Fix network_g / "
                               '--arch-opt / --network-opt.') from err
    try:
        load_weights(net, setup.weights, param_key=setup.param_key, strict=setup.strict)
    except (FileNotFoundError, KeyError, RuntimeError) as err:
        raise InferConfigError(str(err.args[0]) if err.args else str(err)) from err
    return net.to(device).eval()


# ----------------------------------------------------------------------------- per image


def list_inputs(path: str) -> List[str]:
    """The image files to process: ``path`` itself, or the images directly inside it (sorted)."""
    from mambacsr_arch.data.image_io import list_image_files

    if osp.isfile(path):
        return [path]
    if osp.isdir(path):
        return list_image_files(path)
    raise InferConfigError(f"input '{path}' does not exist (-i/--input).")


def output_path(input_path: str, out_dir: str, suffix: str, ext: str) -> str:
    """``out_dir/<input stem><suffix>.<ext>``."""
    stem = osp.splitext(osp.basename(input_path))[0]
    return osp.join(out_dir, f'{stem}{suffix}.{ext}')


def write_image_atomic(img, path: str) -> None:
    """Encode uint8 BGR ``img`` by ``path``'s extension into a hidden temp file, then rename over ``path``."""
    import cv2

    ext = osp.splitext(path)[1]
    ok, encoded = cv2.imencode(ext, img)
    if not ok:
        raise OSError(f"cannot encode the result as '{ext}' for {path}")
    tmp = osp.join(osp.dirname(path), f'.{osp.basename(path)}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(encoded.data)  # no extra copy of a large image
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def tensor_to_bgr8(out: Any) -> Any:
    """(1, 3, H, W) float RGB in [0, 1] -> uint8 BGR (H, W, 3), consuming ``out`` (changed in place).

    Same values as ``basicsr.utils.tensor2img(out, rgb2bgr=True, min_max=(0, 1))`` (clamp, x255,
    round half to even), computed in place: tensor2img holds several float copies of the image,
    which for a 2048x2048 LR input at x4 is gigabytes.
    """
    import numpy as np
    import torch

    rgb = out[0].detach().float().cpu().clamp_(0, 1).mul_(255.0).round_()
    return np.ascontiguousarray(rgb.to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1])


def restore_file(net, path: str, setup: InferSetup, device) -> Any:
    """Read ``path`` (any layout), restore it; returns uint8 BGR (h*scale, w*scale, 3)."""
    import numpy as np
    import torch
    from basicsr.utils import img2tensor

    from mambacsr_arch.data.image_io import read_image_bgr8
    from mambacsr_arch.models.inference import restore_image

    img = read_image_bgr8(path)
    lq = img2tensor(img.astype(np.float32) / 255.0, bgr2rgb=True, float32=True).unsqueeze(0).to(device)
    out = restore_image(net, lq, setup.scale, **restore_kwargs(setup, net))
    del lq
    result = tensor_to_bgr8(out)
    expected = (img.shape[0] * setup.scale, img.shape[1] * setup.scale)
    if result.shape[:2] != expected:
        raise ValueError(f'{path}: output is {result.shape[:2]}, expected {expected} (scale {setup.scale}).')
    del out
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- command


def _error(message: str) -> int:
    print(f'basicsr infer: error: {message}', file=sys.stderr)
    return EXIT_CONFIG


def run(args: argparse.Namespace) -> int:
    """Run ``basicsr infer``; returns the exit code (see module doc)."""
    from mambacsr_arch.cli.runtime import load_plugins

    load_plugins()
    from tqdm import tqdm

    from mambacsr_arch.data.image_io import ImageReadError

    try:
        setup = resolve_setup(args)
        device = resolve_device(args.device)
        inputs = list_inputs(args.input)
        if not inputs:
            raise InferConfigError(f"no images in '{args.input}' (extensions: png, jpg, bmp, tif, webp, ...).")
        net = build_model(setup, device)
        os.makedirs(args.output, exist_ok=True)
    except InferConfigError as err:
        return _error(str(err))
    except OSError as err:
        return _error(f"cannot create the output folder '{args.output}' (-o): {err}")

    written, skipped, failed = 0, 0, []  # failed: one message per image, naming the file
    claimed: Dict[str, str] = {}  # output path -> the input that writes it
    start = time.perf_counter()
    bar = tqdm(inputs, unit='img', desc='infer', file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    for path in bar:
        out_path = output_path(path, args.output, args.suffix, args.ext)
        message = None
        if out_path in claimed:
            message = f'{path}: same output name as {claimed[out_path]} ({out_path}); rename one of them'
        elif osp.realpath(out_path) == osp.realpath(path):
            message = f'{path}: the output would replace this input; use --suffix, --ext or another -o folder'
        elif osp.exists(out_path) and not args.overwrite:
            claimed[out_path] = path
            skipped += 1
            continue
        else:
            claimed[out_path] = path
            try:
                write_image_atomic(restore_file(net, path, setup, device), out_path)
                written += 1
            except ImageReadError as err:  # corrupt / unsupported file: this image only
                message = str(err)
            except ValueError as err:  # scale / network mismatch: the same for every image
                bar.close()
                return _error(str(err))
            except (OSError, RuntimeError) as err:  # write error, out of memory: this image only
                hint = ' (try a smaller --tile)' if 'out of memory' in str(err).lower() else ''
                message = f'{path}: {type(err).__name__}: {err}{hint}'
        if message is not None:
            failed.append(message)
            bar.write(f'FAILED {message}', file=sys.stderr)
    bar.close()
    elapsed = time.perf_counter() - start
    rate = written / elapsed if elapsed > 0 else 0.0
    print(f'basicsr infer: {written} written to {args.output}, {skipped} skipped (output exists; --overwrite to redo), '
          f'{len(failed)} failed; {rate:.2f} images/s on {device}.')
    for message in failed:
        print(f'  failed: {message}', file=sys.stderr)
    return EXIT_FAILED_IMAGES if failed else EXIT_OK
