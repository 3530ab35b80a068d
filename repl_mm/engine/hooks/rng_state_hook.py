"""Exact kill-and-resume: the random state travels with the checkpoint."""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

KEY = 'rng_state'


def get_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as plain types and
    tensors, loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state(legacy=False)
    np_state['state']['key'] = np_state['state']['key'].tolist()
    state = dict(
        python=random.getstate(), numpy=np_state, torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    """Inverse of :func:`get_rng_state`."""
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = {**state['numpy']}
    np_state['state'] = {
        **np_state['state'], 'key': np.asarray(np_state['state']['key'],
                                               dtype=np.uint32)
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the random state in every checkpoint and restore it on resume,
    so a run killed after a checkpoint and resumed ends with the weights of
    an uninterrupted run (mmengine 0.10.7 stores no RNG state).

    Validation and testing inside training draw from the same generators
    (data-loader seeds, random augmentation of test pipelines); this hook
    puts the state back after each validation, so the training stream is
    the same whether or not, and however often, validation runs, and a
    resumed run picks it up where the checkpoint left it.

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

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[KEY] = get_rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return  # load_from (fine-tuning): a new run, its own stream
        if KEY in checkpoint:
            set_rng_state(checkpoint[KEY])
        else:
            print_log(
                'resumed from a checkpoint without RNG state: the run '
                'continues, but not bit-identically to an uninterrupted one',
                logger='current',
                level='WARNING')

    def before_val(self, runner) -> None:
        self._val_state = get_rng_state()

    def after_val(self, runner) -> None:
        if self._val_state is not None:
            set_rng_state(self._val_state)
        self._val_state = None
