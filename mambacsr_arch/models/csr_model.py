"""``MambaCSRModel`` and ``HATModel``: BasicSR ``SRModel`` plus what CSR training needs.

Reused from ``SRModel`` unchanged: network/EMA construction (``train.ema_decay``), losses,
optimisers, schedulers, ``nondist_validation`` (PSNR/SSIM via ``val.metrics``; rank 0 only in
distributed runs, BasicSR's ``dist_validation``). Overridden, each for the reason given there:

* ``test``: any image size (padding to the arch multiple, blended tiles, official protocol), on
  the bare network (so rank-0 validation never enters DDP collectives).
* ``optimize_parameters``: AMP, non-finite-loss guard, per-iteration torch reseeding.
* ``load_network``: ``params``/``params_ema``/bare files, ``module.`` prefixes, clear mismatch errors.
* ``save_network`` / ``save_training_state``: atomic writes, RNG + GradScaler state.
* ``resume_training``: RNG + GradScaler restore, the option file's optimizer settings over the
  restored ones, and the epoch counter fixed at epoch ends.
* ``model_to_device``: DDP on CPU (gloo) as well as CUDA.

Option keys read here (BasicSR YAML)::

    train:
      use_amp: bf16 | fp16 | ~        # autocast for the training forward; fp16 needs CUDA (GradScaler).
                                      # The selective scan stays float32 (the ops layer disables autocast).
    val:
      log_baseline: false             # also log the metrics of bicubic-upsampled LQ (once per dataset)
      save_comparisons: false         # rank 0, each validation: <path.visualization>/comparisons/<dataset>/
                                      # <image>_<iter>_bicubic<dB>_<arch><dB>.png = bicubic LQ | output | GT
      plot_metrics: false             # true or [metric, ...] of val.metrics: <path.visualization>/curves/
                                      # <dataset>_<metric>.png, network vs bicubic baseline per iteration
                                      # (implies the baseline is computed; numbers in curves/history.json)
      # inference settings (tile, max_pixels, pad_multiple, official_protocol, use_amp, self_ensemble: the x8
      # self-ensemble, 8x the time, in validation and `basicsr test`) and the official
      # files' top-level tile / padding_size: resolved by mambacsr_arch.models.inference.resolve_inference_settings
      # (the same resolver `basicsr infer` uses; its module doc lists the keys)
    logger:
      save_safetensors: false         # also write, next to each models/net_g_<iter>.pth, one .safetensors per
                                      # entry: net_g_<iter>.safetensors = params (what the .pth gives by default),
                                      # net_g_<iter>_ema.safetensors = params_ema (with EMA); bare keys; the entry,
                                      # the sibling files and network_g in the metadata (models.weights)

Resume guarantee (CPU, ``num_worker_per_gpu: 0``, same seed): a run resumed from the state saved
at iteration N reaches the same weights as an uninterrupted run when N is the end of an epoch
(e.g. ``save_checkpoint_freq`` a multiple of the iterations per epoch). Python/numpy RNG states
are stored in the ``.state`` file; torch's RNG is reseeded at every iteration from
(``manual_seed``, rank, iteration), so dropout and similar draws do not depend on history. A
resume from the middle of an epoch replays that epoch's data from its start (BasicSR's loop),
which is logged as a warning. With data workers, worker RNGs are seeded by BasicSR per epoch.

Resuming (see :mod:`mambacsr_arch.models.recovery`): the option file wins over the state. BasicSR
restores the optimizers' hyper-parameters from the ``.state``, so an edited ``train.optim_g.lr``
was silently ignored; here every optimizer setting that differs from the restored one is put
back, with a warning ("train.optim_g.lr 0.0001 from the option file overrides 0.0002 restored
from <state>"). ``lr`` is the base rate: the schedulers' ``base_lrs`` follow it and the current
rate is rescaled, so MultiStepRestartLR keeps the decays already passed and
CosineAnnealingRestartLR follows the new base; milestones/periods/gamma and the iteration come
from the state. ``--auto_resume`` takes the newest *usable* ``training_states/<iter>.state``
(unreadable ones, or ones whose ``models/net_g_<iter>.pth`` is missing, are skipped with a
warning); ``path.resume_state`` (without ``--auto_resume``) picks one, e.g. an older one after a
divergence (newer states are then replaced as the run passes them, with a warning). A
non-finite loss stops training with the newest checkpoint whose weights are still sane and the
exact command to resume from it at a lower rate.
"""
from __future__ import annotations

import contextlib
import math
import os.path as osp
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from torch import nn

from ..registry import registers
from . import visuals
from .checkpoint_io import atomic_torch_save, capture_rng_state, restore_rng_state
from .distributed import get_bare_model
from .distributed import model_to_device as _model_to_device
from .inference import AMP_DTYPES, parse_amp, parse_train_amp, resolve_inference_settings, restore_image
from .recovery import apply_option_hyperparameters, non_finite_advice, option_hyperparameters
from .weights import default_param_key, load_weights, project_metadata, save_safetensors

__all__ = ['AMP_DTYPES', 'CSRModel', 'HATModel', 'MambaCSRModel', 'parse_amp']  # AMP names: from .inference
_SEED_MIX = 1_000_003


class CSRModel(SRModel):
    """Shared base of :class:`MambaCSRModel` and :class:`HATModel` (see module doc)."""

    def __init__(self, opt: Dict[str, Any]) -> None:
        if int(opt.get('num_gpu', 0) or 0) > 0 and not torch.cuda.is_available():
            # BaseModel would pick 'cuda' and fail deep inside .to(); say what to change instead.
            raise RuntimeError(f"num_gpu: {opt['num_gpu']} but CUDA is not available; set num_gpu: auto "
                               f'(or 0) in the option file to run on the CPU.')
        self.train_amp: Optional[torch.dtype] = parse_amp((opt.get('train') or {}).get('use_amp'), 'train')
        # resolved before the network is built, so a typo under val.tile fails before any work
        self.inference_settings = resolve_inference_settings(opt, source=f"option file of '{opt.get('name')}'")
        for note in self.inference_settings.notes:  # e.g. "official MambaCSR test protocol: padding_size 64"
            get_root_logger().info(note)
        self.grad_scaler: Optional[torch.amp.GradScaler] = None
        self._baseline_logged: set = set()
        super().__init__(opt)

    # --------------------------------------------------------------------------- devices, weights
    def model_to_device(self, net: nn.Module) -> nn.Module:
        # BasicSR 1.4.2 passes CUDA device_ids to DDP unconditionally; ours also works with gloo.
        return _model_to_device(self, net)

    def load_network(self, net: nn.Module, load_path: str, strict: bool = True,
                     param_key: Optional[str] = 'params') -> None:
        # BasicSR only logs mismatches and then fails inside torch; we raise one actionable error (a
        # ConfigError). BasicSR passes path.param_key_g, default 'params': the one rule of models.weights
        # (choose_param_key), and a .safetensors of ours is held to the entry its metadata names.
        load_weights(net, load_path, param_key=param_key, strict=strict)

    # --------------------------------------------------------------------------- training
    def init_training_settings(self) -> None:
        super().init_training_settings()
        parse_train_amp(self.opt['train'].get('use_amp'), self.device.type)  # fp16 needs CUDA
        if self.train_amp == torch.float16:
            self.grad_scaler = torch.amp.GradScaler('cuda')

    def _reseed_torch(self, current_iter: int) -> None:
        """Seed torch from (manual_seed, rank, iteration): draws never depend on run history."""
        seed = int(self.opt.get('manual_seed') or 0)
        rank = int(self.opt.get('rank', 0))
        torch.manual_seed((seed * _SEED_MIX + rank) * _SEED_MIX + current_iter)

    def _check_finite(self, current_iter: int, loss_dict: Dict[str, torch.Tensor], total: torch.Tensor) -> None:
        finite = torch.isfinite(total.detach()).to(torch.float32).reshape(1)
        if self.opt.get('dist', False):
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)  # all ranks stop together
        if finite.item() < 1:
            values = ', '.join(f'{k}={v.detach().float().item():.6g}' for k, v in loss_dict.items())
            # the weights usually diverge before the loss does: rank 0 names a checkpoint that is still
            # sane; every rank waits for that advice and reports it (none exits first and gets rank 0 killed)
            advice = [non_finite_advice(self.opt) if int(self.opt.get('rank', 0)) == 0 else '']
            if self.opt.get('dist', False):
                torch.distributed.broadcast_object_list(advice, src=0)
            raise FloatingPointError(
                f'non-finite loss at iteration {current_iter} ({values or total.item()}) on this or another '
                f'rank; this step did not update the weights, but they may have diverged earlier. ' + advice[0])

    def optimize_parameters(self, current_iter: int) -> None:
        # SRModel's step has no autocast, no non-finite guard and no deterministic RNG; same losses.
        self._reseed_torch(current_iter)
        self.optimizer_g.zero_grad()
        autocast = (torch.autocast(device_type=self.device.type, dtype=self.train_amp)
                    if self.train_amp is not None else contextlib.nullcontext())
        with autocast:
            self.output = self.net_g(self.lq)
        output = self.output.float()
        l_total = output.new_zeros(())
        loss_dict: Dict[str, torch.Tensor] = OrderedDict()
        if self.cri_pix:
            l_pix = self.cri_pix(output, self.gt)
            l_total = l_total + l_pix
            loss_dict['l_pix'] = l_pix
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(output, self.gt)
            if l_percep is not None:
                l_total = l_total + l_percep
                loss_dict['l_percep'] = l_percep
            if l_style is not None:
                l_total = l_total + l_style
                loss_dict['l_style'] = l_style
        self._check_finite(current_iter, loss_dict, l_total)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(l_total).backward()
            self.grad_scaler.step(self.optimizer_g)
            self.grad_scaler.update()
        else:
            l_total.backward()
            self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # --------------------------------------------------------------------------- inference
    def inference_kwargs(self, net: nn.Module) -> Dict[str, Any]:
        """Keyword arguments of :func:`restore_image`: the resolved settings (as ``basicsr infer``'s)."""
        return self.inference_settings.restore_kwargs(net)

    def test(self) -> None:
        # SRModel runs the whole padded-by-nobody image through (possibly DDP-wrapped) net_g; we pad,
        # tile when asked or when the image is large (or cut HAT's tiles / the official MambaCSR chops when
        # the authors' option files ask), and always use the bare module.
        use_ema = hasattr(self, 'net_g_ema')
        net = self.net_g_ema if use_ema else get_bare_model(self.net_g)
        was_training = net.training
        net.eval()
        try:
            self.output = restore_image(net, self.lq, int(self.opt['scale']), **self.inference_kwargs(net))
        finally:
            if was_training and not use_ema:
                net.train()

    def validation(self, dataloader, current_iter: int, tb_logger, save_img: bool = False) -> None:
        val_opt = self.opt.get('val') or {}
        plotted = visuals.plot_metric_names(val_opt)  # a bad val.plot_metrics fails before the pass
        super().validation(dataloader, current_iter, tb_logger, save_img)
        if self.opt.get('rank', 0) != 0:
            return
        baseline = {}
        if val_opt.get('log_baseline') or plotted:
            baseline = self.log_bicubic_baseline(dataloader, current_iter, tb_logger)
        if not (val_opt.get('save_comparisons') or plotted):
            return
        # BasicSR's train loop validates once more after the last iteration, at total_iter + 1, with the
        # weights of total_iter: file both under total_iter (same files, same curve point).
        total_iter = int((self.opt.get('train') or {}).get('total_iter') or 0)
        if isinstance(current_iter, int) and total_iter and current_iter > total_iter:
            current_iter = total_iter
        name = dataloader.dataset.opt['name']
        root = self.opt['path']['visualization']
        label = str(self.opt['network_g']['type'])
        if val_opt.get('save_comparisons'):
            visuals.save_comparisons(self, dataloader, current_iter, osp.join(root, 'comparisons', name), label)
        if plotted and isinstance(current_iter, int):  # basicsr test passes the run name: no curve to draw
            folder = osp.join(root, 'curves')
            entry = visuals.record_metrics(folder, name, current_iter,
                                           {m: self.metric_results[m] for m in plotted}, baseline)
            labels = {m: visuals.metric_label(val_opt['metrics'][m]) for m in plotted}
            visuals.save_metric_plots(folder, name, entry, label, labels)

    def log_bicubic_baseline(self, dataloader, current_iter: int, tb_logger) -> Dict[str, float]:
        """Log (once per dataset) ``val.metrics`` of the bicubic-upsampled LQ: the number to beat."""
        name = dataloader.dataset.opt['name']
        metrics = (self.opt.get('val') or {}).get('metrics') or {}
        if name in self._baseline_logged or not metrics:
            return {}
        scale = int(self.opt['scale'])
        totals = {metric: 0.0 for metric in metrics}
        count = 0
        for data in dataloader:
            if 'gt' not in data:
                return {}
            gt = data['gt'].float()
            metric_data = {'img': tensor2img([visuals.bicubic_upsample(data['lq'], scale, gt)]),
                           'img2': tensor2img([gt])}
            for metric, metric_opt in metrics.items():
                totals[metric] += float(calculate_metric(metric_data, metric_opt))
            count += 1
        results = {metric: total / max(count, 1) for metric, total in totals.items()}
        self._baseline_logged.add(name)
        get_root_logger().info(f'Bicubic baseline {name} (bicubic-upsampled LQ)\n' + ''.join(
            f'\t # {metric}: {value:.4f}\n' for metric, value in results.items()))
        if tb_logger:
            for metric, value in results.items():
                tb_logger.add_scalar(f'metrics/{name}/baseline_{metric}', value, current_iter)
        return results

    # --------------------------------------------------------------------------- checkpoints
    @master_only
    def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
        # BasicSR writes in place (a kill mid-write corrupts the file) and ignores failures; atomic here.
        label = 'latest' if current_iter == -1 else current_iter
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError(f'save_network: {len(nets)} networks but {len(keys)} param keys.')
        save_dict = {}
        for net_, key in zip(nets, keys):
            # the bare module's keys carry no DDP 'module.' prefix
            save_dict[key] = OrderedDict((name, tensor.detach().cpu())
                                         for name, tensor in get_bare_model(net_).state_dict().items())
        atomic_torch_save(save_dict, f"{self.opt['path']['models']}/{net_label}_{label}.pth")
        if (self.opt.get('logger') or {}).get('save_safetensors'):
            self._save_safetensors(save_dict, net_label, label)

    def _save_safetensors(self, save_dict: Dict[str, Any], net_label: str, label: Any) -> None:
        """One ``.safetensors`` per entry of the ``.pth`` just saved (models.weights' module doc): the entry the
        one rule loads by default (``params``) as ``<net>_<iter>.safetensors``, any other (``params_ema``) as
        ``<net>_<iter>_ema.safetensors``; each records its entry, the others' files and ``network_g``."""
        default = default_param_key(has_option_file=True)
        names = {key: f"{net_label}_{label}{'' if key == default else '_' + key.replace('params_', '')}.safetensors"
                 for key in save_dict}
        network = self.opt.get(f'network_{net_label[4:]}' if net_label.startswith('net_') else 'network_g')
        for key, name in names.items():
            save_safetensors(save_dict[key], osp.join(self.opt['path']['models'], name), durable=True,
                             metadata=project_metadata(key, network or {}, names))

    def save(self, epoch: int, current_iter: int) -> None:
        # Every rank enters save(); only rank 0 writes. Gather each rank's RNG state first so a
        # distributed resume gives every rank its own stream back (SRModel.save does the rest).
        self._rng_states = [capture_rng_state()]
        if self.opt.get('dist', False) and current_iter != -1:
            gathered: List[Any] = [None] * int(self.opt['world_size'])
            torch.distributed.all_gather_object(gathered, self._rng_states[0])
            self._rng_states = gathered
        super().save(epoch, current_iter)

    @master_only
    def save_training_state(self, epoch: int, current_iter: int) -> None:
        # Atomic, and with RNG + GradScaler states so a resumed run continues the same stream.
        if current_iter == -1:
            return
        state: Dict[str, Any] = {
            'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
            'schedulers': [s.state_dict() for s in self.schedulers],
            'rng': getattr(self, '_rng_states', None) or [capture_rng_state()],  # one entry per rank
        }
        if self.grad_scaler is not None:
            state['grad_scaler'] = self.grad_scaler.state_dict()
        atomic_torch_save(state, f"{self.opt['path']['training_states']}/{current_iter}.state")

    def resume_training(self, resume_state: Dict[str, Any]) -> None:
        # BasicSR restores optimisers/schedulers only (and lets the state's hyper-parameters win over
        # the option file); we add RNG, GradScaler, the option file's optimizer settings and the epoch fix.
        wanted = option_hyperparameters(self)  # as built from the option file, before the restore
        super().resume_training(resume_state)
        apply_option_hyperparameters(self, wanted, (self.opt.get('path') or {}).get('resume_state')
                                     or f"the training state of iteration {resume_state['iter']}")
        per_epoch = self.iters_per_epoch()  # builds the train dataset: before the RNG restore, in case it draws
        rng = resume_state.get('rng')
        if rng:
            rank, world = int(self.opt.get('rank', 0)), int(self.opt.get('world_size', 1))
            if len(rng) != world:
                get_root_logger().warning(f'Training state holds RNG states of {len(rng)} rank(s), this run has '
                                          f'{world}: data augmentation will not continue the same streams.')
            restore_rng_state(rng[rank % len(rng)])
        if self.grad_scaler is not None and 'grad_scaler' in resume_state:
            self.grad_scaler.load_state_dict(resume_state['grad_scaler'])
        it = int(resume_state['iter'])
        logger = get_root_logger()
        if per_epoch and it % per_epoch == 0 and resume_state['epoch'] < it // per_epoch:
            # Saved at the last iteration of an epoch: BasicSR's loop would replay that whole epoch.
            resume_state['epoch'] = it // per_epoch
        elif per_epoch and it % per_epoch:
            logger.warning(f'Resuming from iteration {it}, in the middle of an epoch ({per_epoch} iterations '
                           f'each): that epoch\'s data is replayed from its start, so the run will not match '
                           f'an uninterrupted one exactly.')

    def iters_per_epoch(self) -> Optional[int]:
        """Training iterations per epoch, as BasicSR's train loop computes them (None if unknown)."""
        from basicsr.data import build_dataset

        dataset_opt = (self.opt.get('datasets') or {}).get('train')
        if not dataset_opt:
            return None
        length = len(build_dataset(dataset_opt))
        enlarge = dataset_opt.get('dataset_enlarge_ratio', 1)
        world = int(self.opt.get('world_size', 1))
        batch = int(dataset_opt['batch_size_per_gpu'])
        if not self.opt.get('dist', False):
            batch *= max(int(self.opt.get('num_gpu', 0) or 0), 1)
        # EnlargedSampler yields ceil(len * enlarge / world) indices per rank and the train loader drops
        # the last incomplete batch (BasicSR's logged "iter number per epoch" ignores that drop).
        return math.ceil(length * enlarge / world) // batch


@registers(MODEL_REGISTRY)
class MambaCSRModel(CSRModel):
    """MambaCSR training/testing. Pads to the arch's ``pad_multiple`` (scan windows, cross-scale)."""


@registers(MODEL_REGISTRY)
class HATModel(CSRModel):
    """HAT training/testing. Pads to ``window_size`` (reflect, the arch's ``pad_multiple``), as the official
    ``HATModel`` does; the official files' top-level ``tile`` runs HAT's own hard-cropped tiles."""
