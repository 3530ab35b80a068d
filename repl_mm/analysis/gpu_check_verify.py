"""The verifiers of ``tools/gpu_check.py``'s checks: each reads what a
run left behind (the per-rank files of
:class:`~repl_mm.analysis.gpu_probe.GpuCheckProbe`, checkpoints, metrics,
the inferencer's and the benchmark's results), raises
:class:`~repl_mm.analysis.gpu_check_runner.CheckFailed` if anything is
off, and returns the check's one-line note.

Only the standard library is imported at module level.
"""
import json
import math
import os.path as osp
from typing import Optional

from .gpu_check_configs import BENCH_METHODS, Context
from .gpu_check_runner import CheckFailed, expect


# -- verification ----------------------------------------------------------
def _probe(work: str, phase: str = 'train', rank: int = 0) -> dict:
    from .gpu_probe import read_probe
    try:
        return read_probe(work, phase, rank)
    except FileNotFoundError as e:
        raise CheckFailed(str(e)) from None


def verify_train(ctx: Context,
                 work: str,
                 iters: int,
                 ckpt: str,
                 amp: bool = False,
                 probe: Optional[dict] = None) -> str:
    """A training run ended where it should, on the right device, with
    RepL on, finite weights that training changed, and a checkpoint."""
    p = probe if probe is not None else _probe(work)
    expect(p['device'].split(':')[0] == ctx.device,
           f"parameters on {p['device']}, expected {ctx.device}")
    expect(p['iter'] == iters, f"ended at iteration {p['iter']}, expected "
           f'{iters}')
    expect(
        p['backbone'].startswith('RepL') and p['sites'],
        f"backbone {p['backbone']} with sites {p['sites']}: RepL is not "
        'on')
    expect(p['finite'], 'non-finite parameters')
    expect(p['loss'] is None or math.isfinite(p['loss']),
           f"last training loss {p['loss']}")
    expect(p['params_start'] != p['params_end'],
           'the parameters did not change during training')
    wrapper = 'AmpOptimWrapper' if amp and not ctx.cpu else None
    expect(wrapper is None or p['optim_wrapper'] == wrapper,
           f"optim wrapper {p['optim_wrapper']}, expected {wrapper}")
    expect(
        osp.isfile(osp.join(work, ckpt)), f'no checkpoint {ckpt} in '
        f'{work}')
    loss = '-' if p['loss'] is None else f"{p['loss']:.4g}"
    return (f"iter {p['iter']} on {p['device']}, {p['optim_wrapper']}, "
            f"{p['backbone']} sites {p['sites']}, loss {loss}")


def verify_resume(ctx: Context, work: str, source: str, iters: int, ckpt: str,
                  log: str, amp: bool) -> str:
    """The resumed run started from the source run's last weights and its
    iteration count, and went on to the end."""
    first, p = _probe(source), _probe(work)
    with open(log, errors='replace') as f:
        text = f.read()
    expect(
        f"resumed epoch: {first['epoch']}, iter: {first['iter']}" in text,
        f"the log does not say 'resumed epoch: {first['epoch']}, iter: "
        f"{first['iter']}'")
    expect(p['params_start'] == first['params_end'],
           "the resumed run did not start from the source run's weights")
    return verify_train(ctx, work, iters, ckpt, amp, probe=p)


def verify_metric(ctx: Context, work: str, metric: str) -> str:
    """``tools/test.py`` wrote a finite metric in [0, 100], on the device."""
    path = osp.join(work, 'metrics.json')
    expect(osp.isfile(path), f'no metrics file {path}')
    with open(path) as f:
        metrics = json.load(f)
    expect(metric in metrics, f'{metric} not in the metrics {metrics}')
    value = metrics[metric]
    expect(
        isinstance(value, (int, float)) and math.isfinite(value)
        and 0 <= value <= 100, f'{metric} = {value!r}')
    device = _probe(work, 'test')['device']
    expect(
        device.split(':')[0] == ctx.device,
        f'tested on {device}, expected {ctx.device}')
    return f'{metric} {value:.2f} on {device}'


def verify_infer(ctx: Context, work: str) -> str:
    path = osp.join(work, 'infer.json')
    expect(osp.isfile(path), f'no inferencer result {path}')
    with open(path) as f:
        out = json.load(f)
    expect(out['device'].split(':')[0] == ctx.device,
           f"inferencer model on {out['device']}, expected {ctx.device}")
    return f"{out['inferencer']} on {out['device']}: {out['summary']}"


def verify_dist(ctx: Context, work: str, world: int, iters: int,
                ckpt: str) -> str:
    """Every rank trained on its own GPU over NCCL with SyncBN, and all of
    them end with the same parameters."""
    probes = [_probe(work, 'train', r) for r in range(world)]
    for r, p in enumerate(probes):
        expect(p['world_size'] == world,
               f"rank {r}: world size {p['world_size']}, expected {world}")
        expect(p['backend'] == 'nccl', f"rank {r}: backend {p['backend']}")
        expect(p['syncbn'] > 0, f'rank {r}: no SyncBatchNorm layer')
        verify_train(ctx, work, iters, ckpt, probe=p)
    devices = [p['device'] for p in probes]
    expect(len(set(devices)) == world, f'ranks share devices: {devices}')
    digests = {p['params_end'] for p in probes}
    expect(
        len(digests) == 1, f'ranks end with different parameters: '
        f"{[p['params_end'][:12] for p in probes]}")
    return (f'{world} ranks on {", ".join(devices)}, '
            f"{probes[0]['syncbn']} SyncBN layers, equal parameters "
            f"(sha256 {probes[0]['params_end'][:12]})")


def verify_bench(ctx: Context, work: str) -> str:
    path = osp.join(work, 'benchmark.json')
    expect(osp.isfile(path), f'no benchmark result {path}')
    with open(path) as f:
        res = json.load(f)
    (case, ) = res['cases']
    expect(
        case.get('device', 'cpu').split(':')[0] == ctx.device,
        f"measured on {case.get('device', 'cpu')}, expected "
        f'{ctx.device}')
    ms = case['methods']
    expect(set(BENCH_METHODS) <= set(ms), f'methods {sorted(ms)}')
    for m in BENCH_METHODS:
        expect(ms[m]['time_ms']['median'] > 0 and ms[m]['peak_bytes'] > 0,
               f'{m}: no time or peak memory measured')
    r = ms['repl']
    return (f"repl x E2E: time {r['time_ratio']['median']:.3f}, peak "
            f"{r['peak_ratio']:.3f}, act. mem {r['mem_ratio']:.3f}")


__all__ = [
    'verify_train', 'verify_resume', 'verify_metric', 'verify_infer',
    'verify_dist', 'verify_bench'
]
