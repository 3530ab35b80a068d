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
