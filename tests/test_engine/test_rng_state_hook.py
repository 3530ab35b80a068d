"""RNGStateHook on one process: device-independent restore (a GPU resume
loads the checkpoint onto the GPU; the meta device stands in for it here),
the per-rank list format and the single-dict format of earlier
checkpoints, resuming on another number of processes, and checkpoints
written during validation."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from repl_mm.engine.hooks import rng_state_hook
from repl_mm.engine.hooks.rng_state_hook import (KEY, RNGStateHook,
                                                 get_rng_state)

RESUMING = SimpleNamespace(_resume=True)


def draws():
    return (random.random(), np.random.rand(), torch.rand(1).item())


@pytest.fixture
def logs(monkeypatch):
    """The messages the hook logs."""
    out, print_log = [], rng_state_hook.print_log

    def record(msg, **kwargs):
        out.append(msg)
        print_log(msg, **kwargs)

    monkeypatch.setattr(rng_state_hook, 'print_log', record)
    return out


def world(monkeypatch, rank, size):
    monkeypatch.setattr(rng_state_hook, 'get_rank', lambda: rank)
    monkeypatch.setattr(rng_state_hook, 'get_world_size', lambda: size)


def saved(tmp_path, map_location='cpu'):
    """A checkpoint with the hook's state, written and loaded back with
    ``map_location``; and the draws that follow the saved state."""
    ckpt = {}
    RNGStateHook().before_save_checkpoint(RESUMING, ckpt)
    after = draws()
    torch.save(ckpt, tmp_path / 'ckpt.pth')
    return torch.load(
        tmp_path / 'ckpt.pth', map_location=map_location,
        weights_only=True), after


def test_saves_a_list_indexed_by_rank_and_restores_it(tmp_path):
    ckpt, after = saved(tmp_path)
    assert isinstance(ckpt[KEY], list) and len(ckpt[KEY]) == 1
    draws()
    RNGStateHook().after_load_checkpoint(RESUMING, ckpt)
    assert draws() == after


def test_meta_checkpoint_gives_a_clear_error(tmp_path):
    """mmengine's resume loads onto get_device() (CUDA on a GPU): the
    states reach ``torch.set_rng_state`` on another device than the CPU.
    A meta tensor is the CPU's proxy for that; it has no data, so the hook
    names the entry instead of failing inside torch."""
    ckpt, _ = saved(tmp_path, map_location='meta')
    before = get_rng_state()['torch']
    with pytest.raises(
            ValueError,
            match=r"checkpoint\['rng_state'\]\[0\]\['torch'\] "
            r'is on the meta device'):
        RNGStateHook().after_load_checkpoint(RESUMING, ckpt)
    assert torch.equal(get_rng_state()['torch'], before)  # nothing set


def test_states_on_another_device_are_moved_to_the_cpu(monkeypatch):
    """The restore hands ``torch.set_rng_state`` a CPU copy of whatever
    device the state arrived on."""
    state = get_rng_state()
    after = draws()
    moved = []

    class OnDevice(torch.Tensor):
        """A state tensor that records being moved to the CPU."""

        def cpu(self):
            moved.append(True)
            return torch.Tensor.cpu(self).as_subclass(torch.Tensor)

    state['torch'] = state['torch'].as_subclass(OnDevice)
    RNGStateHook().after_load_checkpoint(RESUMING, {KEY: [state]})
    assert moved and draws() == after


def test_single_dict_checkpoints_still_load(tmp_path):
    state = get_rng_state()
    after = draws()
    RNGStateHook().after_load_checkpoint(RESUMING, {KEY: state})
    assert draws() == after


def test_load_from_keeps_the_new_run_stream():
    state = get_rng_state()
    draws()
    now = get_rng_state()['torch']
    RNGStateHook().after_load_checkpoint(
        SimpleNamespace(_resume=False), {KEY: [state]})
    assert torch.equal(get_rng_state()['torch'], now)


def test_each_rank_restores_its_own_entry(monkeypatch, logs):
    torch.manual_seed(1)
    one = get_rng_state()
    torch.manual_seed(2)
    two = get_rng_state()
    world(monkeypatch, 1, 2)
    RNGStateHook().after_load_checkpoint(RESUMING, {KEY: [one, two]})
    assert torch.equal(torch.get_rng_state(), two['torch'])
    assert not logs  # same world size: nothing to warn about


def test_more_ranks_than_saved_keep_their_seeds(monkeypatch, logs):
    state = get_rng_state()
    torch.manual_seed(7)
    fresh = torch.get_rng_state()
    world(monkeypatch, 1, 2)
    RNGStateHook().after_load_checkpoint(RESUMING, {KEY: [state]})
    assert torch.equal(torch.get_rng_state(), fresh)
    assert logs == [
        'resuming on 2 processes from a checkpoint with the RNG '
        'states of 1: each rank restores its own, rank 1 keeps '
        'its seed; the run continues, but not bit-identically to '
        'an uninterrupted one'
    ]


def test_fewer_ranks_than_saved_restore_their_own(monkeypatch, logs):
    torch.manual_seed(1)
    one = get_rng_state()
    torch.manual_seed(2)
    two = get_rng_state()
    world(monkeypatch, 0, 1)
    RNGStateHook().after_load_checkpoint(RESUMING, {KEY: [one, two]})
    assert torch.equal(torch.get_rng_state(), one['torch'])
    assert len(logs) == 1 and 'the state of rank 1 is unused' in logs[0]


def test_checkpoint_during_validation_holds_the_training_stream():
    """``save_best`` writes checkpoints inside validation: they hold the
    state validation started from, which after_val puts back."""
    hook = RNGStateHook()
    hook.before_val(RESUMING)
    after = draws()  # what training draws next (after_val restores)
    ckpt = {}
    hook.before_save_checkpoint_all_ranks(RESUMING)
    hook.before_save_checkpoint(RESUMING, ckpt)
    hook.after_val(RESUMING)
    draws()
    hook.after_load_checkpoint(RESUMING, ckpt)
    assert draws() == after


def test_a_runner_that_does_not_gather_saves_rank_0_only(monkeypatch, logs):
    world(monkeypatch, 0, 2)
    hook, ckpt = RNGStateHook(), {}
    hook.before_save_checkpoint(SimpleNamespace(), ckpt)
    hook.before_save_checkpoint(SimpleNamespace(), ckpt)
    assert len(ckpt[KEY]) == 1
    assert len(logs) == 1 and 'SimpleNamespace saves rank 0 only' in logs[0]


def test_a_checkpoint_without_rng_state_warns(logs):
    RNGStateHook().after_load_checkpoint(RESUMING, {})
    assert len(logs) == 1 and 'without RNG state' in logs[0]
