"""Single blocks: every site of a RepL model against the block it replaces.

For each site of a case's RepL model (the benchmark's ``repl`` method: its
plan, ``with_cp`` off) the site and the E2E block at the same position run
alone on the input that block sees in the network (captured by a forward
of the E2E backbone on the case's synthetic batch). Per site and per
option (:data:`OPTIONS`: ``recompute`` True and False, both with
``zero_init=False`` so the site's norm is not a zero map):

- fwd+bwd time: forward, then backward from a fixed random output
  gradient, the input requiring grad; every block and site of the case
  runs once per trial, round robin, and the ratio is the median of the
  per-trial ratios site / block (:func:`~repl_mm.analysis.profiling.
  time_round_robin`), with the load average around the timing;
- FLOPs of a training step in the benchmark's convention
  (:func:`~repl_mm.analysis.flops.step_flops`: 3 x forward + what
  backward re-runs + 3 x the site's synthesis);
- bytes saved for backward by the forward (input included, weights
  excluded; :class:`~repl_mm.analysis.memory.SavedTensorMeter`);
- with ``profile``, where the time goes: each block's and site's step
  under ``torch.profiler`` (:func:`~repl_mm.analysis.profiling.
  op_profile`: self time per op category, ``aten`` calls, top ops).

:func:`~repl_mm.analysis.report.blocks_markdown` renders the result.
"""
import copy
from typing import Dict, Optional, Sequence

import torch
from mmengine.logging import MMLogger, print_log
from torch import nn

from ..core import iter_sites
from .benchmark import method_model_cfg
from .cases import Case, build_model, make_batch, to_device
from .device import resolve_device
from .flops import step_flops, track_recompute
from .memory import SavedTensorMeter
from .profiling import (op_profile, ratio_stats, time_round_robin, time_stats,
                        watch_load, weights_of)

#: option label -> the site's ``replacement`` options
OPTIONS: Dict[str, dict] = {
    'recompute': dict(recompute=True, zero_init=False),
    'no recompute': dict(recompute=False, zero_init=False),
}


def _model_cfgs(case: Case, options: Sequence[str]) -> Dict[str, dict]:
    """The E2E model (``'block'``) and one RepL model per option, all on
    the plan of the benchmark's ``repl`` method."""
    base = method_model_cfg(case, 'repl')
    cfgs = {}
    for name in ('block', *options):
        cfg = copy.deepcopy(base)
        rep = cfg['backbone']['replacement']
        if name == 'block':
            rep['mode'] = 'none'
        else:
            rep.update(OPTIONS[name])
        cfgs[name] = cfg
    return cfgs


def block_inputs(backbone: nn.Module, inputs: torch.Tensor,
                 modules: Dict[int, nn.Module]) -> Dict[int, tuple]:
    """What each of ``modules`` (index -> block of ``backbone``) receives
    in a forward of ``backbone`` on ``inputs``: its positional arguments,
    the tensor a detached copy (a Swin block's ``hw_shape`` follows it)."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(
            i, (args[0].detach().clone(), *args[1:])))
        for i, m in modules.items()
    ]
    try:
        with torch.no_grad():
            backbone(inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


class _BlockStep:
    """Forward and backward of one module on a fixed input (and further
    arguments ``args``, a Swin block's ``hw_shape``) and output gradient;
    the gradients it leaves are freed after each call. With ``backend``,
    a call runs ``torch.compile(module, backend=backend)`` (compiled at
    construction); bytes and FLOPs are the eager module's (the same
    operator)."""

    def __init__(self,
                 model: nn.Module,
                 module: nn.Module,
                 x: torch.Tensor,
                 seed: int,
                 args: tuple = (),
                 backend: Optional[str] = None):
        self.model, self.module, self.args = model, module, tuple(args)
        self.run = module if backend is None else torch.compile(
            module, backend=backend)
        self.x = x.clone().requires_grad_()
        with torch.no_grad():
            shape = self._run(self.x).shape
        g = torch.Generator().manual_seed(seed)
        self.grad = torch.randn(shape, generator=g).to(x.device)
        self.touched = ()
        self()  # untimed: find what receives gradients
        self.touched = [p for p in model.parameters() if p.grad is not None]
        self._free()

    def _run(self, x):
        return self.module(x, *self.args)

    def _free(self):
        self.x.grad = None
        for p in self.touched:
            p.grad = None

    def __call__(self):
        self.run(self.x, *self.args).backward(self.grad)
        self._free()

    def saved_bytes(self) -> int:
        with SavedTensorMeter(weights_of(self.model)) as meter:
            out = self._run(self.x)
        out.backward(self.grad)
        self._free()
        return meter.bytes

    def flops(self, site_name: str = None) -> int:
        """Training FLOPs (synthesis included) of the module's step."""
        with torch.enable_grad(), track_recompute(self.model) as rec:
            self._run(self.x).backward(self.grad)
        self._free()
        f = step_flops(
            self.model,
            self.x.detach(),
            rec,
            call=lambda m, x: self._run(x),
            sites=[site_name] if site_name else [])
        return f['step'] + f['synthesis_step']


def measure_blocks(case: Case,
                   repeats: int = 10,
                   warmup: int = 1,
                   options: Sequence[str] = tuple(OPTIONS),
                   device='cpu',
                   profile: int = 0,
                   compile_backend: Optional[str] = None) -> dict:
    """Time, FLOPs and saved bytes of every site of ``case``'s RepL model
    over those of the E2E block it replaces (see the module docstring).

    Args:
        case (Case): The case (its config, input size and batch).
        repeats (int): Timed trials. Defaults to 10.
        warmup (int): Untimed rounds before them. Defaults to 1.
        options (Sequence[str]): Keys of :data:`OPTIONS`. Defaults to all.
        device (str | torch.device): Where models and inputs live.
            Defaults to ``'cpu'``.
        profile (int): Rounds of the per-op profile of every block and
            site, after the timing (0: none). CPU only. Defaults to 0.
        compile_backend (str, optional): Time (and profile) every block
            and site as ``torch.compile(module, backend=...)``, compiled
            before the timing; FLOPs and bytes stay the eager modules'.
            Defaults to None (eager).

    Returns:
        dict: ``name``, ``backbone``, ``repeats``, ``compile_backend``,
        ``options``, ``load``
        (around the timing) and ``rows``: per site ``index``, ``name``
        (the block's module name in the backbone), ``shape`` (its input),
        ``block`` (``time_ms``, ``flops``, ``bytes``) and ``sites`` (per
        option the same, and ``time_ratio``, ``flops_ratio``,
        ``bytes_ratio`` to the block); with ``profile``, the block and
        every option also have ``profile``
        (:func:`~repl_mm.analysis.profiling.op_profile`).

    Raises:
        ValueError: If the RepL model has no site, an option is
            unknown, or ``profile`` is asked for off the CPU.
    """
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f'unknown option(s) {unknown}; known: '
                         f'{list(OPTIONS)}')
    device = resolve_device(device)
    if profile and device.type != 'cpu':
        raise ValueError(f'profile={profile}: the per-op profile is of CPU '
                         f'time, but device is {device}')
    logger = MMLogger.get_current_instance()
    models = {}
    for name, cfg in _model_cfgs(case, options).items():
        torch.manual_seed(0)
        models[name] = build_model(case.scope, cfg).to(device)
    e2e = models['block']
    refs = list(iter_sites(e2e.backbone))
    if not refs:
        raise ValueError(f'{case.name}: the RepL model has no site')
    blocks = {r.index: r.module for r in refs}
    block_names = {r.index: r.name for r in refs}
    inputs, _ = to_device(make_batch(case, e2e), device)
    xs = block_inputs(e2e.backbone, inputs, blocks)
    sites = {o: {r.index: r for r in iter_sites(models[o])} for o in options}
    steps, rows = {}, []
    for i, block in blocks.items():
        x, *args = xs[i]
        row = dict(index=i, name=block_names[i], shape=list(x.shape))
        step = _BlockStep(e2e, block, x, i, args, compile_backend)
        steps[i, 'block'] = step
        row['block'] = dict(bytes=step.saved_bytes(), flops=step.flops())
        row['sites'] = {}
        for o in options:
            site = sites[o][i]
            step = _BlockStep(models[o], site.module, x, i, args,
                              compile_backend)
            steps[i, o] = step
            row['sites'][o] = dict(
                bytes=step.saved_bytes(), flops=step.flops(site.name))
        rows.append(row)
    how = f', compiled ({compile_backend})' if compile_backend else ''
    print_log(
        f'[{case.name}] timing {len(blocks)} blocks and their sites '
        f'x {len(options)} options{how}, {repeats} trials (+{warmup} '
        'warm-up), round robin',
        logger=logger)
    with watch_load() as load:
        times = time_round_robin(steps, repeats, warmup, device)
    for row in rows:
        i, ref = row['index'], row['block']
        ref['time_ms'] = time_stats(times[i, 'block'])
        for o, r in row['sites'].items():
            r['time_ms'] = time_stats(times[i, o])
            r['time_ratio'] = ratio_stats(times[i, o], times[i, 'block'])
            r['flops_ratio'] = r['flops'] / ref['flops']
            r['bytes_ratio'] = r['bytes'] / ref['bytes']
    if profile:
        for row in rows:
            i = row['index']
            row['block']['profile'] = op_profile(steps[i, 'block'], profile)
            for o, r in row['sites'].items():
                r['profile'] = op_profile(steps[i, o], profile)
    return dict(
        name=case.name,
        backbone=case.backbone_type,
        input_size=list(case.input_size),
        batch_size=case.batch_size,
        repeats=repeats,
        compile_backend=compile_backend,
        options=list(options),
        device=str(device),
        load=load,
        rows=rows)
