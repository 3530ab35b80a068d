"""Exact kill-and-resume: the random state travels with the checkpoint.

``checkpoint['rng_state']`` is a list with one entry per rank (entry ``r``
is rank ``r``'s state); each entry is a dict of the Python, numpy and torch
CPU generator states and, where CUDA is in use, the state of the rank's
current CUDA device. Checkpoints written before held a single dict (the
saving process's state, with every CUDA device's); they still load, as the
entry of rank 0.
"""
import logging
import random
from typing import List, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import (all_gather_object, get_rank, get_world_size,
                           is_main_process)
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

KEY = 'rng_state'


def get_rng_state() -> dict:
    """Python, numpy, torch (and current CUDA device) generator states as
    plain types and tensors, loadable with ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state(legacy=False)
    np_state['state']['key'] = np_state['state']['key'].tolist()
    state = dict(
        python=random.getstate(), numpy=np_state, torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _host(tensor, where: str) -> torch.Tensor:
    """``tensor`` on the CPU, as ``torch.set_rng_state`` needs it (a
    checkpoint loaded with ``map_location='cuda'``, as mmengine's ``resume``
    does on a GPU, puts it on the GPU); a clear error for a meta tensor,
    which holds no state to restore."""
    if not torch.is_tensor(tensor):
        raise TypeError(f'{where}: an RNG state must be a tensor, but got '
                        f'{type(tensor).__name__}')
    if tensor.is_meta:
        raise ValueError(
            f'{where} is on the meta device (a checkpoint loaded with '
            "map_location='meta'), which holds no data: the RNG state "
            "cannot be restored; load the checkpoint with map_location='cpu' "
            'or onto a real device')
    return tensor.cpu()


def set_rng_state(state: dict, where: str = KEY):
    """Inverse of :func:`get_rng_state`, for states on any device with data
    (``where`` names ``state`` in errors). Of a state of every CUDA device
    (the single-dict format), only the current device's is restored."""
    cpu = _host(state['torch'], f"{where}['torch']")
    cuda = state.get('cuda') if torch.cuda.is_available() else None
    if cuda is not None:
        device = torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # every device of the process
            if device >= len(cuda):
                print_log(
                    f'{where} holds the CUDA RNG states of {len(cuda)} '
                    f'devices, none for cuda:{device}: it keeps its seed',
                    logger='current',
                    level=logging.WARNING)
                cuda = None
            else:
                cuda = _host(cuda[device], f"{where}['cuda'][{device}]")
        else:
            cuda = _host(cuda, f"{where}['cuda']")
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = {**state['numpy']}
    np_state['state'] = {
        **np_state['state'], 'key':
        np.asarray(np_state['state']['key'], dtype=np.uint32)
    }
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _ranks(start: int, stop: int, one: str, many: str) -> str:
    """``one`` or ``many`` about ranks ``start`` to ``stop - 1``."""
    if stop - start == 1:
        return one.format(f'rank {start}')
    return many.format(f'ranks {start}-{stop - 1}')


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the random state of every rank in every checkpoint and restore
    it on resume, so a run killed after a checkpoint and resumed ends with
    the weights of an uninterrupted run (mmengine 0.10.7 stores no RNG
    state).

    mmengine writes checkpoints on rank 0 only and runs
    ``before_save_checkpoint`` there, so the ranks' states are gathered
    earlier, in :meth:`before_save_checkpoint_all_ranks`, which
    :class:`~repl_mm.engine.RepLRunner` runs on every rank before it saves.
    Under another runner a distributed run saves rank 0's state only (with
    a warning). On resume, rank ``r`` restores entry ``r``: its CPU, numpy
    and Python generators and its current CUDA device's. Resuming on another
    number of processes than the checkpoint's, ranks without an entry keep
    the seed the runner gave them (``randomness``; one stream per rank with
    ``diff_rank_seed=True``) rather than reusing another rank's stream, and
    unused entries are ignored; every rank warns, since the run is then not
    bit-identical to an uninterrupted one. A checkpoint loaded onto the meta
    device (no data) raises a ``ValueError`` naming the entry. mmengine's
    ``resume`` re-seeds after loading when the config has no fixed seed;
    ``RepLRunner.resume`` then has :meth:`after_resume` restore the state
    again (another runner keeps mmengine's re-seeded state there).

    Validation and testing inside training draw from the same generators
    (data-loader seeds, random augmentation of test pipelines); this hook
    puts the state back after each validation, so the training stream is
    the same whether or not, and however often, validation runs, and a
    resumed run picks it up where the checkpoint left it. A checkpoint
    written during validation (``save_best``) holds the state from before
    it.

    Exactness holds for checkpoints at epoch boundaries of
    ``EpochBasedTrainLoop`` (mmengine restarts an interrupted epoch) or at
    any iteration of ``IterBasedTrainLoop``, with ``num_workers=0``;
    data-loader workers draw their own seeds from the restored state, so
    ``num_workers>0`` is exact too as long as their augmentation is seeded
    by mmengine's ``worker_init_fn`` (``randomness.seed`` set).
    Registered in mmengine's ``HOOKS``; ``tools/train.py`` adds it unless
    the config lists it.
    """

    priority = 'VERY_LOW'

    def __init__(self):
        self._val_state: Optional[dict] = None
        self._gathered: Optional[List[dict]] = None
        self._resumed: Optional[Tuple[dict, str]] = None
        self._warned = False

    def _training_state(self) -> dict:
        # inside validation, the training stream is where before_val left it
        if self._val_state is not None:
            return self._val_state
        return get_rng_state()

    def before_save_checkpoint_all_ranks(self, runner) -> None:
        """Gather every rank's state to rank 0 (a collective: every rank
        must call it, as ``RepLRunner.save_checkpoint`` does)."""
        states = all_gather_object(self._training_state())
        self._gathered = states if is_main_process() else None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        states, self._gathered = self._gathered, None
        if states is None:  # the runner gathered nothing: this rank's only
            states = [self._training_state()]
            if get_world_size() > 1 and not self._warned:
                self._warned = True
                print_log(
                    f'RNGStateHook: {type(runner).__name__} saves rank 0 '
                    "only, without gathering the other ranks' RNG states "
                    'first (RepLRunner does): on resume, the other ranks '
                    'keep their seeds',
                    logger='current',
                    level=logging.WARNING)
        checkpoint[KEY] = states

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not (getattr(runner, 'resuming', False)
                or getattr(runner, '_resume', False)):
            return  # load_from (fine-tuning): a new run, its own stream
        if KEY not in checkpoint:
            print_log(
                'resumed from a checkpoint without RNG state: the run '
                'continues, but not bit-identically to an uninterrupted one',
                logger='current',
                level=logging.WARNING)
            return
        states, where = checkpoint[KEY], f"checkpoint['{KEY}']"
        single = isinstance(states, dict)  # the format of one process
        if single:
            states = [states]
        rank, world_size = get_rank(), get_world_size()
        if len(states) != world_size:
            if world_size > len(states):
                fate = _ranks(
                    len(states), world_size, '{} keeps its seed',
                    '{} keep their seeds')
            else:
                fate = _ranks(world_size, len(states),
                              'the state of {} is unused',
                              'the states of {} are unused')
            print_log(
                f'resuming on {world_size} processes from a checkpoint with '
                f'the RNG states of {len(states)}: each rank restores its '
                f'own, {fate}; the run continues, but not bit-identically '
                'to an uninterrupted one',
                logger='current',
                level=logging.WARNING)
        if rank < len(states):
            self._resumed = (states[rank],
                             where if single else f'{where}[{rank}]')
            set_rng_state(*self._resumed)

    def after_resume(self, runner) -> None:
        """Restore the resumed state again: mmengine's ``resume`` re-seeds
        every generator after loading when the config's seed differs from
        the checkpoint's (``randomness.seed=None``, the default of mmdet's
        and mmseg's configs). ``RepLRunner.resume`` calls it last."""
        if self._resumed is not None:
            set_rng_state(*self._resumed)
        self._resumed = None

    def before_val(self, runner) -> None:
        self._val_state = get_rng_state()

    def after_val(self, runner) -> None:
        if self._val_state is not None:
            set_rng_state(self._val_state)
        self._val_state = None
