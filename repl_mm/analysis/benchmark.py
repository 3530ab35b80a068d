"""Efficiency benchmark: E2E against RepL, drop, stochastic depth and
activation checkpointing on one plan, one input and one process; the
entry point of the measuring (:mod:`.flops`, :mod:`.profiling`) and
rendering (:mod:`.report`) modules, over the cases of :mod:`.cases`.

For every case (a model config and an input size) each *method* builds its
model from the same config with another backbone ``replacement`` dict and
flags (:data:`METHODS`), and is measured on the same synthetic batch:

- parameters (whole model and backbone);
- FLOPs of a training step (:func:`~repl_mm.analysis.flops.step_flops`):
  ``3 x forward`` plus the forward that backward re-runs, with the
  weight-space synthesis of the sites (which does not grow with the
  batch) reported apart;
- activation memory and peak memory of one step
  (:func:`~repl_mm.analysis.profiling.measure_memory`);
- step time: warm-up, then trials in which every method runs once, round
  robin, reported as the median of per-trial ratios to E2E with the
  interquartile range, and the load average around the timing (a timing
  on a loaded machine is marked unreliable).

With ``compile_backend=<name>`` every method is also measured as
``torch.compile(model, backend=...)`` (compilation in its untimed warm-up
step), its ratios and S against the compiled E2E and the compiled drop; a
method that does not compile is recorded as failed with the exception's
first line, and the run goes on.

Derived: the saving efficiency S = (E2E - X) / (E2E - drop) of memory and
time (:func:`saving_efficiency`), and the project's targets
(:func:`check_targets`). ``docs/benchmark.md`` states every convention.

This module also re-exports the names ``tools/`` and the tests imported
from it before it was split: their homes are :mod:`.cases`,
:mod:`.flops`, :mod:`.profiling` and :mod:`.report`.
"""
import copy
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.logging import MMLogger, print_log
from torch import nn

from .cases import (SUITE, TWINS, Case, build_model, default_input_size,
                    load_config, make_batch, make_case, prepare_model_cfg,
                    suite_cases, to_device, training_loss)
from .device import (describe_device, device_timer, peak_allocated,
                     peak_memory, resolve_device)
from .flops import step_flops, synthesis_flops, track_recompute
from .profiling import (measure_memory, ratio_stats, synthesis_kept_bytes,
                        time_round_robin, time_stats, train_step, watch_load)
from .report import (load_accuracies, machine_info, plot_accuracy_memory,
                     plot_ratios, time_ratio_text, to_markdown, write_outputs)

# method -> overrides of the backbone's ``replacement`` dict, and whether it
# turns on activation checkpointing (``cp``) or stochastic depth (``sd``).
METHODS: Dict[str, dict] = {
    'e2e': dict(replacement=dict(mode='none')),
    'repl': dict(replacement=dict(interval=4)),
    'repl-k2': dict(replacement=dict(interval=2)),
    'repl-k6': dict(replacement=dict(interval=6)),
    'repl-norecompute': dict(replacement=dict(interval=4, recompute=False)),
    'drop': dict(replacement=dict(mode='drop', interval=4)),
    'sd': dict(replacement=dict(mode='none'), sd=True),
    'cp': dict(replacement=dict(mode='none'), cp=True),
    'repl+sd': dict(replacement=dict(interval=4), sd=True),
    'repl+cp': dict(replacement=dict(interval=4), cp=True),
    # the sites of ``Case.indices`` (e.g. tools/analysis/span_diagnostic.py's
    # choice); skipped when a case has none
    'repl_idx': dict(replacement=dict(), indices=True),
}
SD_RATE = 0.1  # drop_path_rate of the stochastic-depth methods
# Twins whose upstream class has ``drop_path_rate`` (the others: no 'sd').
DROP_PATH_TWINS = {
    ('mmpretrain', t)
    for t in ('RepLResNet', 'RepLResNet_CIFAR', 'RepLVisionTransformer',
              'RepLResNeXt', 'RepLResNetV1c', 'RepLResNetV1d',
              'RepLSwinTransformer', 'RepLConvNeXt')
} | {(scope, t)
     for scope in ('mmdet', 'mmseg')
     for t in ('RepLSwinTransformer', 'mmpretrain.RepLConvNeXt')}
# the project's targets of S_mem (activation memory) per backbone family:
# the share of drop's saving RepL should keep (docs/benchmark.md)
S_MEM_TARGETS = {'cifar': 0.70, 'bottleneck': 0.65, 'vit': 0.90}
S_TIME_TARGET = 0.8
CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # RepLResNet_CIFAR's 3-stage nets


def backbone_family(backbone: str, depth: Optional[int]) -> Optional[str]:
    """'cifar' (He et al.'s CIFAR ResNets), 'vit', 'bottleneck' (ResNet-50
    and deeper) or None: which target of :data:`S_MEM_TARGETS` applies."""
    if 'VisionTransformer' in backbone:
        return 'vit'
    if 'CIFAR' in backbone and depth in CIFAR_DEPTHS:
        return 'cifar'
    return 'bottleneck' if depth is not None and depth >= 50 else None


def method_model_cfg(case: Case, method: str) -> Optional[dict]:
    """The model config of ``method``, or None where it does not apply
    (stochastic depth on a backbone without ``drop_path_rate``,
    ``repl_idx`` on a case without ``indices``)."""
    spec = METHODS[method]
    has_sd = (case.scope, case.backbone_type) in DROP_PATH_TWINS
    if (spec.get('sd') and not has_sd) or (spec.get('indices')
                                           and case.indices is None):
        return None
    model = copy.deepcopy(case.model)
    backbone = model['backbone']
    repl = dict(backbone.get('replacement') or {})
    repl.pop('mode', None)
    over = dict(spec['replacement'])
    if case.config_plan and over.get('interval') == 4:
        over.pop('interval')  # the config's own sites
    if 'interval' in over:
        repl.pop('indices', None)
    repl.update(over)
    if spec.get('indices'):
        repl['indices'] = list(case.indices)
    backbone['replacement'] = repl
    backbone['with_cp'] = bool(spec.get('cp'))
    if has_sd:
        backbone['drop_path_rate'] = SD_RATE if spec.get('sd') else 0.0
    return model


def saving_efficiency(e2e: float, x: Optional[float],
                      drop: Optional[float]) -> Optional[float]:
    """S = (E2E - X) / (E2E - drop): the share of what dropping the sites
    saves that method X keeps; None when drop saves nothing (or a figure
    is missing)."""
    if x is None or drop is None or e2e == drop:
        return None
    return (e2e - x) / (e2e - drop)


# -- one case --------------------------------------------------------------
def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                           lr=1e-3,
                           momentum=0.9)


def _first_line(e: BaseException) -> str:
    """``'Type: first line of the message'``."""
    lines = str(e).strip().splitlines()
    return f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__


def _compile_method(case: Case, cfg: dict, batch: tuple, backend: str,
                    device) -> dict:
    """Build ``cfg``'s model again, compile it, and run the untimed steps
    (the first one compiles: its seconds are ``compile_seconds``) and the
    memory step. Returns the measurements and the ``step`` to time, or
    ``failed`` (the exception's first line) if any of it raises."""
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build_model(case.scope, cfg).to(device)
        opt = _sgd(model)
        compiled = torch.compile(model, backend=backend)
        train_step(model, opt, batch, forward=compiled)
        seconds = time.perf_counter() - t0
        train_step(model, opt, batch, forward=compiled)
        mem = measure_memory(model, opt, batch, device, forward=compiled)
    except Exception as e:  # any failure of the compiler is a result
        return dict(failed=_first_line(e))
    return dict(
        compile_seconds=seconds,
        **mem,
        step=lambda: train_step(model, opt, batch, forward=compiled))


class _Guarded:
    """A timed step that records its exception instead of raising it, so a
    compiled variant that fails after its warm-up ends as failed."""

    def __init__(self, step, name: str, failures: Dict[str, str]):
        self.step, self.name, self.failures = step, name, failures

    def __call__(self):
        if self.name in self.failures:
            return
        try:
            self.step()
        except Exception as e:  # recorded, reported as failed
            self.failures[self.name] = _first_line(e)


def run_case(case: Case,
             methods: Sequence[str] = tuple(METHODS),
             warmup: int = 0,
             device='cpu',
             compile_backend: Optional[str] = None) -> dict:
    """Measure every applicable method of ``case`` on ``device``.

    Args:
        case (Case): The case.
        methods (Sequence[str]): Keys of :data:`METHODS`, ``'e2e'``
            included (the reference).
        warmup (int): Extra untimed rounds before the trials. Defaults to
            0.
        device (str | torch.device): ``'cpu'``, ``'cuda'``, ``'cuda:N'``:
            models and batch live there. Defaults to ``'cpu'``.
        compile_backend (str, optional): A ``torch.compile`` backend
            (e.g. ``'inductor'``): also measure every method compiled.
            Defaults to None (eager only).

    Returns:
        dict: The case's record: ``methods`` (per method: sites, params,
        flops, memory, ``time_ms``, ``time_ratio``), ``load`` (around the
        timing: :func:`~repl_mm.analysis.profiling.load_record`) and, with
        ``compile_backend``, ``compiled`` (``backend`` and per method the same
        figures, or ``failed``).
    """
    if 'e2e' not in methods:
        raise ValueError("methods must include 'e2e' (the reference)")
    device = resolve_device(device)
    logger = MMLogger.get_current_instance()
    h, w = case.input_size
    print_log(
        f'[{case.name}] {case.backbone_type} ({case.task}), input '
        f'{case.batch_size}x3x{h}x{w}, {case.repeats} trials, on '
        f'{device}' +
        (f', also compiled ({compile_backend})' if compile_backend else ''),
        logger=logger)
    steps, batch, flop_cache, out, comp = {}, None, {}, {}, {}
    for i, m in enumerate(methods, 1):
        cfg = method_model_cfg(case, m)
        if cfg is None:
            why = 'no indices given' if METHODS[m].get('indices') else \
                'backbone has no drop_path_rate'
            print_log(f'[{case.name}] {m}: skipped ({why})', logger=logger)
            continue
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = build_model(case.scope, cfg).to(device)
        if batch is None:
            batch = to_device(make_batch(case, model), device)
        opt = _sgd(model)
        backbone = model.backbone
        plan = backbone.replacement_plan
        rep = cfg['backbone']['replacement']
        key = tuple(
            sorted((k, str(v)) for k, v in rep.items() if k != 'recompute'))
        with track_recompute(model) as recomputed:
            train_step(model, opt, batch)  # warm-up: momentum buffers
        flops = step_flops(model, batch[0], recomputed, flop_cache, key)
        mem = measure_memory(model, opt, batch, device)
        out[m] = dict(
            sites=list(plan.indices) if plan.mode != 'none' else [],
            plan_sites=list(plan.indices),
            params=sum(p.numel() for p in model.parameters()),
            backbone_params=sum(p.numel() for p in backbone.parameters()),
            flops=flops,
            **mem)
        steps[m] = (lambda model=model, opt=opt: train_step(model, opt, batch))
        print_log(
            f'[{case.name}] ({i}/{len(methods)}) {m}: sites '
            f'{out[m]["sites"]}, {out[m]["params"] / 1e6:.2f} M params, '
            f'{flops["step"] / 1e9:.2f} GFLOPs/step, activations '
            f'{mem["saved_bytes"] / 2**20:.1f} MB, peak '
            f'{mem["peak_bytes"] / 2**20:.1f} MB '
            f'({time.perf_counter() - t0:.1f} s)',
            logger=logger)
        if compile_backend:
            res = _compile_method(case, cfg, batch, compile_backend, device)
            step = res.pop('step', None)
            comp[m] = dict(
                {
                    k: out[m][k]
                    for k in ('sites', 'plan_sites', 'params',
                              'backbone_params', 'flops')
                }, **res)
            if step is not None:
                steps['compiled', m] = step
            print_log(
                f'[{case.name}] {m} compiled: ' +
                (f"failed: {res['failed']}" if 'failed' in res else
                 f"{res['compile_seconds']:.1f} s to compile and warm up, "
                 f"activations {res['saved_bytes'] / 2**20:.1f} MB"),
                logger=logger)
    print_log(
        f'[{case.name}] timing {len(steps)} models x {case.repeats} '
        f'trials (+{warmup} warm-up), round robin',
        logger=logger)
    failures: Dict[str, str] = {}
    guarded = {
        k: (_Guarded(s, k[1], failures) if isinstance(k, tuple) else s)
        for k, s in steps.items()
    }
    with watch_load() as load:
        times = time_round_robin(guarded, case.repeats, warmup, device)
    for m, r in out.items():
        r['time_ms'] = time_stats(times[m])
        r['time_ratio'] = ratio_stats(times[m], times['e2e'])
    for m, why in failures.items():
        comp[m] = {
            k: comp[m][k]
            for k in ('sites', 'plan_sites', 'params', 'backbone_params',
                      'flops')
        }
        comp[m]['failed'] = why
    ref = None if comp.get('e2e', {}).get('failed') else times.get(
        ('compiled', 'e2e'))
    for m, r in comp.items():
        if not r.get('failed'):
            t = times['compiled', m]
            r['time_ms'] = time_stats(t)
            r['time_ratio'] = None if ref is None else ratio_stats(t, ref)
    for m, r in out.items():
        if m != 'e2e':
            print_log(
                f"[{case.name}] {m} step time "
                f"{time_ratio_text(r['time_ratio']['median'], load)}",
                logger=logger)
    for m, r in comp.items():
        if m != 'e2e' and r.get('time_ratio'):
            print_log(
                f"[{case.name}] {m} compiled step time " + time_ratio_text(
                    r['time_ratio']['median'], load, unit=' x compiled E2E'),
                logger=logger)
    record = dict(
        name=case.name,
        source=case.source,
        task=case.task,
        backbone=case.backbone_type,
        depth=case.depth,
        input_size=list(case.input_size),
        batch_size=case.batch_size,
        repeats=case.repeats,
        warmup=warmup,
        device=str(device),
        load=load,
        methods=out)
    if compile_backend:
        record['compiled'] = dict(backend=compile_backend, methods=comp)
    return record


# -- derived figures -------------------------------------------------------
def _div(a, b):
    return None if a is None or not b else a / b


def _derive(out: Dict[str, dict]):
    """Ratios to E2E and saving efficiencies, in place (methods that
    ``failed`` are left alone; without an E2E the ratios are None).
    ``S_mem_large_batch`` takes the batch-independent synthesis tensors out
    of the activation memory: the limit of ``S_mem`` as the batch grows."""
    ok = {m: r for m, r in out.items() if not r.get('failed')}
    ref = ok.get('e2e')
    for r in ok.values():
        if ref is None:
            r.update(
                mem_ratio=None,
                peak_ratio=None,
                mem_ratio_large_batch=None,
                flops_ratio=None)
            continue
        r['mem_ratio'] = _div(r['saved_bytes'], ref['saved_bytes'])
        r['peak_ratio'] = _div(r['peak_bytes'], ref['peak_bytes'])
        kept = r.get('synthesis_kept_bytes')
        r['mem_ratio_large_batch'] = None if kept is None else _div(
            r['saved_bytes'] - kept, ref['saved_bytes'])
        r['flops_ratio'] = (r['flops']['step'] + r['flops']['synthesis_step']
                            ) / ref['flops']['step']
    drop = ok.get('drop')
    plan = drop and drop['plan_sites']
    ratio = {
        'S_mem': lambda r: r['mem_ratio'],
        'S_mem_large_batch': lambda r: r['mem_ratio_large_batch'],
        'S_peak': lambda r: r['peak_ratio'],
        'S_time': lambda r: r['time_ratio'] and r['time_ratio']['median'],
        'S_flops': lambda r: r['flops_ratio'],
    }
    for r in ok.values():
        for s, get in ratio.items():
            # S compares with dropping the same sites: none for another plan
            r[s] = None if r['plan_sites'] != plan else saving_efficiency(
                1.0, get(r), get(drop))


def check_targets(case: dict) -> List[dict]:
    """The project's targets (:data:`S_MEM_TARGETS`) for one case's
    results: S_mem (activation memory) of 'repl', at the measured batch
    and in its large-batch limit (the weight-sized synthesized matrices
    every site keeps for backward taken out), S_time of 'repl', and
    'repl+cp' below 'cp' in activation memory. The S_time row carries
    ``reliable`` (False when the timing was taken on a loaded machine)."""
    ms, rows = case['methods'], []
    repl = ms.get('repl')
    if repl is not None and repl['S_mem'] is not None:
        goal = S_MEM_TARGETS.get(
            backbone_family(case['backbone'], case.get('depth')))
        if goal is not None:
            rows.append(
                dict(
                    target=f'repl S_mem >= {goal:.2f}',
                    value=repl['S_mem'],
                    met=repl['S_mem'] >= goal))
            large = repl.get('S_mem_large_batch')
            if large is not None:
                rows.append(
                    dict(
                        target=f'repl S_mem, large-batch limit >= '
                        f'{goal:.2f}',
                        value=large,
                        met=large >= goal))
        if repl['S_time'] is not None:
            row = dict(
                target=f'repl S_time >= {S_TIME_TARGET} (aim)',
                value=repl['S_time'],
                met=repl['S_time'] >= S_TIME_TARGET)
            reliable = (case.get('load') or {}).get('reliable')
            if reliable is not None:
                row['reliable'] = reliable
            rows.append(row)
    if 'cp' in ms and 'repl+cp' in ms:
        rows.append(
            dict(
                target='act. mem repl+cp / cp < 1',
                value=ms['repl+cp']['saved_bytes'] / ms['cp']['saved_bytes'],
                met=ms['repl+cp']['saved_bytes'] < ms['cp']['saved_bytes']))
    for r in rows:
        r['case'] = case['name']
    return rows


def finalize(results: dict) -> dict:
    """(Re)compute every derived figure (ratios, S, targets) from the
    measured ones, in place: a run's JSON can be rendered again."""
    results['targets'] = []
    for c in results['cases']:
        _derive(c['methods'])
        if c.get('compiled'):
            _derive(c['compiled']['methods'])
        results['targets'] += check_targets(c)
    return results


def run_benchmark(cases: Sequence[Case],
                  out_dir: str,
                  methods: Sequence[str] = tuple(METHODS),
                  warmup: int = 0,
                  accuracies: Optional[dict] = None,
                  device='cpu',
                  compile_backend: Optional[str] = None) -> dict:
    """Run ``cases`` on ``device`` (:func:`run_case`; ``compile_backend``:
    also compiled with that backend), write the outputs
    (:func:`~repl_mm.analysis.report.write_outputs`) and return the
    results dict."""
    device = resolve_device(device)
    results = dict(meta=machine_info(), cases=[])
    results['meta'].update(describe_device(device))
    results['meta']['load_before'] = os.getloadavg()
    t0 = time.perf_counter()
    for case in cases:
        results['cases'].append(
            run_case(
                case, methods, warmup, device,
                compile_backend=compile_backend))
    results['meta']['load_after'] = os.getloadavg()
    results['meta']['seconds'] = time.perf_counter() - t0
    written = write_outputs(finalize(results), out_dir, accuracies)
    print_log(
        f'benchmark done in {results["meta"]["seconds"]:.0f} s: '
        f'{", ".join(written)}\n{to_markdown(results)}',
        logger='current')
    return results


__all__ = [
    'METHODS', 'SUITE', 'TWINS', 'Case', 'make_case', 'suite_cases',
    'method_model_cfg', 'build_model', 'make_batch', 'step_flops',
    'track_recompute', 'synthesis_flops', 'measure_memory', 'peak_allocated',
    'peak_memory', 'device_timer', 'resolve_device', 'to_device',
    'synthesis_kept_bytes', 'time_round_robin', 'ratio_stats',
    'saving_efficiency', 'run_case', 'check_targets', 'to_markdown',
    'plot_ratios', 'plot_accuracy_memory', 'load_accuracies', 'run_benchmark',
    'finalize', 'write_outputs', 'backbone_family', 'default_input_size',
    'load_config', 'prepare_model_cfg', 'training_loss', 'machine_info'
]
