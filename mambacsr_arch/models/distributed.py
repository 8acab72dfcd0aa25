"""Device placement and data-parallel wrapping that works on CPU as well as CUDA.

BasicSR 1.4.2's ``BaseModel.model_to_device`` always passes
``device_ids=[torch.cuda.current_device()]`` to DistributedDataParallel, which fails on a CPU
(gloo) process group. :func:`model_to_device` is a drop-in replacement with the same signature
(it takes the model as ``self``), used by our model classes and patched into BasicSR's
``BaseModel`` by the CLI runtime.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def model_to_device(self: Any, net: nn.Module) -> nn.Module:
    """Move ``net`` to ``self.device`` and wrap it for data parallelism.

    * ``opt['dist']``: DistributedDataParallel; ``device_ids=[current CUDA device]`` when
      ``self.device`` is CUDA, no ``device_ids`` on CPU (gloo). ``find_unused_parameters`` is read
      from ``opt['find_unused_parameters']`` (default False).
    * else ``opt['num_gpu'] > 1`` (CUDA only): DataParallel.
    * else the bare module.

    Args:
        self: any object with ``opt`` (BasicSR option dict) and ``device`` (torch.device).
        net: the network to place.
    """
    opt = self.opt
    device = torch.device(self.device)
    net = net.to(device)
    if opt.get('dist', False):
        find_unused = bool(opt.get('find_unused_parameters', False))
        if device.type == 'cuda':
            net = DistributedDataParallel(
                net, device_ids=[torch.cuda.current_device()], find_unused_parameters=find_unused)
        else:
            net = DistributedDataParallel(net, find_unused_parameters=find_unused)
    elif device.type == 'cuda' and int(opt.get('num_gpu', 0) or 0) > 1:
        net = DataParallel(net)
    return net


def get_bare_model(net: nn.Module) -> nn.Module:
    """Unwrap DataParallel / DistributedDataParallel; other modules are returned as they are."""
    if isinstance(net, (DataParallel, DistributedDataParallel)):
        return net.module
    return net
