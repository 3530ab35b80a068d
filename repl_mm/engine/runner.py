"""``RepLRunner``: mmengine's ``Runner`` that loads its own checkpoints
under torch >= 2.6 (see :mod:`.checkpoint_globals`), refuses checkpoints
loaded onto the meta device, lets hooks gather per-rank state before a
checkpoint is saved, and trains with DDP on CPU-only machines (gloo)."""
import os
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..apis import scope_of
from .checkpoint_globals import allow_mmengine_checkpoints

#: Where each launcher's processes find their local rank (the GPU they
#: drive) when ``LOCAL_RANK`` (torchrun's) is not set, in lookup order.
LOCAL_RANK_ENV = {
    'mpi': (
        'OMPI_COMM_WORLD_LOCAL_RANK',  # OpenMPI
        'MPI_LOCALRANKID',  # MPICH, Intel MPI (Hydra)
        'SLURM_LOCALID'),  # MPI processes started by srun
    'slurm': ('SLURM_LOCALID', ),
}


def infer_local_rank(launcher: str,
                     default: int = 0,
                     environ: Optional[Mapping[str, str]] = None) -> int:
    """The local rank of this process: ``LOCAL_RANK`` (torchrun, and
    ``torch.distributed.launch``), else the launcher's own variable (see
    :data:`LOCAL_RANK_ENV`), else ``default`` (``--local-rank``).

    mmengine wraps the model in DDP with ``device_ids=[LOCAL_RANK]``;
    ``tools/train.py`` and ``tools/test.py`` export the result as
    ``LOCAL_RANK`` when it is unset, so under ``mpirun`` every rank drives
    its own GPU instead of all driving GPU 0.

    Args:
        launcher (str): ``--launcher``: 'none', 'pytorch', 'slurm' or
            'mpi'.
        default (int): The rank when no variable names one. Defaults to 0.
        environ (Mapping, optional): The environment. Defaults to
            ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    for name in ('LOCAL_RANK', ) + LOCAL_RANK_ENV.get(launcher, ()):
        value = environ.get(name, '').strip()
        if not value:
            continue
        try:
            rank = int(value)
        except ValueError:
            rank = -1
        if rank < 0:
            raise ValueError(f'--launcher {launcher}: {name}={value!r} is '
                             'not a local rank (an integer >= 0)')
        return rank
    return default


def meta_tensors(obj, path: str = 'checkpoint') -> Iterator[str]:
    """Where ``obj`` (nested dicts, lists and tuples) holds tensors on the
    meta device, as ``checkpoint['state_dict']['conv.weight']`` paths."""
    if torch.is_tensor(obj):
        if obj.is_meta:
            yield path
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from meta_tensors(v, f'{path}[{k!r}]')
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from meta_tensors(v, f'{path}[{i}]')


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


def destroy_distributed() -> None:
    """End the default process group, after a barrier, if there is one.

    ``tools/train.py`` and ``tools/test.py`` call it when the run is done:
    mmengine never ends the group, and a gloo rank whose group outlives
    Python's shutdown can abort ("terminate called without an active
    exception"), which torchrun reports as a failed run.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@RUNNERS.register_module()
class RepLRunner(Runner):
    """mmengine ``Runner`` whose checkpoint loading (``load_from``,
    ``resume``, and the checkpoint of ``test()``) allow-lists exactly the
    globals mmengine 0.10.7 pickles into its training checkpoints.

    Every rank calls :meth:`save_checkpoint` (``CheckpointHook`` does);
    before mmengine's rank-0 save it runs the hooks'
    ``before_save_checkpoint_all_ranks(runner)`` on every rank, where a
    hook may run collectives (``RNGStateHook`` gathers each rank's random
    state). :meth:`resume` ends with the hooks' ``after_resume(runner)``.
    A checkpoint loaded onto the meta device (``map_location=
    'meta'``) holds no data to load or resume from: :meth:`load_checkpoint`
    (so ``resume`` and ``load_from``) raises a ``ValueError`` naming the
    first meta tensor, before any hook or the model sees it.

    On a machine without CUDA, a distributed run wraps the model in DDP
    without ``device_ids`` (DDP rejects them for CPU modules) and reverts
    SyncBN to BN (gloo has no SyncBN kernels); call
    :func:`init_cpu_distributed` before building the runner.

    ``tools/train.py`` and ``tools/test.py`` use it unless the config names
    a ``runner_type``; other tools can set ``runner_type='RepLRunner'``.
    """

    #: (filename, map_location) while :meth:`load_checkpoint` runs
    _loading: Optional[tuple] = None

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

    def save_checkpoint(self, *args, **kwargs):
        """mmengine's ``save_checkpoint`` (rank 0 writes), after the hooks'
        ``before_save_checkpoint_all_ranks`` ran on every rank: mmengine
        runs ``before_save_checkpoint`` on rank 0 only, where a collective
        would hang."""
        self.call_hook('before_save_checkpoint_all_ranks')
        return super().save_checkpoint(*args, **kwargs)

    def resume(self, *args, **kwargs) -> None:
        """mmengine's ``resume``, then the hooks' ``after_resume(runner)``:
        mmengine re-seeds every generator at the end of ``resume`` when the
        config's seed differs from the checkpoint's (``randomness.seed=
        None``), after ``after_load_checkpoint`` restored them
        (``RNGStateHook`` restores them again). While it runs,
        ``self.resuming`` is True, also when called directly rather than
        for ``resume=True``."""
        self.resuming = True
        try:
            super().resume(*args, **kwargs)
        finally:
            self.resuming = False
        self.call_hook('after_resume')

    def load_checkpoint(self,
                        filename: str,
                        map_location='cpu',
                        strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):
        """mmengine's ``load_checkpoint`` (same arguments), run with our
        checkpoints' globals allowed; a checkpoint on the meta device is
        refused before any hook sees it (:meth:`call_hook`)."""
        self._loading = (filename, map_location)
        try:
            with allow_mmengine_checkpoints():
                return super().load_checkpoint(filename, map_location, strict,
                                               revise_keys)
        finally:
            self._loading = None

    def call_hook(self, fn_name: str, **kwargs) -> None:
        """mmengine's ``call_hook``. Before the hooks'
        ``after_load_checkpoint`` (the first thing mmengine does with a
        loaded checkpoint, before the model loads it), a ``ValueError``
        naming the first tensor on the meta device, if there is one."""
        if fn_name == 'after_load_checkpoint':
            meta = next(meta_tensors(kwargs['checkpoint']), None)
            if meta is not None:
                filename, map_location = self._loading or ('a checkpoint',
                                                           None)
                raise ValueError(
                    f'map_location={map_location!r}: {filename} was loaded '
                    f'onto the meta device (first meta tensor: {meta}), '
                    'which holds no data to load or resume from; use '
                    "map_location='cpu' or a real device")
        super().call_hook(fn_name, **kwargs)


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
    scope_of(cfg)  # raises unless the scope is one of repl_mm.apis.SCOPES
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
