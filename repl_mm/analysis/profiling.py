"""Memory and time of a training step, and how far the timing can be
trusted.

- :func:`train_step`: the step every figure is of (zero grad, forward,
  loss, backward, SGD step).
- :func:`measure_memory`: bytes saved for backward (counted by
  :class:`~repl_mm.analysis.memory.SavedTensorMeter`, deterministic) and
  the allocator's peak of one step (:func:`~repl_mm.analysis.device.
  peak_memory`); :func:`synthesis_kept_bytes`: the part of the saved bytes
  that is weight-space synthesis.
- :func:`time_round_robin`: seconds per call of several steps, trials
  interleaved round robin; :func:`ratio_stats`: median and quartiles of the
  per-trial ratios.
- :func:`op_profile`: where a step spends its time, op by op (self time per
  op category, op calls), for explaining a time ratio its FLOPs do not.
- :func:`watch_load`: the load average before and after a timing, against
  the threads torch computes with; a timing taken with more runnable
  processes than threads is marked unreliable (:func:`load_record`).

Torch only.
"""
import gc
import os
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .cases import training_loss
from .device import device_timer, peak_memory
from .flops import SynthesisCall, find_sites
from .memory import SavedTensorMeter


def weights_of(model: nn.Module) -> list:
    """``model``'s parameters and buffers: what the meters exclude."""
    return list(model.parameters()) + list(model.buffers())


# -- memory ----------------------------------------------------------------
def train_step(model: nn.Module,
               optimizer: torch.optim.Optimizer,
               batch: tuple,
               meter: Optional[SavedTensorMeter] = None,
               forward: Optional[Callable] = None):
    """Zero grad, forward (inside ``meter`` if given), backward, SGD step;
    gradients are freed again afterwards. ``forward`` replaces
    ``model.loss`` (:func:`~repl_mm.analysis.cases.training_loss`), e.g.
    by the model's ``torch.compile``."""
    optimizer.zero_grad(set_to_none=True)
    if meter is None:
        loss = training_loss(model, batch, forward)
    else:
        with meter:
            loss = training_loss(model, batch, forward)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_memory(model: nn.Module,
                   optimizer: torch.optim.Optimizer,
                   batch: tuple,
                   device='cpu',
                   forward: Optional[Callable] = None) -> dict:
    """``saved_bytes`` (saved for backward by the forward, weights
    excluded) and ``peak_bytes`` (:func:`~repl_mm.analysis.device.
    peak_memory` on ``device``, where model and batch are) of one step,
    and, for an eager step, the part of ``saved_bytes`` that is
    weight-space synthesis (:func:`synthesis_kept_bytes`).

    ``forward`` runs the step's forward instead of ``model.loss``
    (:func:`train_step`): for ``torch.compile(model)``, ``saved_bytes`` is
    what the compiled graph saves as autograd sees it, and
    ``synthesis_kept_bytes`` (an eager figure) is left out.
    """
    meter = SavedTensorMeter(weights_of(model))
    torch.manual_seed(0)
    peak = peak_memory(
        lambda: train_step(model, optimizer, batch, meter, forward), device)
    out = dict(saved_bytes=meter.bytes, peak_bytes=peak)
    if forward is None:
        out['synthesis_kept_bytes'] = synthesis_kept_bytes(model)
    return out


def synthesis_kept_bytes(model: nn.Module) -> int:
    """Bytes of weight-space tensors that the sites' synthesis keeps for
    backward in a training forward: what autograd saves inside
    ``synthesize()`` and the synthesized matrices themselves. Every
    synthesizing site keeps its matrices, whatever its options: synthesis
    runs once per step, and ``recompute`` and ``with_cp`` re-run only the
    feature-map part in backward, from the kept matrices. They do not grow
    with the batch."""
    meter = SavedTensorMeter(weights_of(model))
    sites = list(find_sites(model).values())
    with torch.enable_grad(), meter:
        mats = [t for s in sites for t in SynthesisCall(s)()]
    for t in mats:
        if t.requires_grad:
            meter._record(t)
    return meter.bytes


# -- time ------------------------------------------------------------------
def time_round_robin(steps: Dict[str, Callable[[], None]],
                     repeats: int,
                     warmup: int = 1,
                     device='cpu') -> Dict[str, List[float]]:
    """Seconds per call of each step: ``warmup`` untimed rounds, then
    ``repeats`` trials in which every step runs once, the order rotated by
    one each trial; Python's GC collects once before and is off inside
    a trial. Each call is timed by :func:`~repl_mm.analysis.device.
    device_timer` of ``device`` (on CUDA: synchronized before and after)."""
    names = list(steps)
    times = {n: [] for n in names}
    timed = device_timer(device)
    gc.collect()
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        gc.disable()
        try:
            for n in order:
                t = timed(steps[n])
                if r >= warmup:
                    times[n].append(t)
        finally:
            gc.enable()
    return times


def ratio_stats(times: Sequence[float], ref: Sequence[float]) -> dict:
    """Median and quartiles of per-trial ratios ``times[i] / ref[i]``."""
    r = np.asarray(times, dtype=float) / np.asarray(ref, dtype=float)
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return dict(median=float(med), q1=float(q1), q3=float(q3))


def time_stats(times: Sequence[float]) -> dict:
    """Median and quartiles of ``times`` (seconds), in ms."""
    t = np.asarray(times, dtype=float) * 1e3
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return dict(median=float(med), q1=float(q1), q3=float(q3))


# -- per-op profile ----------------------------------------------------------
#: op categories of :func:`op_profile`, matched in order on the lower-cased
#: op name; everything else (elementwise ops, copies, views, the autograd
#: engine's own bookkeeping) is ``'other'``
OP_CATEGORIES = (
    ('conv/matmul', ('conv', 'mm', 'linear', 'matmul', 'addmm', 'bmm')),
    ('norm', ('batch_norm', 'layer_norm', 'group_norm')),
)


def op_category(name: str) -> str:
    """The :data:`OP_CATEGORIES` entry of op ``name`` (else ``'other'``).

    Example:
        >>> op_category('aten::mkldnn_convolution'), op_category('aten::add_')
        ('conv/matmul', 'other')
    """
    low = name.lower()
    for cat, keys in OP_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return 'other'


def op_profile(step: Callable[[], None],
               rounds: int = 3,
               top: int = 5) -> dict:
    """Where one call of ``step`` spends its time, op by op, on the CPU.

    ``step`` runs once untimed, then ``rounds`` times under
    ``torch.profiler`` (CPU activity). Self time is each op's own time
    without the ops it calls, so the self times add up to the step's
    time in ops and the shares are exclusive. An op's self time is its
    total less its children's; where the profiler records a child on
    another thread than its parent (autograd's backward ops under torch
    2.1), that difference can come out negative. A negative time is no
    time: self times are clipped at zero, so every share is in [0, 1].

    Returns:
        dict: per call of ``step``: ``wall_ms`` (its time under the
        profiler, which adds a cost per op: compare it with ``self_ms``,
        not with an unprofiled timing), ``self_ms`` (all ops' self time),
        ``aten_calls`` (calls of ``aten::`` ops, nested ones included:
        what a fixed per-op cost multiplies), ``shares`` (fraction of
        ``self_ms`` per category of :func:`op_category`) and ``top``
        (the ``top`` ops by self time: ``op``, ``ms``, ``share``,
        ``calls``).
    """
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(rounds):
            step()
        wall = (time.perf_counter() - start) / rounds * 1e3
    events = [(e.key, max(e.self_cpu_time_total, 0) / 1e3 / rounds,
               e.count / rounds) for e in prof.key_averages()]
    total = sum(ms for _, ms, _ in events) or float('nan')
    shares = {cat: 0.0 for cat, _ in OP_CATEGORIES}
    shares['other'] = 0.0
    for key, ms, _ in events:
        shares[op_category(key)] += ms / total
    ranked = sorted(events, key=lambda e: -e[1])[:top]
    return dict(
        wall_ms=wall,
        self_ms=total,
        aten_calls=sum(n for k, _, n in events if k.startswith('aten::')),
        shares=shares,
        top=[
            dict(op=k, ms=ms, share=ms / total, calls=n) for k, ms, n in ranked
        ])


# -- machine load ----------------------------------------------------------
def sample_load() -> Optional[float]:
    """The 1-minute load average (runnable processes, the caller's
    included), or None where the platform has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def load_record(before: Optional[float],
                after: Optional[float],
                threads: Optional[int] = None) -> dict:
    """The load around a timing and whether the timing is reliable.

    A timing is unreliable when the larger of the two load averages
    exceeds ``threads``: then more processes wanted a core than torch had
    threads, and the measured methods shared the cores with something
    else. The timing's own threads count towards the load, so on an idle
    machine it approaches ``threads`` and stays at or below it.

    Args:
        before (float, optional): Load average before the timing.
        after (float, optional): Load average after it.
        threads (int, optional): Threads torch computes with. Defaults to
            ``torch.get_num_threads()``.

    Returns:
        dict: ``before``, ``after``, ``max``, ``threads`` and ``reliable``
        (None when the platform gives no load average).

    Example:
        >>> load_record(1.2, 3.1, threads=2)['reliable']
        False
    """
    threads = torch.get_num_threads() if threads is None else threads
    known = [x for x in (before, after) if x is not None]
    peak = max(known) if known else None
    return dict(
        before=before,
        after=after,
        max=peak,
        threads=threads,
        reliable=None if peak is None else peak <= threads)


@contextmanager
def watch_load(threads: Optional[int] = None):
    """Yield a dict that is filled with :func:`load_record` of the load
    before and after the block when the block ends."""
    record: dict = {}
    before = sample_load()
    try:
        yield record
    finally:
        record.update(load_record(before, sample_load(), threads))
