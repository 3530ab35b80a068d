"""Recompute under data parallelism: a site re-runs its norm in backward,
which with SyncBN is one more collective per site and step, so every rank
must recompute the same sites in the same order (or the ranks' collectives
pair up wrongly and hang).

SyncBN has no CPU kernels, so the 2 gloo processes here replace every BN
of a RepL ResNet-20 by a proxy that normalises with the statistics of the
global batch, all-reduced as SyncBN does, and records each call."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WORKER = '''
import datetime
import json
import multiprocessing
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# imported and built once, before the ranks fork
from repl_mm.models.cls_resnet import RepLResNet_CIFAR

PHASE, CALLS = ['forward'], []


class ProxySyncBN(nn.BatchNorm2d):
    """Normalise with the global batch's statistics (one all_reduce per
    training call, like SyncBN's all_gather); record the call."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        CALLS.append([PHASE[0], self.proxy_name])
        c = x.size(1)
        d = x.detach()
        stats = torch.cat([d.sum((0, 2, 3)), (d * d).sum((0, 2, 3)),
                           torch.tensor([d.numel() / c])])
        dist.all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False,
                            0.0, self.eps)


torch.manual_seed(0)
model = RepLResNet_CIFAR(depth=20)
for name, m in model.named_modules():
    if type(m) is nn.BatchNorm2d:
        m.__class__, m.proxy_name = ProxySyncBN, name
sites = [f'{n}.site_norm' for n, m in model.named_modules()
         if hasattr(m, 'site_norm') and getattr(m, 'recompute', False)]
model.train()


def rank_main(rank, out):
    # a divergence fails in a minute rather than hanging
    dist.init_process_group('gloo', rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optim = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # each rank its own batch
    steps = []
    for step in range(2):
        del CALLS[:]
        y = ddp(torch.rand(4, 3, 16, 16))[-1]
        PHASE[0] = 'backward'
        y.pow(2).mean().backward()
        PHASE[0] = 'forward'
        optim.step()
        optim.zero_grad()
        steps.append(list(CALLS))
    with open(f'{out}/{rank}.json', 'w') as f:
        json.dump(dict(sites=sites, steps=steps), f)
    dist.destroy_process_group()


if __name__ == '__main__':
    fork = multiprocessing.get_context('fork')
    ranks = [fork.Process(target=rank_main, args=(r, sys.argv[1]))
             for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
    sys.exit(max(abs(p.exitcode or 0) for p in ranks)
             if all(p.exitcode is not None for p in ranks) else 124)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ranks_recompute_the_same_sites_in_the_same_order(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(textwrap.dedent(WORKER))
    env = {
        **os.environ, 'MASTER_ADDR': '127.0.0.1',
        'MASTER_PORT': str(free_port()),
        'OMP_NUM_THREADS': '1'
    }
    out = subprocess.run(
        [sys.executable, str(script),
         str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (
        json.loads((tmp_path / f'{r}.json').read_text()) for r in range(2))
    assert r0['sites'] and r0['sites'] == r1['sites']
    for s0, s1 in zip(r0['steps'], r1['steps']):
        assert s0 == s1  # the same collectives, in the same order
        recomputed = [name for phase, name in s0 if phase == 'backward']
        # each recomputing site's norm re-runs once in backward, and
        # nothing else does
        assert sorted(recomputed) == sorted(r0['sites'])
