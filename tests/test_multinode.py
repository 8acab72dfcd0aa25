"""Multi-node training: two torchrun "nodes" on this host (c10d rendezvous, gloo) train a tiny MambaCSR.

Each node is its own ``torchrun --nnodes=2 --nproc_per_node=1`` process, as on two machines; they meet at
one rendezvous endpoint, so the world has 2 ranks on 2 nodes. Rank 0 writes the experiment folder.
"""
from __future__ import annotations

import os.path as osp
import socket
import sys

import pytest
import torch

from helpers_images import make_image_folder
from test_train_cli import finish, log_text, psnr_lines, start, train_options, write_yaml

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('localhost', 0))
        return sock.getsockname()[1]


def test_two_nodes_train_and_save(tmp_path) -> None:
    gt_dir = tmp_path / 'gt'
    make_image_folder(gt_dir, names=('astronaut', 'chelsea', 'coffee', 'rocket'), size=(48, 48))
    opt_path = write_yaml(str(tmp_path / 'multinode.yml'),
                          train_options('multinode', str(gt_dir), total_iter=2, save_freq=2, val_freq=2))
    torchrun = osp.join(osp.dirname(sys.executable), 'torchrun')
    endpoint = f'localhost:{free_port()}'
    nodes = [start([torchrun, '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d',
                    f'--rdzv-endpoint={endpoint}', '--rdzv-id=mambacsr-multinode', '--max-restarts=0',
                    '-m', 'mambacsr_arch.train', '-opt', opt_path, '--launcher', 'pytorch'], str(tmp_path))
             for _ in range(2)]
    results = [finish(node, check=False) for node in nodes]
    for result in results:
        assert result.returncode == 0, f'{result.args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    exp = tmp_path / 'experiments' / 'multinode'
    log = log_text(str(exp))
    assert 'World size (gpu number): 2' in log
    assert psnr_lines(log), 'rank 0 validated'
    saved = torch.load(exp / 'models' / 'net_g_2.pth', weights_only=True)
    assert saved['params'] and not any(k.startswith('module.') for k in saved['params'])
    assert (exp / 'training_states' / '2.state').is_file()
    assert sorted(p.name for p in (tmp_path / 'experiments').iterdir()) == ['multinode']  # not one per node
