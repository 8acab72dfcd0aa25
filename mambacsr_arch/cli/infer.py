"""``basicsr infer``: super-resolve a folder (or one file) of compressed LR images; no ground truth needed.

Usage::

    basicsr infer -i LQ_DIR_OR_FILE -o OUT_DIR --opt options/test.yml
    basicsr infer -i LQ_DIR -o OUT_DIR --weights Cross-scale-QF10-x4.pth   # arch + options detected
    basicsr infer -i LQ_DIR -o OUT_DIR --arch MambaCSR --weights net_g.pth \\
        --arch-opt embed_dim=180 'depths=[6,6,6,6,6,6]' --scale 4 [--tile 256 --tile-overlap 32]

The network comes from an option file (``network_g``, ``path.pretrain_network_g``,
``path.param_key_g``, ``path.strict_load_g``, ``scale``) or from ``--arch`` + ``--weights``;
``--network-opt JSON`` then ``--arch-opt key=value`` override constructor kwargs. With neither an
option file's ``network_g.type`` nor ``--arch``, the network is detected from the weights
(:func:`mambacsr_arch.archs.detect.detect_network`; printed once, ``--arch-opt`` overrides). Inference
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

Images are decoded like the datasets do (:func:`mambacsr_arch.data.image_io.read_image_with_layout`,
the same pixels as ``read_image_bgr8``), restored by
:func:`mambacsr_arch.models.inference.restore_image` (any size, optional overlapping tiles) and
written by the project's one image writer (:func:`mambacsr_arch.fileio.write_image_atomic`) as 8-bit
images (values exactly as BasicSR's ``tensor2img``) of exactly ``scale`` x the input size, named
``<stem><suffix>.<ext>``, atomically (hidden temporary file, then rename).

Image layouts (:func:`mambacsr_arch.cli.infer_outputs.network_input`), decided per case; every
conversion that changes what the file held is said once per run, as one ``note:`` line per kind
naming the count and the first files:

* 3-channel networks (the usual): gray files are replicated to RGB and written as 3-channel; alpha
  is dropped (not composited, as every BasicSR dataset reads it), outputs are opaque; 16-bit files
  are read as 8 bits (``round(v / 257)``, as the datasets) and written as 8-bit. The network only
  ever saw 8-bit RGB, so nothing more is kept than the training data had.
* 1-channel networks (``in_chans: 1``, taken from the network's first convolution): gray files are
  fed as one channel and written as 1-channel (gray) images; a colour file whose three channels are
  equal is fed as gray; any other colour file fails (that image only, exit 1) with a message to
  convert it first. No automatic BT.601 Y conversion: BasicSR's ``color: y`` datasets feed the
  studio-range Y of ``bgr2ycbcr``, a full-range gray file is not that, and guessing which one a
  network was trained on would be silently wrong half the time.

Existing outputs are skipped unless ``--overwrite``, with one exception: an output that the
manifest says infer wrote, whose bytes no longer have the recorded SHA-256 and which no longer
decodes as a whole image (a copy cut short, a full disk; an atomic write itself cannot be
truncated), is restored again, and the run says so once. One that still decodes was edited or
replaced on purpose: kept (said once). A file the manifest does not list is never touched without
``--overwrite``.

Output plan (:func:`plan_outputs`, before the model is built or anything is written): every input
is mapped to its output and the run is refused (exit 2, the message names both files and the fix:
``--suffix``, ``--ext`` or another ``-o``) if any output is, or resolves through links to, ANY
input file (``d/x.jpg`` -> ``d/x.png`` when ``d/x.png`` is an input too), if two inputs share one
output (``x.png`` and ``x.jpg``), or if an output name is a folder. ``--overwrite`` never lifts
this. Every image written is recorded (name, source, sha256) in ``.basicsr-infer.json`` in the
output folder, right after it is written; runs writing into one folder at once each re-read and merge
that manifest under a lock of the folder (:func:`mambacsr_arch.cli.infer_outputs.record_outputs`), so
no run's record is lost. When ``-i`` is that same folder, an image listed there whose bytes are unchanged is
infer's own earlier output and is not read as an input (so ``-i d -o d --suffix _x4`` run twice
does not make ``a_x4_x4.png``); the summary counts them. An image edited or replaced since, or
written by infer before the manifest existed, is the user's again and the conflict rules apply.
A single file named by ``-i`` is always processed. Folders are listed by the project's one
loop-safe walker: a symbolic-link loop with an image name is a configuration error naming it.

Exit codes: 0 every image written or skipped; 1 at least one image failed (each failure is
reported, the others are still processed); 2 configuration error (nothing processed); 130 interrupted
(Ctrl-C: the image in progress is not written; rerunning the same command continues).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from mambacsr_arch.cli import infer_outputs
from mambacsr_arch.cli.infer_outputs import (MANIFEST_NAME, LayoutNotes, OutputPlan, OutputPlanError,  # noqa: F401
                                             existing_output, output_path, read_manifest, record_outputs,
                                             write_manifest)
from mambacsr_arch.errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError
from mambacsr_arch.fileio import write_image_atomic

EXIT_OK, EXIT_FAILED_IMAGES = 0, 1
OUTPUT_EXTENSIONS = ('png', 'jpg', 'jpeg', 'bmp', 'tif', 'tiff', 'webp')


class InferConfigError(ConfigError):
    """A configuration problem the user must fix (bad option file, weights, device, flags): a
    :class:`~mambacsr_arch.errors.ConfigError`, printed once by :mod:`mambacsr_arch.cli.main` (exit 2)."""


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
    #: the network and weights, resolved once (common.resolve_network); None until build_model when the
    #: option file or --arch names the network (the checkpoint is then read there, once)
    resolved: Any = None
    request: Dict[str, Any] = field(default_factory=dict)  # resolve_network's arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``basicsr infer``'s flags on ``parser``."""
    io = parser.add_argument_group('input / output')
    io.add_argument('-i', '--input', required=True, help='an image file or a folder of images (not recursive)')
    io.add_argument('-o', '--output', required=True, help='output folder (created)')
    io.add_argument('--suffix', default='', help="appended to each output's stem, e.g. _x4 (default: none)")
    io.add_argument('--ext', default='png', choices=OUTPUT_EXTENSIONS, help='output format (default: png)')
    io.add_argument('--overwrite', action='store_true', help='redo images whose output already exists (an input '
                    'file is never replaced: such a plan is refused)')
    net = parser.add_argument_group('network')
    net.add_argument('--opt', help='BasicSR option file (network_g, path.pretrain_network_g, scale, tile)')
    net.add_argument('--arch', help='registered arch name, e.g. MambaCSR or HAT (overrides network_g.type)')
    net.add_argument('--weights', help='checkpoint .pth or .safetensors (overrides path.pretrain_network_g); with no '
                     '--opt/--arch, the arch (MambaCSR, HAT) and its options are detected from it')
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
                      'MambaCSR: any size costs no padding work (scan windows are clipped at tile borders); '
                      'multiples of 64 match the official whole-window scans')
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
    run_.add_argument('--self-ensemble', action=argparse.BooleanOptionalAction, default=None,
                      help='x8 self-ensemble: average the restores of the 8 flips/transposes of each image (the "+" '
                      'results of SR papers; 8x the time; composes with tiles and the official protocol; default: '
                      'val.self_ensemble, else off)')
    run_.add_argument('--device', default='auto', help='cpu, cuda, cuda:N or auto (cuda if available; default)')
    precision = run_.add_mutually_exclusive_group()
    precision.add_argument('--fp16', action='store_true', help='float16 autocast')
    precision.add_argument('--bf16', action='store_true', help='bfloat16 autocast')
    precision.add_argument('--fp32', action='store_true', help='no autocast, whatever val.use_amp says')
    run_.add_argument('--no-progress', action='store_true', help='no progress bar')


# ----------------------------------------------------------------------------- configuration


def resolve_setup(args: argparse.Namespace) -> InferSetup:
    """Merge option file and flags into an :class:`InferSetup`; raises :class:`ConfigError`.

    The network comes from :func:`mambacsr_arch.cli.common.resolve_network` (the one resolver
    ``basicsr export`` uses too): here when no ``network_g.type``/``--arch`` names it (metadata or
    detection decides, and the scale follows), else in :func:`build_model`.
    """
    from mambacsr_arch.cli.common import load_option_file, parse_arch_opts, parse_network_json, resolve_network

    opt: Dict[str, Any] = load_option_file(args.opt) if args.opt else {}
    source = f"option file '{args.opt}'" if args.opt else 'the command line'
    overrides = dict(parse_network_json(args.network_opt), **parse_arch_opts(args.arch_opt))
    network_opt = dict(opt.get('network_g') or {}, **overrides)
    if args.arch:
        network_opt['type'] = args.arch
    path_opt = opt.get('path') or {}
    weights = args.weights or path_opt.get('pretrain_network_g')
    if not weights:
        raise InferConfigError(f'no weights: pass --weights X.pth or set path.pretrain_network_g in {source}.')
    request = dict(weights=str(weights), opt=opt if args.opt else None, opt_path=args.opt, param_key=args.param_key,
                   arch=args.arch, overrides=overrides, strict=False if args.no_strict else None)
    resolved = None
    if not network_opt.get('type'):  # no network_g.type, no --arch: the metadata or the weights say
        resolved = resolve_network(**request)
        network_opt = resolved.network_opt

    if args.scale is not None:
        scale, scale_from = args.scale, '--scale'
    elif opt.get('scale') is not None:
        scale, scale_from = opt['scale'], f'scale in {source}'
    else:
        scale, scale_from = network_opt.get('upscale') or network_opt.get('scale'), 'network_g.upscale'
    if scale is None and resolved is None:  # --arch without upscale: the weights' upsampler shows it
        from mambacsr_arch.archs.state_dict_report import pixelshuffle_scale

        resolved = resolve_network(**request)  # also refuses weights of another arch than --arch
        scale, scale_from = pixelshuffle_scale(resolved.state), f"the upsampler of '{weights}'"
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
            official_protocol=args.official_protocol, padding_size=args.padding_size,
            self_ensemble=getattr(args, 'self_ensemble', None))
    except ValueError as err:
        raise InferConfigError(str(err)) from err
    from mambacsr_arch.models.weights import choose_param_key

    param_key = resolved.key_used if resolved else choose_param_key(args.param_key, path_opt, bool(args.opt))
    strict = resolved.strict if resolved else not args.no_strict and bool(path_opt.get('strict_load_g', True))
    return InferSetup(network_opt=network_opt, weights=str(weights), param_key=param_key, strict=strict,
                      scale=int(scale), settings=settings, notes=(resolved.summary if resolved else [])
                      + list(settings.notes), resolved=resolved, request=request)


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
    """Build ``network_g``, load the weights (read once), move to ``device``, eval mode."""
    from mambacsr_arch.cli.common import build_and_load, resolve_network
    from mambacsr_arch.cli.option_checks import check_network, print_notes

    resolved = setup.resolved
    if resolved is None:  # the option file / --arch named the network: the checkpoint is read now
        resolved = setup.resolved = resolve_network(**setup.request)
        setup.network_opt = resolved.network_opt
        setup.notes = list(resolved.summary) + list(setup.notes)
    # registered arch, every key a constructor option, upscale == scale: before anything is built
    print_notes('infer', check_network(setup.network_opt, 'network_g', scale=setup.scale,
                                       scale_label='scale (--scale or the option file)'))
    print_notes('infer', setup.notes)  # e.g. 'official MambaCSR test protocol: padding_size 64'
    net = build_and_load(resolved)
    return net.to(device).eval()


# ----------------------------------------------------------------------------- per image


def list_inputs(path: str) -> List[str]:
    """The image files to process: ``path`` itself, or the images directly inside it (sorted).

    Folders are listed by the project's one walker (:func:`mambacsr_arch.data.image_io.list_image_files`);
    a symbolic-link loop or broken link with an image name becomes :class:`InferConfigError` naming it.
    """
    from mambacsr_arch.data.image_io import ImageFolderError, list_image_files

    if osp.isfile(path):
        return [path]
    if osp.isdir(path):
        try:
            return list_image_files(path)
        except ImageFolderError as err:
            raise InferConfigError(f'cannot list the input folder (-i/--input): {err}') from err
    if osp.islink(path):
        raise InferConfigError(f"input '{path}' is a broken symbolic link or a symbolic-link loop (-i/--input).")
    raise InferConfigError(f"input '{path}' does not exist (-i/--input).")


def plan_outputs(inputs: Sequence[str], out_dir: str, suffix: str, ext: str,
                 input_folder: Optional[str] = None) -> OutputPlan:
    """:func:`mambacsr_arch.cli.infer_outputs.plan_outputs`; a refused plan raises :class:`InferConfigError`."""
    try:
        return infer_outputs.plan_outputs(inputs, out_dir, suffix, ext, input_folder)
    except OutputPlanError as err:
        raise InferConfigError(str(err)) from err


def tensor_to_bgr8(out: Any) -> Any:
    """(1, 3, H, W) float RGB in [0, 1] -> uint8 BGR (H, W, 3), consuming ``out`` (changed in place).

    A (1, 1, H, W) output (a 1-channel network) gives a uint8 gray (H, W). Same values as
    ``basicsr.utils.tensor2img(out, rgb2bgr=True, min_max=(0, 1))`` (clamp, x255, round half to
    even), computed in place: tensor2img holds several float copies of the image, which for a
    2048x2048 LR input at x4 is gigabytes.
    """
    import numpy as np
    import torch

    rgb = out[0].detach().float().cpu().clamp_(0, 1).mul_(255.0).round_()
    img = rgb.to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(img[:, :, 0] if img.shape[2] == 1 else img[:, :, ::-1])


def restore_file(net, path: str, setup: InferSetup, device, channels: int = 3,
                 notes: Optional[LayoutNotes] = None) -> Any:
    """Read ``path`` (any layout), restore it; returns uint8 BGR (h*scale, w*scale, 3), or gray (h*scale, w*scale)
    for a 1-channel network.

    ``channels``: what ``net`` takes (:func:`mambacsr_arch.cli.infer_outputs.network_channels`); how each
    layout is fed is :func:`mambacsr_arch.cli.infer_outputs.network_input` (module doc, "Image layouts"),
    the conversions are counted in ``notes``.
    """
    import torch

    from mambacsr_arch.data.image_io import read_image_with_layout
    from mambacsr_arch.models.inference import restore_image

    img, layout = read_image_with_layout(path)
    img = infer_outputs.network_input(img, layout, channels, path, notes if notes is not None else LayoutNotes())
    chw = torch.from_numpy(img.transpose(2, 0, 1)[::-1].copy() if channels == 3 else img.transpose(2, 0, 1).copy())
    lq = chw.float().div_(255.0).unsqueeze(0).to(device)  # RGB (or gray) in [0, 1], as basicsr's img2tensor
    out = restore_image(net, lq, setup.scale, **restore_kwargs(setup, net))
    del lq
    if out.shape[1] != channels:
        raise ValueError(f'{path}: the network returned {out.shape[1]} channel(s) for a {channels}-channel input; '
                         'basicsr infer writes networks whose output has as many channels as their input.')
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
    from mambacsr_arch.data.pairing import listing

    # configuration errors (ConfigError) propagate to mambacsr_arch.cli.main: one line, exit 2, nothing written
    setup = resolve_setup(args)
    device = resolve_device(args.device)
    inputs = list_inputs(args.input)
    input_folder = args.input if osp.isdir(args.input) else None
    if '..' in args.output.replace(os.sep, '/').split('/'):  # 'missing/..' would make 'missing', then leave it
        args.output = osp.realpath(args.output)
    plan = plan_outputs(inputs, args.output, args.suffix, args.ext, input_folder)
    if not plan.pairs:
        earlier = (f' ({len(plan.previous_outputs)} there were written by an earlier basicsr infer and are not '
                   f're-read, see {MANIFEST_NAME}; to restore them again, write to another -o folder)'
                   if plan.previous_outputs else '')
        raise InferConfigError(f"no images in '{args.input}' (extensions: png, jpg, bmp, tif, webp, ...)"
                               f'{earlier}.')
    net = build_model(setup, device)
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as err:
        dangling = ' (it is a broken symbolic link or a symbolic-link loop)' if osp.islink(args.output) else ''
        return _error(f"cannot create the output folder '{args.output}' (-o){dangling}: {err}")

    from mambacsr_arch.cli.infer_outputs import network_channels
    from mambacsr_arch.cli.option_checks import print_notes
    from mambacsr_arch.fileio import remove_stale_temp_files

    ours = {osp.basename(out) for _, out in plan.pairs} | {MANIFEST_NAME}
    stale = remove_stale_temp_files(args.output, targets=ours.__contains__)  # of killed runs; a live run's stay
    if stale:
        print_notes('infer', [f'removed {len(stale)} temporary file(s) a killed run left in {args.output}.'])

    channels = network_channels(net)
    notes = LayoutNotes()
    written, skipped, failed, redone, edited = 0, 0, [], [], []  # failed: one message per image, naming the file
    start = time.perf_counter()
    bar = tqdm(plan.pairs, unit='img', desc='infer', file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    for path, out_path in bar:
        if not args.overwrite:
            state = existing_output(out_path, plan.manifest)
            if state in ('recorded', 'edited', 'foreign'):
                skipped += 1
                if state == 'edited':
                    edited.append(osp.basename(out_path))
                continue
            if state == 'damaged':  # infer wrote it, its bytes changed since (truncated copy, full disk): redo
                redone.append(osp.basename(out_path))
        message = None
        try:
            digest = write_image_atomic(out_path, restore_file(net, path, setup, device, channels, notes))
        except KeyboardInterrupt:  # Ctrl-C: the image in progress was never written (atomic); say how to go on
            bar.close()
            print(f'basicsr infer: interrupted at {path}; {written} written to {args.output}. Run the same command '
                  'again to continue (existing outputs are skipped).', file=sys.stderr)
            return EXIT_INTERRUPTED
        except ImageReadError as err:  # corrupt / unsupported file: this image only
            message = str(err)
        except ValueError as err:  # scale / network mismatch: the same for every image
            bar.close()
            return _error(str(err))
        except (OSError, RuntimeError) as err:  # write error, out of memory: this image only
            hint = ' (try a smaller --tile)' if 'out of memory' in str(err).lower() else ''
            message = f'{path}: {type(err).__name__}: {err}{hint}'
        else:
            written += 1
            try:  # after every image, merged under a lock, so neither a killed run nor a concurrent one loses it
                plan.manifest = record_outputs(plan.out_dir, {osp.basename(out_path): {
                    'input': osp.basename(path), 'sha256': digest}})
            except (OSError, OutputPlanError) as err:
                message = (f'{out_path} was written but cannot be recorded in {MANIFEST_NAME} ({err}); a later run '
                           'with -i this folder would treat it as an input')
        if message is not None:
            failed.append(message)
            bar.write(f'FAILED {message}', file=sys.stderr)
    bar.close()
    notes_lines = []
    if redone:
        notes_lines.append(f'{len(redone)} output(s) recorded in {MANIFEST_NAME} were damaged since infer wrote them '
                           f'(SHA-256 differs, no longer a whole image: truncated): restored again: {listing(redone)}')
    if edited:
        notes_lines.append(f'{len(edited)} output(s) recorded in {MANIFEST_NAME} were edited or replaced since infer '
                           f'wrote them (still whole images): kept, --overwrite to restore them: {listing(edited)}')
    print_notes('infer', notes_lines + notes.lines())
    elapsed = time.perf_counter() - start
    rate = written / elapsed if elapsed > 0 else 0.0
    earlier = len(plan.previous_outputs)
    not_reread = (f', {earlier} earlier output(s) of infer in the input folder not re-read (listed in '
                  f'{MANIFEST_NAME})' if earlier else '')
    print(f'basicsr infer: {written} written to {args.output}, {skipped} skipped (output exists; --overwrite to redo), '
          f'{len(failed)} failed{not_reread}; {rate:.2f} images/s on {device}.')
    for message in failed:
        print(f'  failed: {message}', file=sys.stderr)
    return EXIT_FAILED_IMAGES if failed else EXIT_OK
