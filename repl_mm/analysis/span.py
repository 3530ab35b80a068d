"""Span diagnostic of a trained end-to-end network and the choice of RepL
sites under a budget (paper A.10 and A.11), on a model.

The fit and the chooser are torch-only math in :mod:`.span_fit` (its
docstring states the formulas): :func:`span_moments`, :func:`fit_span`,
:class:`SpanAccumulator` and :func:`choose_sites`, re-exported here (the
diagnostic's one import path). This module runs them on a model: forward
hooks collect the outputs :math:`h_k(x)` of the residual blocks
(:func:`residual_blocks`) and fit every would-be site
(:func:`collect_span_stats`); the savings are measured
(:func:`measure_savings`); :func:`run_span_diagnostic` ties these together
and :func:`to_markdown` / :func:`write_outputs` report them.

The saving of block ``i`` is measured, not modelled: the cost of the E2E
backbone minus that of the same backbone with
``replacement=dict(indices=[i])`` (:func:`measure_savings`):

- FLOPs of a training step at the config's training batch size, the
  benchmark's convention (:func:`repl_mm.analysis.flops.step_flops`:
  3 x forward + recompute + 3 x the sites' weight-space synthesis);
- activation memory: bytes the backbone's training forward saves for
  backward (:class:`~repl_mm.analysis.memory.SavedTensorMeter`).

Savings of non-adjacent sites add up (each site changes only its own
block); :func:`measure_savings` on the chosen set checks it.

The task codebases are imported when a config needs them, and models,
checkpoints and dataloaders come from :mod:`repl_mm.apis`.
"""
import copy
import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from torch import Tensor, nn

from ..apis import build_dataloader, build_model, init_model
from .cases import load_config, prepare_model_cfg, quiet
from .flops import step_flops, track_recompute
from .memory import SavedTensorMeter
from .profiling import synthesis_kept_bytes, weights_of
from .span_fit import SpanAccumulator, choose_sites, fit_span, span_moments

# -- the model side --------------------------------------------------------


def residual_blocks(backbone: nn.Module) -> List[dict]:
    """Every residual block of a backbone in forward order, numbered like
    its plan: the adapters' own enumeration
    (:func:`repl_mm.models.base.block_slots`).

    Returns:
        list[dict]: ``index`` (1-based), ``name`` (module name in the
        backbone), ``stage``, ``block`` (1-based in the stage),
        ``replaceable`` (shape-preserving).

    Raises:
        ValueError: If ``backbone`` has neither ``res_layers`` nor
            ``layers``.
    """
    # here, not at the top: repl_mm.models imports the installed codebases
    from ..models.base import block_slots
    names = {id(m): n for n, m in backbone.named_modules()}
    return [
        dict(
            name=names[id(s.parent[s.key])],
            stage=s.stage,
            block=s.block,
            replaceable=s.replaceable,
            index=i) for i, s in enumerate(block_slots(backbone), 1)
    ]


def would_be_sites(blocks: Sequence[dict]) -> List[int]:
    """Indices of shape-preserving blocks with a block before and after.

    A block that opens a stage after a down-sampling layer outside the
    blocks (a Swin stage after its patch merging, a ConvNeXt stage after
    its down-sampling layer) is one: its span holds only the neighbour of
    its shape, as its site draws only from that one.
    """
    return [b['index'] for b in blocks[1:-1] if b['replaceable']]


@torch.no_grad()
def collect_span_stats(
    model: nn.Module,
    batches,
    num_images: int,
    sites: Optional[Sequence[int]] = None
) -> Tuple[Dict[int, dict], List[dict]]:
    """Fit every would-be site of ``model.backbone`` over ``num_images``.

    Forward hooks keep the last three block outputs of a batch; when block
    ``i + 1`` has run, site ``i``'s moments are added (:class:`
    SpanAccumulator`).

    Args:
        model (nn.Module): A task model (``data_preprocessor``,
            ``backbone``), put in eval mode here.
        batches (Iterable[dict]): Batches of a dataloader.
        num_images (int): Images to use (fewer if the data run out).
        sites (Sequence[int], optional): Sites to fit. Defaults to
            :func:`would_be_sites`.

    Returns:
        tuple[dict, list]: Site index -> :func:`fit_span` result plus
        ``num_images``, ``shape`` (of h_i, per image) and ``span``
        (``'prev+next'``, ``'prev'`` or ``'next'``: the neighbours of h_i's
        shape; ``'none'``, with error 1 and no angle, when neither has
        it); and the blocks
        (:func:`residual_blocks`).
    """
    backbone = model.backbone
    blocks = residual_blocks(backbone)
    candidates = would_be_sites(blocks)
    sites = candidates if sites is None else list(sites)
    bad = [i for i in sites if i not in candidates]
    if bad:
        raise ValueError(f'sites {bad} are not would-be sites of the '
                         f'backbone (shape-preserving blocks between two '
                         f'blocks: {candidates})')
    if not sites:
        raise ValueError('the backbone has no would-be site (a '
                         'shape-preserving block between two blocks)')
    modules = dict(backbone.named_modules())
    acc = {i: SpanAccumulator() for i in sites}
    shapes: Dict[int, tuple] = {}
    outs: Dict[int, Tensor] = {}

    spans: Dict[int, Tuple[str, ...]] = {}

    def fit(i):
        # A neighbour of another shape (across a down-sampling layer: a
        # ResNet stage's first block after it, a ConvNeXt block before or
        # after it) does not serve the site, so it is not in the span.
        h = outs[i]
        basis = [(n, t)
                 for n, t in (('prev', outs[i - 1]), ('next', outs.get(i + 1)))
                 if t is not None and t.shape == h.shape]
        shapes[i] = tuple(h.shape[1:])
        spans[i] = tuple(n for n, _ in basis)
        if basis:
            acc[i].update(h, *(t for _, t in basis))

    def hook(k):

        def save(mod, args, out):
            if not isinstance(out, Tensor):
                raise TypeError(f'block {k} returned {type(out).__name__}, '
                                'expected a tensor')
            outs[k] = out.detach()
            if k - 1 in acc:
                fit(k - 1)
            for j in [j for j in outs if j < k - 1]:
                del outs[j]

        return save

    handles = [
        modules[b['name']].register_forward_hook(hook(b['index']))
        for b in blocks
    ]
    model.eval()
    seen = 0
    try:
        for data in batches:
            data = model.data_preprocessor(data, False)
            inputs = data['inputs'][:num_images - seen]
            outs.clear()
            backbone(inputs)
            seen += len(inputs)
            if seen >= num_images:
                break
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError('the dataloader gave no images')
    if seen < num_images:
        print_log(
            f'the test set has {seen} images, fewer than num_images='
            f'{num_images}: used all',
            logger='current',
            level=logging.WARNING)
    stats = {}
    for i in sites:
        names = spans[i]
        if names:
            r = acc[i].result()
            coef = dict(zip(names, r['coef']))
        else:  # no neighbour of its shape: the span is empty, h ~ 0
            r = dict(
                coef=[],
                error=1.0,
                angle=math.nan,
                error_mean=1.0,
                angle_mean=math.nan)
            coef = {}
        stats[i] = dict(
            r,
            a=coef.get('prev'),
            b=coef.get('next'),
            span='+'.join(names) or 'none',
            num_images=seen,
            shape=list(shapes[i]))
    return stats, blocks


# -- costs -----------------------------------------------------------------


class _BackboneNet(nn.Module):
    """A backbone behind the task models' ``forward(x, mode='tensor')``,
    for the benchmark's FLOP counter."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x, mode='tensor'):
        return self.backbone(x)


def backbone_costs(backbone: nn.Module, inputs: Tensor,
                   train_batch: int) -> dict:
    """Training FLOPs per step and activation bytes of a backbone.

    Measured on ``inputs`` (b images) in train mode; the parts that grow
    with the batch are scaled to ``train_batch`` images, the sites'
    weight-space synthesis (FLOPs, and kept tensors without recompute)
    is not.

    Returns:
        dict: ``flops`` (benchmark convention, synthesis included) and
        ``bytes`` (saved for backward by one training forward).
    """
    net = _BackboneNet(backbone).train()
    # a copy: the meter counts whole storages, and a slice of a larger
    # batch would count that batch as the stem's saved input
    inputs = inputs.clone()
    b = len(inputs)
    with torch.enable_grad():
        with track_recompute(net) as recomputed, SavedTensorMeter(
                weights_of(net)) as meter:
            out = net(inputs)
        del out
    kept = synthesis_kept_bytes(net)
    f = step_flops(net, inputs, recomputed)
    scale = train_batch / b
    return dict(
        flops=f['step'] * scale + f['synthesis_step'],
        bytes=(meter.bytes - kept) * scale + kept)


def measure_savings(scope: str,
                    model_cfg: dict,
                    inputs: Tensor,
                    train_batch: int,
                    site_sets: Sequence[Sequence[int]],
                    e2e: Optional[dict] = None) -> dict:
    """Fractions of the E2E backbone's training FLOPs and activation
    memory that replacing each set of sites saves.

    Args:
        scope (str): Default scope of the config.
        model_cfg (dict): Model config with a RepL backbone (any mode).
        inputs (Tensor): (b, 3, H, W) preprocessed images.
        train_batch (int): Batch size the costs are scaled to.
        site_sets (Sequence[Sequence[int]]): Sets of sites, each built as
            ``replacement=dict(mode='synthesize', indices=...)`` with the
            config's other replacement options.
        e2e (dict, optional): The E2E costs from an earlier call.

    Returns:
        dict: ``e2e`` (:func:`backbone_costs` of the E2E backbone) and
        ``sets``: per set, ``flops`` and ``memory`` (fractions saved).
    """
    repl = dict(model_cfg['backbone'].get('replacement') or {})
    for k in ('mode', 'interval', 'offset', 'indices', 'on_invalid'):
        repl.pop(k, None)

    def costs(options):
        cfg = copy.deepcopy(model_cfg)
        cfg['backbone']['replacement'] = dict(repl, **options)
        with torch.random.fork_rng(), quiet():  # same init each time,
            torch.manual_seed(0)  # the caller's RNG left as it was
            return backbone_costs(
                build_model(cfg, scope).backbone, inputs, train_batch)

    e2e = e2e or costs(dict(mode='none'))
    out = []
    for sites in site_sets:
        c = costs(
            dict(mode='synthesize', indices=list(sites), on_invalid='error'))
        out.append(
            dict(
                sites=list(sites),
                flops=1 - c['flops'] / e2e['flops'],
                memory=1 - c['bytes'] / e2e['bytes']))
    return dict(e2e=e2e, sets=out)


# -- the whole diagnostic --------------------------------------------------


def e2e_twin_config(cfg: Config) -> Config:
    """``cfg`` with its model the E2E twin the diagnostic runs: the model
    config offline with the RepL twin of a stock backbone
    (:func:`repl_mm.analysis.cases.prepare_model_cfg`), its
    replacement ``mode='none'``, and no ``ReplacementHook`` (the twin is
    the model, so a checkpoint's ``meta['repl_model']`` is not used).
    Build it with :func:`repl_mm.apis.init_model`."""
    model_cfg = prepare_model_cfg(cfg)
    repl = dict(model_cfg['backbone'].get('replacement') or {})
    if repl.get('mode', 'synthesize') != 'none':
        print_log(
            f"config's replacement mode is {repl.get('mode')!r}: the "
            "diagnostic runs the E2E twin (mode='none')",
            logger='current',
            level=logging.WARNING)
    model_cfg['backbone']['replacement'] = dict(repl, mode='none')
    out = copy.deepcopy(cfg)
    out.model = model_cfg
    hooks = out.get('custom_hooks', None) or []
    out.custom_hooks = [
        h for h in hooks
        if str(h.get('type', '')).split('.')[-1] != 'ReplacementHook'
    ]
    return out


BUDGETS = ('num_sites', 'flops_saving', 'memory_saving')


def run_span_diagnostic(config,
                        checkpoint: Optional[str],
                        num_images: int = 512,
                        batch_size: Optional[int] = None,
                        budget: Optional[Tuple[str, float]] = None,
                        costs: bool = True) -> dict:
    """Diagnose a trained E2E model and choose sites (module docstring).

    Args:
        config (str | dict | Config): The (E2E twin) config.
        checkpoint (str, optional): Its trained weights; None keeps the
            initialisation.
        num_images (int): Test images for the fit. Defaults to 512.
        batch_size (int, optional): Test batch size. Defaults to the
            config's.
        budget (tuple[str, float], optional): (one of :data:`BUDGETS`,
            value); None chooses nothing.
        costs (bool): Measure the per-block savings. Required by the FLOPs
            and memory budgets. Defaults to True.

    Returns:
        dict: ``blocks`` (one row per block: stage, block, name and, for
        would-be sites, the fit and savings), ``config_plan`` (the
        config's own sites), and given a budget ``choice``: ``indices``,
        predicted and measured savings, total error.
    """
    import repl_mm  # noqa: F401  (registers the RepL backbones, datasets)
    cfg = config if isinstance(config, Config) else load_config(config)
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    if budget is not None:
        kind, value = budget
        if kind not in BUDGETS:
            raise ValueError(f'budget must be one of {BUDGETS}, got {kind!r}')
        if kind == 'num_sites' and (value < 1 or value != int(value)):
            raise ValueError(f'num_sites must be an int >= 1, got {value}')
        if kind != 'num_sites' and not 0 < value < 1:
            raise ValueError(f'{kind} must be a fraction in (0, 1), got '
                             f'{value}')
        if kind != 'num_sites' and not costs:
            raise ValueError(f'{kind} needs the per-block costs (costs=True)')
    twin = e2e_twin_config(cfg)
    with quiet():  # the plan table and init report of the build
        model = init_model(twin, checkpoint)
        if checkpoint is None:
            model.init_weights()  # the config's initialisation
    loader = build_dataloader(
        cfg,
        'test',
        num_workers=0,
        persistent_workers=False,
        **({} if batch_size is None else dict(batch_size=batch_size)))
    stats, blocks = collect_span_stats(model, loader, num_images)
    plan = list(model.backbone.replacement_plan.indices)
    result = dict(
        config=cfg.filename if isinstance(cfg.filename, str) else None,
        checkpoint=checkpoint,
        num_images=num_images,
        blocks=[],
        config_plan=dict(indices=plan))
    savings = None
    if costs:
        first = next(iter(loader))
        inputs = model.data_preprocessor(first, False)['inputs'][:2]
        train_batch = (cfg.get('train_dataloader')
                       or {}).get('batch_size', len(inputs))
        model_cfg = prepare_model_cfg(cfg)
        measured = measure_savings(cfg.default_scope, model_cfg, inputs,
                                   train_batch, [[i] for i in stats])
        e2e_costs = measured['e2e']
        savings = {s['sites'][0]: s for s in measured['sets']}
        result['costs'] = dict(
            train_batch=train_batch,
            input_shape=list(inputs.shape[1:]),
            e2e_backbone_flops=measured['e2e']['flops'],
            e2e_backbone_bytes=measured['e2e']['bytes'])
    for b in blocks:
        row = dict(b)
        if b['index'] in stats:
            row['fit'] = stats[b['index']]
            if savings is not None:
                s = savings[b['index']]
                row.update(flops_saving=s['flops'], memory_saving=s['memory'])
        result['blocks'].append(row)
    errors = {i: s['error'] for i, s in stats.items()}
    result['config_plan'].update(_summary(plan, errors, savings))
    dead = [i for i, e in errors.items() if math.isnan(e)]
    if dead:
        print_log(
            f'blocks {dead} output zero on every image: no error, '
            'left out of the choice',
            logger='current',
            level=logging.WARNING)
        errors = {i: e for i, e in errors.items() if i not in dead}
    if budget is not None:
        kind, value = budget
        per = None if kind == 'num_sites' else {  # the live blocks'
            i: savings[i]['flops' if kind == 'flops_saving' else 'memory']
            for i in errors
        }
        chosen = choose_sites(errors, per, value, kind)
        choice = dict(
            budget={kind: value},
            indices=chosen,
            **_summary(chosen, errors, savings))
        if costs:  # savings of the whole sets, measured
            check, ref = measure_savings(cfg.default_scope, model_cfg, inputs,
                                         train_batch, [chosen, plan],
                                         e2e_costs)['sets']
            for d, m in ((choice, check), (result['config_plan'], ref)):
                d.update(
                    measured_flops_saving=m['flops'],
                    measured_memory_saving=m['memory'])
        result['choice'] = choice
    return result


def _summary(indices, errors, savings) -> dict:
    """Total error and predicted savings of a set of sites."""
    out = dict(total_error=sum(errors.get(i, math.nan) for i in indices))
    if savings is not None:
        for k in ('flops', 'memory'):
            out[f'{k}_saving'] = sum(
                savings[i][k] if i in savings else math.nan for i in indices)
    return out


def indices_line(indices: Sequence[int]) -> str:
    """The config line that replaces exactly ``indices``."""
    return f'replacement=dict(indices={list(indices)})'


def _f(v, spec='.4f'):
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) \
        else format(v, spec)


def to_markdown(result: dict) -> str:
    """A table per block and the config's and the chosen sites."""
    lines = [
        f"Span diagnostic of `{result['config']}` with "
        f"`{result['checkpoint']}` on {result['num_images']} test images.", '',
        '| block | stage.block | shape | span | r | angle (deg) | a | b '
        '| r (per image) | angle (per image) | FLOPs saved | act. mem saved '
        '| sites |', '|---' * 13 + '|'
    ]
    plan = set(result['config_plan']['indices'])
    chosen = set(result.get('choice', {}).get('indices', []))
    for row in result['blocks']:
        fit = row.get('fit')
        mark = ' '.join(m for m, s in (('config', plan), ('chosen', chosen))
                        if row['index'] in s)
        head = f"| {row['index']} | {row['stage']}.{row['block']} | "
        if fit is None:
            why = 'down-samples' if not row['replaceable'] else \
                'first block' if row['index'] == 1 else 'last block'
            lines.append(head + f'- | {why} |' + ' - |' * 8 +
                         f' {mark or "-"} |')
            continue
        lines.append(
            head + f"{'x'.join(map(str, fit['shape']))} | {fit['span']} | "
            f"{_f(fit['error'])} | {_f(fit['angle'], '.2f')} | "
            f"{_f(fit['a'])} | {_f(fit['b'])} | {_f(fit['error_mean'])} | "
            f"{_f(fit['angle_mean'], '.2f')} | "
            f"{_f(row.get('flops_saving'), '.2%')} | "
            f"{_f(row.get('memory_saving'), '.2%')} | {mark or '-'} |")
    lines.append('')
    sets = [('config plan', result['config_plan'])]
    if 'choice' in result:
        budget = ', '.join(f'{k}={v:g}'
                           for k, v in result['choice']['budget'].items())
        sets.append((f'chosen ({budget})', result['choice']))
    lines += [
        '| sites | indices | total r | FLOPs saved (sum) | act. mem '
        'saved (sum) | FLOPs saved (measured) | act. mem saved '
        '(measured) |', '|---' * 7 + '|'
    ]
    for name, s in sets:
        lines.append(f"| {name} | {s['indices']} | {_f(s['total_error'])} | "
                     f"{_f(s.get('flops_saving'), '.2%')} | "
                     f"{_f(s.get('memory_saving'), '.2%')} | "
                     f"{_f(s.get('measured_flops_saving'), '.2%')} | "
                     f"{_f(s.get('measured_memory_saving'), '.2%')} |")
    if 'choice' in result:
        lines += ['', f"`{indices_line(result['choice']['indices'])}`"]
    return '\n'.join(lines) + '\n'


def write_outputs(result: dict, out_dir: str) -> List[str]:
    """``span.json`` and ``span.md`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ('span.json', 'span.md')]
    with open(paths[0], 'w') as f:
        json.dump(result, f, indent=1)
    with open(paths[1], 'w') as f:
        f.write(to_markdown(result))
    return paths


__all__ = [
    'span_moments', 'fit_span', 'SpanAccumulator', 'choose_sites',
    'residual_blocks', 'would_be_sites', 'collect_span_stats',
    'backbone_costs', 'measure_savings', 'e2e_twin_config',
    'run_span_diagnostic', 'indices_line', 'to_markdown', 'write_outputs',
    'BUDGETS'
]
