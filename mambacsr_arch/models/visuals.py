"""What a validation run can show besides numbers: side-by-side comparisons and metric curves.

Used by :meth:`mambacsr_arch.models.csr_model.CSRModel.validation` (rank 0) when the option file asks::

    val:
      save_comparisons: true   # <visualization>/comparisons/<dataset>/<image>_<iter>_bicubic<dB>_<arch><dB>.png:
                               # bicubic-upsampled LQ | network output | GT, PSNR of each drawn above it
      plot_metrics: true       # <visualization>/curves/<dataset>_<metric>.png, redrawn at every validation:
                               # network vs bicubic baseline over iterations (true: every val.metrics entry,
                               # or a list of val.metrics names); the numbers in curves/history.json

``<visualization>`` is BasicSR's ``path.visualization`` (``experiments/<name>/visualization`` when
training). Drawing uses OpenCV only (no matplotlib dependency). Files are written through a
temporary name and renamed, so a reader never sees half a PNG.
"""
from __future__ import annotations

import json
import math
import os
import os.path as osp
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from basicsr.metrics import calculate_metric
from basicsr.utils import tensor2img

from ..fileio import write_bytes_atomic, write_image_atomic

__all__ = ['bicubic_upsample', 'comparison_panel', 'metric_label', 'metric_plot', 'plot_metric_names', 'psnr_option',
           'record_metrics', 'save_comparisons', 'save_metric_plots', 'write_png']

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE, _BLACK, _GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
_NETWORK_COLOUR, _BASELINE_COLOUR = (180, 90, 20), (40, 120, 230)  # BGR: blue, orange
HISTORY_FILE = 'history.json'


# ------------------------------------------------------------------------------------------ helpers
def bicubic_upsample(lq: torch.Tensor, scale: int, gt: torch.Tensor) -> torch.Tensor:
    """The baseline: ``lq`` (B, C, h, w) bicubic-upsampled by ``scale``, cut to ``gt``'s size, in [0, 1]."""
    up = F.interpolate(lq.float(), scale_factor=scale, mode='bicubic', align_corners=False)
    return up[..., :gt.shape[-2], :gt.shape[-1]].clamp(0, 1)


def write_png(path: str, img: np.ndarray) -> None:
    """Write ``img`` (uint8 BGR) to ``path`` atomically; an OSError names the path when it fails."""
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    write_image_atomic(path, img)  # the project's one image writer (encode by extension, atomic)


def metric_label(metric_opt: Mapping[str, Any]) -> str:
    """A short axis/caption label of a ``val.metrics`` entry, e.g. ``PSNR(Y) (dB)``, ``SSIM(Y)``."""
    kind = str(metric_opt.get('type', 'metric')).replace('calculate_', '').upper()
    label = f"{kind}({'Y' if metric_opt.get('test_y_channel') else 'RGB'})"
    return f'{label} (dB)' if kind == 'PSNR' else label


def psnr_option(val_opt: Mapping[str, Any], scale: int) -> Tuple[Dict[str, Any], str]:
    """The PSNR metric options of ``val.metrics`` (its ``calculate_psnr`` entry) and a caption label.

    Without such an entry: PSNR on the Y channel with ``crop_border = scale``, the CSR convention.
    """
    for metric_opt in ((val_opt.get('metrics') or {}).values()):
        if isinstance(metric_opt, Mapping) and metric_opt.get('type') == 'calculate_psnr':
            chosen = dict(metric_opt)
            break
    else:
        chosen = {'type': 'calculate_psnr', 'crop_border': scale, 'test_y_channel': True}
    return chosen, metric_label(chosen)[:-len(' (dB)')]


def plot_metric_names(val_opt: Mapping[str, Any]) -> List[str]:
    """Metrics named by ``val.plot_metrics`` (true: all of ``val.metrics``); ValueError names a bad entry."""
    wanted = val_opt.get('plot_metrics')
    metrics = list((val_opt.get('metrics') or {}).keys())
    if not wanted:
        return []
    if not metrics:
        raise ValueError('val.plot_metrics needs val.metrics (e.g. psnr: {type: calculate_psnr, crop_border: 4, '
                         'test_y_channel: true}) to have something to plot.')
    if wanted is True:
        return metrics
    names = [wanted] if isinstance(wanted, str) else wanted
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f'val.plot_metrics must be true or a list of val.metrics names, got {wanted!r}.')
    unknown = [n for n in names if n not in metrics]
    if unknown:
        raise ValueError(f"val.plot_metrics: {', '.join(unknown)} not in val.metrics ({', '.join(metrics)}).")
    return list(names)


def _iter_label(current_iter: Any) -> str:
    return f'{current_iter:06d}' if isinstance(current_iter, int) else str(current_iter)


def _put(img: np.ndarray, text: str, org: Tuple[int, int], scale: float = 0.42, colour=_BLACK,
         thickness: int = 1) -> None:
    cv2.putText(img, text, org, _FONT, scale, colour, thickness, cv2.LINE_AA)


def _text_width(text: str, scale: float = 0.42, thickness: int = 1) -> int:
    return cv2.getTextSize(text, _FONT, scale, thickness)[0][0]


# ------------------------------------------------------------------------------------------ comparisons
def comparison_panel(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], gap: int = 4,
                     min_width: int = 200) -> np.ndarray:
    """Images (uint8 BGR, same height) side by side on white, each under its caption lines.

    Images narrower than ``min_width`` are enlarged by an integer factor, pixel replication (every
    pixel an exact block), so the captions fit and the pixels stay the compared ones.
    """
    if len(images) != len(captions):
        raise ValueError(f'comparison_panel: {len(images)} images but {len(captions)} captions')
    zoom = max(1, math.ceil(min_width / min(img.shape[1] for img in images)))
    if zoom > 1:
        images = [np.repeat(np.repeat(img, zoom, axis=0), zoom, axis=1) for img in images]
    height = max(img.shape[0] for img in images)
    lines = max(len(c) for c in captions)
    band = 8 + 16 * lines
    width = sum(img.shape[1] for img in images) + gap * (len(images) - 1)
    canvas = np.full((band + height, width, 3), 255, np.uint8)
    left = 0
    for img, caption in zip(images, captions):
        w = img.shape[1]
        canvas[band:band + img.shape[0], left:left + w] = img
        cell = canvas[:band, left:left + w]  # a view: text is clipped at the image's own column
        for i, line in enumerate(caption):
            _put(cell, line, (3, 16 * (i + 1)))
        left += w + gap
    return canvas


def save_comparisons(model, dataloader, current_iter: Any, folder: str, label: str = 'network') -> List[str]:
    """Write one comparison PNG per image of ``dataloader`` into ``folder``; return the paths.

    ``model`` is a BasicSR SR model (``feed_data``, ``test``, ``output``, ``opt``). Images without GT are
    skipped (nothing to compare with). Left to right: bicubic-upsampled LQ, ``label``'s output, GT,
    with the PSNR of the first two in the caption and in the file name.
    """
    scale = int(model.opt['scale'])
    metric_opt, metric_label = psnr_option(model.opt.get('val') or {}, scale)
    paths = []
    for data in dataloader:
        if 'gt' not in data:
            continue
        name = osp.splitext(osp.basename(data['lq_path'][0]))[0]
        model.feed_data(data)
        model.test()
        gt = tensor2img([model.gt.detach().cpu()])
        out = tensor2img([model.output.detach().cpu()])
        up = tensor2img([bicubic_upsample(model.lq.detach().cpu(), scale, model.gt)])
        del model.lq, model.gt, model.output
        psnr_up = float(calculate_metric({'img': up, 'img2': gt}, metric_opt))
        psnr_out = float(calculate_metric({'img': out, 'img2': gt}, metric_opt))
        panel = comparison_panel([up, out, gt], [
            ['bicubic LQ (input)', f'{metric_label} {psnr_up:.2f} dB'],
            [f'{label}, iter {_iter_label(current_iter).lstrip("0") or "0"}',
             f'{metric_label} {psnr_out:.2f} dB ({psnr_out - psnr_up:+.2f})'],
            ['GT', name]])
        path = osp.join(folder, f'{name}_{_iter_label(current_iter)}_bicubic{psnr_up:.2f}dB_'
                                f'{label}{psnr_out:.2f}dB.png')
        write_png(path, panel)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ curves
def _nice_step(span: float, target_ticks: int = 5) -> float:
    raw = span / max(target_ticks, 1)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power


def _ticks(low: float, high: float, target: int = 5) -> List[float]:
    step = _nice_step(high - low, target)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _tick_label(value: float, step: float) -> str:
    decimals = 0  # as many as the step needs (2.5 -> 1, 0.05 -> 2)
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f'{value:.{decimals}f}'


def metric_plot(series: Mapping[str, Sequence[Tuple[float, float]]], title: str, y_label: str,
                size: Tuple[int, int] = (420, 680)) -> np.ndarray:
    """A line plot (uint8 BGR ``size``) of named (x, y) series: axes, ticks, grid, markers, legend.

    The first series is drawn in blue with markers, the second in orange (e.g. network, baseline);
    a series with one point is drawn as a horizontal line over the x range when others have more.
    """
    height, width = size
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 66, 52  # title, legend and y label above the axes
    points = [p for s in series.values() for p in s]
    if not points:
        raise ValueError(f'metric_plot({title!r}): no points to plot')
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = min(ys), max(ys)
    pad = max((y_hi - y_lo) * 0.08, 0.05 if y_hi - y_lo < 1 else 0.2, 1e-6)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_px(x: float, y: float) -> Tuple[int, int]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return int(round(px)), int(round(py))

    x0, y0 = to_px(x_lo, y_lo)
    x1, y1 = to_px(x_hi, y_hi)
    for tick in _ticks(y_lo, y_hi):
        _, py = to_px(x_lo, tick)
        cv2.line(img, (x0, py), (x1, py), _GREY, 1)
        text = _tick_label(tick, _nice_step(y_hi - y_lo))
        _put(img, text, (x0 - 6 - _text_width(text, 0.4), py + 4), 0.4)
    for tick in _ticks(x_lo, x_hi):
        px, _ = to_px(tick, y_lo)
        cv2.line(img, (px, y0), (px, y0 + 4), _BLACK, 1)
        text = f'{tick:g}'
        _put(img, text, (px - _text_width(text, 0.4) // 2, y0 + 18), 0.4)
    cv2.rectangle(img, (x0, y1), (x1, y0), _BLACK, 1)
    _put(img, title, (10, 20), 0.5)
    _put(img, y_label, (10, top - 8), 0.42)
    _put(img, 'iteration', ((x0 + x1) // 2 - _text_width('iteration') // 2, height - 12))

    colours = [_NETWORK_COLOUR, _BASELINE_COLOUR, (60, 160, 60), (160, 60, 160)]
    longest = max(len(s) for s in series.values())
    legend_x = left
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        pts = sorted((float(x), float(y)) for x, y in pts)
        if len(pts) == 1 and longest > 1:
            pts = [(x_lo, pts[0][1]), (x_hi, pts[0][1])]
        pixels = np.array([to_px(x, y) for x, y in pts], np.int32)
        if len(pixels) > 1:
            cv2.polylines(img, [pixels.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        if i == 0 or len(pixels) == 1:
            for px in pixels:
                cv2.circle(img, (int(px[0]), int(px[1])), 3, colour, -1, cv2.LINE_AA)
        last = f'{name}: {pts[-1][1]:.3f}'  # legend in one row under the title, with the latest value
        cv2.line(img, (legend_x, 38), (legend_x + 24, 38), colour, 2)
        _put(img, last, (legend_x + 30, 42))
        legend_x += 30 + _text_width(last) + 24
    return img


def record_metrics(folder: str, dataset: str, current_iter: int, network: Mapping[str, float],
                   baseline: Mapping[str, float]) -> Dict[str, Any]:
    """Add this validation's numbers to ``folder/history.json``; return the dataset's history.

    History entries at ``current_iter`` or later (left by a run that was resumed from an earlier state)
    are dropped first, so a resumed run's curve has no future points.
    """
    path = osp.join(folder, HISTORY_FILE)
    history: Dict[str, Any] = {}
    if osp.isfile(path):
        try:
            with open(path, encoding='utf-8') as f:
                history = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f'{path} is not readable JSON ({err}); delete it to start the curves afresh.') from err
    entry = history.setdefault(dataset, {})
    for metric, value in network.items():
        record = entry.setdefault(metric, {'network': [], 'baseline': None})
        record['network'] = [p for p in record['network'] if p[0] < current_iter] + [[current_iter, float(value)]]
        if metric in baseline:
            record['baseline'] = float(baseline[metric])
    os.makedirs(folder, exist_ok=True)
    write_bytes_atomic(path, json.dumps(history, indent=1).encode('utf-8'))
    return entry


def save_metric_plots(folder: str, dataset: str, entry: Mapping[str, Any], label: str = 'network',
                      metric_labels: Optional[Mapping[str, str]] = None) -> List[str]:
    """Draw ``<folder>/<dataset>_<metric>.png`` for every metric of ``entry`` (from :func:`record_metrics`);
    ``metric_labels`` maps metric names to axis labels (default: the names)."""
    paths = []
    for metric, record in entry.items():
        series = {label: [tuple(p) for p in record['network']]}
        if record.get('baseline') is not None:
            series['bicubic baseline'] = [(p[0], record['baseline']) for p in record['network']]
        y_label = (metric_labels or {}).get(metric, metric)
        img = metric_plot(series, f'{y_label} on {dataset}: {label} vs bicubic-upsampled LQ', y_label)
        path = osp.join(folder, f'{dataset}_{metric}.png')
        write_png(path, img)
        paths.append(path)
    return paths
