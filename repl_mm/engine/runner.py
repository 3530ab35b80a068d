"""``RepLRunner``: mmengine's ``Runner`` that loads its own checkpoints
under torch >= 2.6 (see :mod:`.checkpoint_globals`) and trains with DDP on
CPU-only machines (gloo)."""
import os

import torch
import torch.distributed as dist
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoint_globals import allow_mmengine_checkpoints


def init_cpu_distributed(launcher: str, backend: str = 'gloo') -> bool:
    """Initialise the process group for a CPU-only DDP run (torchrun env://)
    before mmengine would, since mmengine 0.10.7's ``init_dist`` calls
    ``torch.cuda.set_device``. Returns whether it did: only for
    ``launcher='pytorch'`` without CUDA; GPU runs keep mmengine's path
    (NCCL by default)."""
    if launcher != 'pytorch' or torch.cuda.is_available() or \
            dist.is_initialized():
        return False
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']))
    return True


@RUNNERS.register_module()
class RepLRunner(Runner):
    """mmengine ``Runner`` whose checkpoint loading (``load_from``,
    ``resume``, and the checkpoint of ``test()``) allow-lists exactly the
    globals mmengine 0.10.7 pickles into its training checkpoints.

    On a machine without CUDA, a distributed run wraps the model in DDP
    without ``device_ids`` (DDP rejects them for CPU modules) and reverts
    SyncBN to BN (gloo has no SyncBN kernels); call
    :func:`init_cpu_distributed` before building the runner.

    ``tools/train.py`` and ``tools/test.py`` use it unless the config names
    a ``runner_type``; other tools can set ``runner_type='RepLRunner'``.
    """

    def wrap_model(self, model_wrapper_cfg, model):
        if self.distributed and not torch.cuda.is_available():
            model = revert_sync_batchnorm(model)
            model_wrapper_cfg = dict(
                dict(
                    type='MMDistributedDataParallel',
                    broadcast_buffers=False,
                    find_unused_parameters=self.cfg.get(
                        'find_unused_parameters', False)),
                **(model_wrapper_cfg or {}),
                device_ids=None)
        return super().wrap_model(model_wrapper_cfg, model)

    def load_checkpoint(self, *args, **kwargs):
        with allow_mmengine_checkpoints():
            return super().load_checkpoint(*args, **kwargs)


SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def build_runner(cfg, train: bool) -> Runner:
    """The config's ``runner_type`` if it names one, else ``RepLRunner``.

    ``launcher='pytorch'`` on a machine without CUDA trains with DDP over
    gloo (see :class:`repl_mm.engine.RepLRunner`); GPU machines keep the
    config's ``env_cfg.dist_cfg`` (NCCL upstream).

    The codebase comes from ``default_scope`` (mmengine imports it and
    registers its modules). Training adds ``RNGStateHook`` (a resumed run
    continues the random stream) and ``RepLLoggerHook`` (per-site mixing
    weights in the log) unless the config lists them.
    """
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'default_scope must be one of {SCOPES}, but the '
                         f'config has {scope!r}')
    if train:
        hooks = list(cfg.get('custom_hooks', None) or [])
        for name in ('RNGStateHook', 'RepLLoggerHook'):
            if not any(h.get('type') == name for h in hooks):
                hooks.append(dict(type=name))
        cfg.custom_hooks = hooks
    launcher = cfg.get('launcher', 'none')
    if init_cpu_distributed(launcher):
        cfg.env_cfg.dist_cfg = dict(backend='gloo')
    cfg.setdefault('runner_type', 'RepLRunner')
    return RUNNERS.build(cfg)
