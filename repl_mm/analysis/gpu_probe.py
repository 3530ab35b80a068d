"""What a training or test run of ``tools/gpu_check.py`` leaves behind for
the check to verify: :class:`GpuCheckProbe`, a hook that writes one JSON
file per rank and phase, ``<work_dir>/gpu_check_probe/<phase>_rank<r>.json``.

A check's config imports this module (``custom_imports``) and adds the
hook (``custom_hooks=[dict(type='GpuCheckProbe')]``). What it records:

- ``train``: rank, world size, process-group backend, the device of the
  model's parameters, the optim wrapper's class, the iteration and epoch
  at the end, the last training loss, the number of SyncBatchNorm layers,
  the backbone's class and RepL sites, whether every parameter is finite,
  and SHA-256 digests of the parameters when training starts (after any
  checkpoint is loaded) and when it ends;
- ``test``: rank, world size and the device of the parameters.

The digest covers every parameter's name, dtype, shape and values (BN
running statistics are buffers and are left out: without SyncBN they
differ between ranks by design).
"""
import hashlib
import json
import os
import os.path as osp
from typing import Optional

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

PROBE_DIR = 'gpu_check_probe'


def probe_path(work_dir: str, phase: str, rank: int = 0) -> str:
    """Where :class:`GpuCheckProbe` writes ``phase`` of ``rank``."""
    return osp.join(work_dir, PROBE_DIR, f'{phase}_rank{rank}.json')


def read_probe(work_dir: str, phase: str, rank: int = 0) -> dict:
    """The probe file of ``phase`` and ``rank``.

    Raises:
        FileNotFoundError: If the run wrote none (it did not reach the end
            of that phase, or the config lacks the hook).
    """
    path = probe_path(work_dir, phase, rank)
    if not osp.isfile(path):
        raise FileNotFoundError(f'no probe file {path}: the run did not '
                                f'finish its {phase} phase')
    with open(path) as f:
        return json.load(f)


def param_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's name, dtype, shape and values (on the
    CPU, so the digest of equal weights does not depend on the device)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to('cpu').contiguous()
        h.update(f'{name}:{t.dtype}:{tuple(t.shape)};'.encode())
        h.update(
            t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel(
            ) else b'')
    return h.hexdigest()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def _backend() -> Optional[str]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return None


def _device(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return 'none' if p is None else str(p.device)


def _last_loss(runner) -> Optional[float]:
    try:
        return float(runner.message_hub.get_scalar('train/loss').current())
    except (KeyError, AttributeError, TypeError, ValueError):
        return None


@HOOKS.register_module()
class GpuCheckProbe(Hook):
    """Write the run's facts for ``tools/gpu_check.py`` (module doc)."""

    priority = 'LOWEST'

    def __init__(self):
        self._start = None

    def _write(self, runner, phase: str, info: dict):
        rank = get_rank()
        path = probe_path(runner.work_dir, phase, rank)
        os.makedirs(osp.dirname(path), exist_ok=True)
        info = dict(
            phase=phase,
            rank=rank,
            world_size=get_world_size(),
            backend=_backend(),
            **info)
        with open(path, 'w') as f:
            json.dump(info, f, indent=1)

    def before_train(self, runner) -> None:
        self._start = param_digest(_unwrap(runner.model))

    def after_train(self, runner) -> None:
        model = _unwrap(runner.model)
        backbone = getattr(model, 'backbone', None)
        plan = getattr(backbone, 'replacement_plan', None)
        sites = [] if plan is None or plan.mode == 'none' else list(
            plan.indices)
        self._write(
            runner, 'train',
            dict(
                device=_device(model),
                optim_wrapper=type(runner.optim_wrapper).__name__,
                iter=runner.iter,
                epoch=runner.epoch,
                loss=_last_loss(runner),
                syncbn=sum(
                    isinstance(m, nn.SyncBatchNorm) for m in model.modules()),
                backbone=type(backbone).__name__,
                sites=sites,
                finite=all(
                    bool(torch.isfinite(p).all()) for p in model.parameters()),
                params_start=self._start,
                params_end=param_digest(model)))

    def after_test(self, runner) -> None:
        self._write(runner, 'test',
                    dict(device=_device(_unwrap(runner.model))))


__all__ = [
    'GpuCheckProbe', 'PROBE_DIR', 'param_digest', 'probe_path', 'read_probe'
]
