"""Memory and time of a training step (repl_mm/analysis/profiling.py):
hand-computed saved bytes, per-trial ratios, the round robin, and the load
record that marks a timing on a loaded machine (``os.getloadavg``
monkeypatched). Behaviour only: nothing here asserts a speed."""
import pytest
import torch
from mmengine.model import BaseModel
from torch import nn

from repl_mm.analysis import profiling
from repl_mm.analysis.memory import SavedTensorMeter
from repl_mm.analysis.profiling import (load_record, measure_memory,
                                        ratio_stats, time_round_robin,
                                        time_stats, watch_load)


class Tiny(BaseModel):
    """A bare network with ``loss`` and ``parse_losses`` like a task
    model; the loss is a sum, which saves nothing for backward."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, data_samples=None, mode='tensor'):
        return self.net(x)

    def loss(self, x):
        return dict(loss=self.net(x).sum())


def _loss_parsing_bytes() -> int:
    """What mmengine's ``parse_losses`` (``loss.mean()``) saves on this
    torch: nothing from torch 2.2 on, the 0-d loss (4 bytes) on 2.1,
    whose ``mean`` backward keeps its input."""
    loss = torch.zeros((), requires_grad=True) * 1
    with SavedTensorMeter([]) as meter:
        loss.mean()
    return meter.bytes


def memory_of(net, x):
    model = Tiny(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return measure_memory(model, opt, (x, ))


def test_saved_bytes_conv_relu():
    # conv saves its input x (2*3*8*8 floats), its weight is a parameter
    # (excluded); relu saves its output (2*4*6*6 floats)
    mem = memory_of(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.rand(2, 3, 8, 8))
    assert mem['saved_bytes'] == (2 * 3 * 8 * 8 + 2 * 4 * 6 * 6) * 4 + \
        _loss_parsing_bytes()
    assert mem['synthesis_kept_bytes'] == 0
    # the step's allocator peak holds at least the saved tensors
    assert mem['peak_bytes'] >= mem['saved_bytes']


def test_saved_bytes_storage_counted_once():
    # fc1 saves x (3*4); relu saves its output (3*8), which fc2 saves again
    # as its input: one storage, counted once; weights excluded
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert memory_of(net, torch.rand(3, 4))['saved_bytes'] == \
        (12 + 24) * 4 + _loss_parsing_bytes()


def test_ratio_stats_per_trial():
    # per-trial ratios 2, 2, 3, 2 (not the ratio of medians, 5/2)
    s = ratio_stats([2, 4, 6, 8], [1, 2, 2, 4])
    assert s == pytest.approx(dict(median=2.0, q1=2.0, q3=2.25))


def test_time_round_robin_interleaves():
    calls = []
    steps = {n: (lambda n=n: calls.append(n)) for n in 'abc'}
    times = time_round_robin(steps, repeats=3, warmup=1)
    assert {n: len(t) for n, t in times.items()} == dict(a=3, b=3, c=3)
    # every round runs every method once, the start rotated each round
    assert calls == list('abc'
                         'bca'
                         'cab'
                         'abc')


def test_time_stats_in_ms():
    assert time_stats([0.001, 0.002, 0.003
                       ]) == pytest.approx(dict(median=2.0, q1=1.5, q3=2.5))


def test_measure_memory_with_another_forward():
    """A step through another forward (a compiled model) counts what that
    forward saves; the synthesis figure (eager only) is left out."""
    model = Tiny(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(2, 3, 8, 8)
    calls = []

    def forward(inputs, mode):
        calls.append(mode)
        return model.loss(inputs)

    mem = measure_memory(model, opt, (x, ), forward=forward)
    assert calls == ['loss']
    assert 'synthesis_kept_bytes' not in mem
    assert mem['saved_bytes'] == measure_memory(model, opt,
                                                (x, ))['saved_bytes']


@pytest.mark.parametrize(
    'before, after, threads, reliable',
    [
        (1.2, 1.9, 2, True),
        (2.0, 2.0, 2, True),  # the timing's own threads: at most `threads`
        (1.2, 3.1, 2, False),
        (3.1, 0.5, 2, False),
        (None, None, 2, None),  # no load average on this platform
        (None, 2.5, 2, False),
    ])
def test_load_record(before, after, threads, reliable):
    r = load_record(before, after, threads)
    assert r['reliable'] is reliable
    assert r['threads'] == threads
    assert r['max'] == (None if reliable is None else max(
        x for x in (before, after) if x is not None))


def test_load_record_defaults_to_torch_threads():
    assert load_record(0.0, 0.0)['threads'] == torch.get_num_threads()


def test_watch_load_samples_before_and_after(monkeypatch):
    loads = iter([(1.5, 1.0, 1.0), (3.1, 1.2, 1.0)])
    monkeypatch.setattr(profiling.os, 'getloadavg', lambda: next(loads))
    with watch_load(threads=2) as load:
        assert load == {}  # filled when the timing ends
    assert load == dict(
        before=1.5, after=3.1, max=3.1, threads=2, reliable=False)


def test_watch_load_without_getloadavg(monkeypatch):

    def missing():
        raise OSError('no load average')

    monkeypatch.setattr(profiling.os, 'getloadavg', missing)
    with watch_load(threads=2) as load:
        pass
    assert load['reliable'] is None
