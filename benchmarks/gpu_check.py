"""One-shot GPU check: correctness and speed of every CUDA code path, in one run of at most ~8 minutes.

For a machine with PyTorch + Triton and a GPU but no internet and none of our other dependencies:
bring ``wheels/`` (``make gpu-wheels`` on a machine with internet; see benchmarks/README.md), then::

    python benchmarks/gpu_check.py OUT_DIR                 # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py OUT_DIR --dry-run       # tiny sizes on the CPU (CI runs this)

Packages of :data:`NEEDED` that are missing (a bare CUDA torch image lacks all; the usual GPU images
lack basicsr, addict, yapf, platformdirs, future, lmdb) are installed from ``--wheels`` (default
``wheels/``) with ``pip install --no-index --no-deps --target OUT_DIR/site-packages`` (the machine's
environment is left alone), and the script says which; if that is impossible it stops and says what to
bring. Sections (each one's failure is recorded and the next one runs):

1. golden: tests/data/golden fixtures through every usable backend, max abs error vs stored outputs (<= 1e-4)
2. agree: the GPU backends' own check scans (what the automatic choice requires), then backends vs the
   ``reference`` backend at MambaCSR sizes (D 720, N 16, groups 4): output and gradients
3. scan: seconds per call, B = 1 and 4, D 720, N 16, L 4096, forward and forward+backward; ratios in this run
4. models: MambaCSR vs HAT (released x4 configs), LR 64, batch 4: forward latency, training step, fp32 and
   bf16 autocast, peak memory
5. cli: 20 iterations of ``basicsr train`` (bf16, and fp16 with GradScaler) on generated photos, then
   ``basicsr infer`` with tiling

Prints one table; writes OUT_DIR/gpu_check.json (every figure measured in this run; nothing else).
Run under ``TRITON_INTERPRET=1`` with ``--dry-run``, the ``triton`` rows run too, through Triton's CPU
interpreter (CI does this).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# import name -> distribution (wheel) name: what basicsr, this package and gpu_check import beyond torch, triton
# and the standard library; ``make gpu-wheels`` brings a wheel of each (its GPU_WHEELS list, plus basicsr)
NEEDED = {
    'basicsr': 'basicsr', 'addict': 'addict', 'yapf': 'yapf', 'platformdirs': 'platformdirs', 'future': 'future',
    'lmdb': 'lmdb', 'yaml': 'pyyaml', 'tqdm': 'tqdm', 'safetensors': 'safetensors', 'numpy': 'numpy',
    'numba': 'numba', 'llvmlite': 'llvmlite', 'cv2': 'opencv-python-headless', 'skimage': 'scikit-image',
    'scipy': 'scipy', 'PIL': 'pillow', 'imageio': 'imageio', 'tifffile': 'tifffile', 'networkx': 'networkx',
    'lazy_loader': 'lazy-loader', 'packaging': 'packaging',
}
GOLDEN_TOL = 1e-4
AGREE_RTOL = 1e-3  # max abs difference / max abs reference value, outputs and gradients


def missing_dependencies() -> List[str]:
    """Distribution names of the :data:`NEEDED` modules this Python cannot find."""
    return [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]


def ensure_dependencies(wheels: str, target: str) -> List[str]:
    """Install the missing :data:`NEEDED` packages from ``wheels`` (no index, no dependency resolution) into
    ``target``, which goes first on sys.path and PYTHONPATH (for the CLI subprocesses); returns what was
    installed. Exits with the fix if wheels are missing or do not install."""
    missing = missing_dependencies()
    if not missing:
        print('dependencies: all present, nothing installed', flush=True)
        return []
    files = os.listdir(wheels) if osp.isdir(wheels) else []
    if not files:
        sys.exit(f'gpu_check: missing {", ".join(missing)} and no wheels in {wheels}. On a machine with internet, '
                 f'run `make gpu-wheels` in the repository and copy its wheels/ folder here (see benchmarks/README.md)')
    print(f'dependencies: installing {", ".join(missing)} from {wheels} (no index) into {target}', flush=True)
    cmd = [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-index', '--no-deps', '--no-cache-dir',
           '--find-links', wheels, '--target', target, *missing]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f'gpu_check: `{" ".join(cmd)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}\n'
                 f'bring wheels for this Python ({platform.python_version()}) with `make gpu-wheels GPU_PYTHON=...`')
    sys.path.insert(0, target)
    os.environ['PYTHONPATH'] = target + os.pathsep + os.environ.get('PYTHONPATH', '')
    importlib.invalidate_caches()
    still = missing_dependencies()
    if still:
        sys.exit(f'gpu_check: {", ".join(still)} still missing after installing from {wheels}; run `make gpu-wheels` '
                 'again (its GPU_WHEELS list must name them)')
    return missing


class Report:
    """Collects rows (section, item, value, target, ok) and errors; prints the table; writes JSON."""

    def __init__(self, out_dir: str, meta: Dict[str, Any]) -> None:
        self.out_dir, self.meta = out_dir, meta
        self.rows: List[Dict[str, Any]] = []
        self.errors: Dict[str, str] = {}

    def add(self, section: str, item: str, value: Any, target: str = '', ok: Optional[bool] = None) -> None:
        self.rows.append(dict(section=section, item=item, value=value, target=target, ok=ok))
        shown = f'{value:.4g}' if isinstance(value, float) else value
        print(f'  [{section}] {item}: {shown} {target} {"" if ok is None else ("ok" if ok else "FAIL")}', flush=True)

    def run(self, section: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        print(f'== {section}', flush=True)
        try:
            fn()
        except Exception:  # recorded in the report; the next section still runs
            self.errors[section] = traceback.format_exc()
            print(self.errors[section], flush=True)
        self.meta.setdefault('section_seconds', {})[section] = round(time.perf_counter() - start, 1)

    def finish(self) -> int:
        lines = ['| section | item | value | target | ok |', '|---|---|---|---|---|']
        for r in self.rows:
            value = f"{r['value']:.4g}" if isinstance(r['value'], float) else r['value']
            ok = '' if r['ok'] is None else ('yes' if r['ok'] else 'NO')
            lines.append(f"| {r['section']} | {r['item']} | {value} | {r['target']} | {ok} |")
        print('\n' + '\n'.join(lines))
        for section, err in self.errors.items():
            print(f'\nsection {section} raised:\n{err.strip().splitlines()[-1]}')
        path = osp.join(self.out_dir, 'gpu_check.json')
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(dict(meta=self.meta, rows=self.rows, errors=self.errors), f, indent=2, default=str)
        print(f'\nwrote {path}')
        failed = [r for r in self.rows if r['ok'] is False]
        return 1 if (failed or self.errors) else 0


def sync(device) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device, repeat: int) -> float:
    """Median seconds of ``fn`` after one warm-up run."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scan_backends(device) -> List[str]:
    """Usable fused/portable backends for tensors on ``device`` (not 'reference'): on a GPU, those whose
    check scan passed."""
    from mambacsr_arch.ops import available_backends, dispatch
    usable = available_backends(device.type)
    return [row.name for row in dispatch.TABLE
            if row.name != 'reference' and usable[row.name] is None and row.runs_on(device.type)]


# ----------------------------------------------------------------------------- sections


def check_golden(rep: Report, device, dry: bool) -> None:
    import torch
    from basicsr.utils.registry import ARCH_REGISTRY
    from mambacsr_arch.ops import use_backend
    names = ['hat_small', 'mambacsr_dis'] if dry else ['hat_small', 'mambacsr_dis', 'mambacsr_dis_crossscale']
    for name in names:
        golden = torch.load(osp.join(ROOT, 'tests', 'data', 'golden', f'{name}.pt'), weights_only=True)
        net = ARCH_REGISTRY.get(golden['type'])(**golden['network_g']).eval().to(device)
        net.load_state_dict(golden['state_dict'], strict=True)
        backends = scan_backends(device) if golden['type'] == 'MambaCSR' else ['-']
        # dry: the first backend only (a whole network through triton's interpreter takes minutes; the agree
        # and scan sections run triton there)
        for backend in backends[:1] if dry else backends:
            with use_backend(None if backend == '-' else backend), torch.no_grad():  # '-': HAT, no scan
                out = net(golden['input'].to(device))
            err = (out.float().cpu() - golden['output']).abs().max().item()
            rep.add('golden', f'{name} [{backend}] max abs err', err, f'<= {GOLDEN_TOL:g}', err <= GOLDEN_TOL)


def _scan_inputs(batch: int, dim: int, length: int, device) -> Dict[str, Any]:
    import torch
    g = torch.Generator().manual_seed(0)
    n, groups = 16, 4
    t = {
        'u': torch.randn(batch, dim, length, generator=g), 'delta': torch.randn(batch, dim, length, generator=g) * 0.5,
        'A': -torch.rand(dim, n, generator=g) * 4 - 0.1, 'B': torch.randn(batch, groups, n, length, generator=g),
        'C': torch.randn(batch, groups, n, length, generator=g), 'D': torch.randn(dim, generator=g),
        'z': torch.randn(batch, dim, length, generator=g), 'delta_bias': torch.rand(dim, generator=g) * 4.6 - 6.9,
    }
    return {k: v.to(device) for k, v in t.items()}


def _scan_fb(inputs: Dict[str, Any], backend: str, backward: bool, use_z: bool = True):
    import torch
    from mambacsr_arch.ops import selective_scan
    leaves = {k: v.detach().requires_grad_(backward) for k, v in inputs.items()}
    out = selective_scan(leaves['u'], leaves['delta'], leaves['A'], leaves['B'], leaves['C'], leaves['D'],
                         leaves['z'] if use_z else None, leaves['delta_bias'], True, backend=backend)
    if not backward:
        return out, {}
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out * weight).sum().backward()
    return out, {k: v.grad for k, v in leaves.items() if v.grad is not None}


def check_backend_checks(rep: Report, device) -> None:
    """The check scan each GPU backend must pass before the automatic choice takes it (dispatch's)."""
    from mambacsr_arch.ops import available_backends, dispatch
    probes, checked = available_backends(), available_backends(device.type)
    for row in dispatch.TABLE:
        if row.check is None or device.type not in row.check_devices:
            continue
        if probes[row.name] is not None:  # not installed or not loadable: reported, not a failure of the check
            rep.add('agree', f'{row.name} check scan: not run ({probes[row.name][:120]})', '-')
            continue
        reason = checked[row.name]
        rep.add('agree', f'{row.name} check scan (forward + 8 gradients vs float64)', reason or 'passed',
                'passed', reason is None)


def check_agreement(rep: Report, device, dry: bool) -> None:
    check_backend_checks(rep, device)
    dim, length = (8, 200) if dry else (720, 4096)
    inputs = _scan_inputs(1, dim, length, device)
    ref_out, ref_grads = _scan_fb(inputs, 'reference', True)
    for backend in scan_backends(device):
        out, grads = _scan_fb(inputs, backend, True)
        worst = ('out', _rel(out, ref_out))
        for k in ref_grads:
            worst = max(worst, (f'd{k}', _rel(grads[k], ref_grads[k])), key=lambda p: p[1])
        rep.add('agree', f'{backend} vs reference, D {dim} L {length}: worst ({worst[0]})', worst[1],
                f'<= {AGREE_RTOL:g}', worst[1] <= AGREE_RTOL)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def check_scan_speed(rep: Report, device, dry: bool) -> None:
    dim, length, repeat = (16, 256, 1) if dry else (720, 4096, 5)
    backends = [b for b in ('mamba_ssm', 'triton', 'torch', 'cpu') if b in scan_backends(device)]
    for batch in (1, 4):
        inputs = _scan_inputs(batch, dim, length, device)
        secs: Dict[str, Dict[str, float]] = {}
        for backend in backends:
            secs[backend] = {
                'fwd': timed(lambda: _scan_fb(inputs, backend, False, use_z=False), device, repeat),
                'fwd+bwd': timed(lambda: _scan_fb(inputs, backend, True, use_z=False), device, repeat)}
            for kind, value in secs[backend].items():
                rep.add('scan', f'B {batch} D {dim} L {length} {backend} {kind} s', value)
        for kind in ('fwd', 'fwd+bwd'):
            if 'triton' in secs and 'torch' in secs:
                ratio = secs['torch'][kind] / secs['triton'][kind]
                target = '>= 20' if (batch == 4 and kind == 'fwd+bwd') else ''
                rep.add('scan', f'B {batch} {kind} torch / triton', ratio, target,
                        (ratio >= 20) if target and not dry else None)
            if 'triton' in secs and 'mamba_ssm' in secs:
                ratio = secs['triton'][kind] / secs['mamba_ssm'][kind]
                rep.add('scan', f'B {batch} {kind} triton / mamba_ssm', ratio, '<= 2', ratio <= 2)


def _released(dry: bool) -> Dict[str, Dict[str, Any]]:
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    from bench_models import HAT, MAMBACSR
    models = {'MambaCSR': dict(MAMBACSR, cross_scale_scan=True), 'HAT': dict(HAT)}
    if dry:  # tiny: same archs, few channels and blocks
        models['MambaCSR'].update(embed_dim=24, depths=[1], depths2=[1], d_state=4)
        models['HAT'].update(embed_dim=24, depths=[1], num_heads=[3], window_size=8, squeeze_factor=8)
    return models


def check_models(rep: Report, device, dry: bool) -> None:
    import torch
    from basicsr.archs import build_network
    size, batch, repeat = (16, 1, 1) if dry else (64, 4, 5)
    amps = [None, torch.bfloat16]
    step: Dict[str, Dict[str, float]] = {}
    for name, cfg in _released(dry).items():
        net = build_network(dict(cfg)).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        lq = torch.rand(batch, 3, size, size, device=device)
        gt = torch.rand(batch, 3, size * 4, size * 4, device=device)
        for amp in amps:
            label = 'bf16' if amp else 'fp32'

            def ctx():
                return torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False)

            def forward():
                with torch.inference_mode(), ctx():
                    net.eval()(lq)

            def train_step():
                net.train()
                opt.zero_grad(set_to_none=True)
                with ctx():
                    loss = (net(lq).float() - gt).abs().mean()
                loss.backward()
                opt.step()

            if device.type == 'cuda':
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            fwd = timed(forward, device, repeat)
            train = timed(train_step, device, repeat)
            step.setdefault(label, {})[name] = train
            rep.add('models', f'{name} {label} LR {size} batch {batch} forward s', fwd)
            rep.add('models', f'{name} {label} LR {size} batch {batch} train step s', train)
            if device.type == 'cuda':
                rep.add('models', f'{name} {label} peak memory GiB', torch.cuda.max_memory_allocated(device) / 2**30)
        net = opt = None  # free this model before the next is built (the closures above read them)
    for label, times in step.items():
        ratio = times['MambaCSR'] / times['HAT']
        target = '<= 2' if label == 'bf16' else ''
        rep.add('models', f'train step MambaCSR / HAT {label}', ratio, target,
                (ratio <= 2) if target and not dry else None)


def _write_photos(folder: str, count: int, size: int) -> None:
    import cv2
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    try:
        import skimage.data
        photos = [getattr(skimage.data, n)() for n in ('astronaut', 'coffee', 'chelsea', 'camera')]
    except Exception:  # no bundled photos: smooth random textures
        rng = np.random.default_rng(0)
        photos = [cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (0, 0), 3)
                  for _ in range(4)]
    for k in range(count):
        img = photos[k % len(photos)]
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(osp.join(folder, f'photo_{k:02d}.png'), np.ascontiguousarray(img[:, ::-1] if k % 2 else img))


def check_cli(rep: Report, device, dry: bool, out_dir: str) -> None:
    import yaml
    work = osp.join(out_dir, 'cli_run')
    photos = osp.join(work, 'photos')
    _write_photos(osp.join(photos, 'train'), 4 if dry else 8, 64 if dry else 256)
    _write_photos(osp.join(photos, 'val'), 1, 64)
    with open(osp.join(ROOT, 'options', 'demo_mambacsr_x4.yml'), encoding='utf-8') as f:
        base = yaml.safe_load(f)
    amps = ['bf16'] if dry else ['bf16', 'fp16']
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    if dry:
        env['CUDA_VISIBLE_DEVICES'] = ''
    for amp in amps:
        opt = json.loads(json.dumps(base))
        opt['name'] = f'gpu_check_{amp}'
        opt['datasets']['train'].update(dataroot_gt=osp.join(photos, 'train'), batch_size_per_gpu=2 if dry else 4,
                                        dataset_enlarge_ratio=10, gt_size=32 if dry else 64)
        opt['datasets']['val']['dataroot_gt'] = osp.join(photos, 'val')
        if dry:
            opt['network_g'].update(depths=[1], depths2=[1])
        opt['train'].update(total_iter=20, use_amp=amp)
        opt['val'].update(val_freq=20, save_comparisons=False, plot_metrics=False)
        opt['logger'].update(print_freq=10, save_checkpoint_freq=20)
        path = osp.join(work, f'train_{amp}.yml')
        with open(path, 'w', encoding='utf-8') as f:
            yaml.safe_dump(opt, f)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, '-m', 'mambacsr_arch.cli.main', 'train', '-opt', path], cwd=work,
                                env=env, capture_output=True, text=True, timeout=300)
        ok = result.returncode == 0
        rep.add('cli', f'basicsr train 20 iters use_amp {amp} (rc {result.returncode}) s',
                time.perf_counter() - start, 'rc 0', ok)
        if not ok:
            rep.errors[f'cli train {amp}'] = (result.stdout + result.stderr)[-4000:]
            continue
        weights = osp.join(work, 'experiments', opt['name'], 'models', 'net_g_20.pth')
        start = time.perf_counter()
        result = subprocess.run([sys.executable, '-m', 'mambacsr_arch.cli.main', 'infer',
                                 '-i', osp.join(photos, 'train'),
                                 '-o', osp.join(work, f'infer_{amp}'), '--opt', path, '--weights', weights,
                                 '--tile', '32', '--tile-overlap', '8', '--device', device.type, '--no-progress'],
                                cwd=work, env=env, capture_output=True, text=True, timeout=300)
        ok = result.returncode == 0 and len(os.listdir(osp.join(work, f'infer_{amp}'))) > 0
        rep.add('cli', f'basicsr infer tile 32 on {device.type} ({amp} weights, rc {result.returncode}) s',
                time.perf_counter() - start, 'rc 0', ok)
        if not ok:
            rep.errors[f'cli infer {amp}'] = (result.stdout + result.stderr)[-4000:]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', help='folder for gpu_check.json and the CLI runs (created)')
    parser.add_argument('--dry-run', action='store_true', help='tiny sizes on the CPU (proves the script runs)')
    parser.add_argument('--wheels', default=osp.join(ROOT, 'wheels'), help='folder of wheels for missing packages')
    parser.add_argument('--sections', nargs='+', default=['golden', 'agree', 'scan', 'models', 'cli'],
                        choices=['golden', 'agree', 'scan', 'models', 'cli'])
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    out_dir = osp.abspath(args.out_dir)
    installed = ensure_dependencies(args.wheels, osp.join(out_dir, 'site-packages'))
    sys.path.insert(0, ROOT)
    import torch

    import mambacsr_arch  # noqa: F401  (registers the archs; shims before basicsr)
    from mambacsr_arch.ops import available_backends, resolve_backend
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit('gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); use --dry-run for a CPU '
                 'smoke run')
    device = torch.device('cpu' if args.dry_run else 'cuda')
    meta = dict(started=time.strftime('%Y-%m-%d %H:%M:%S'), dry_run=args.dry_run, python=platform.python_version(),
                installed_from_wheels=installed, triton_interpret=os.environ.get('TRITON_INTERPRET'),
                torch=torch.__version__, cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name() if device.type == 'cuda' else None,
                triton=getattr(importlib.import_module('triton'), '__version__', None)
                if importlib.util.find_spec('triton') else None,
                scan_backends=available_backends(device.type), auto_backend=resolve_backend(device))
    print(json.dumps(meta, indent=1, default=str), flush=True)
    rep = Report(out_dir, meta)
    sections = {'golden': lambda: check_golden(rep, device, args.dry_run),
                'agree': lambda: check_agreement(rep, device, args.dry_run),
                'scan': lambda: check_scan_speed(rep, device, args.dry_run),
                'models': lambda: check_models(rep, device, args.dry_run),
                'cli': lambda: check_cli(rep, device, args.dry_run, out_dir)}
    start = time.perf_counter()
    for name in args.sections:
        rep.run(name, sections[name])
    meta['total_seconds'] = round(time.perf_counter() - start, 1)
    return rep.finish()


if __name__ == '__main__':
    sys.exit(main())
