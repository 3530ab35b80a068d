"""Span diagnostic of a trained end-to-end network and the choice of RepL
sites under a budget (paper A.10 and A.11).

**Diagnostic (A.10).** Let :math:`h_k(x)` be the output of residual block
``k`` for image ``x``, flattened. At every *would-be site* ``i`` (a
shape-preserving block with a block before and after it; the last block
is never one) the features are fitted by the span of the neighbours'
features, with coefficients shared over the data set:

.. math::
    (\\tilde a_i, \\tilde b_i) = \\arg\\min_{a, b} \\sum_x
        \\| h_i(x) - a h_{i-1}(x) - b h_{i+1}(x) \\|^2

and reported as the relative reconstruction error and the principal angle
between :math:`H_i` (all images' :math:`h_i` stacked) and its projection
:math:`\\Pi H_i = \\tilde a_i H_{i-1} + \\tilde b_i H_{i+1}`:

.. math::
    r_i = \\frac{\\| H_i - \\Pi H_i \\|}{\\| H_i \\|}, \\qquad
    \\theta_i = \\arccos \\frac{\\langle H_i, \\Pi H_i \\rangle}
        {\\| H_i \\| \\, \\| \\Pi H_i \\|}

(aggregated over the data set; for a least-squares fit
:math:`\\sin \\theta_i = r_i`). The paper's wording also admits the
per-image reading, so the per-image means of
:math:`\\| h_i(x) - \\Pi h_i(x) \\| / \\| h_i(x) \\|` and of the angle
between :math:`h_i(x)` and :math:`\\Pi h_i(x)` (same shared coefficients)
are reported beside them. Everything follows from the normal equations,
accumulated image by image (:func:`span_moments`): a 2x2 Gram matrix, a
2-vector and :math:`\\|h_i\\|^2` per image (a few numbers per image
and site, kept for the per-image means; the features themselves are not
kept). Where :math:`h_{i+1}` has another shape than :math:`h_i`
(``i`` ends a stage whose next block down-samples) the span is
:math:`h_{i-1}`'s alone (``b`` is None): the RepL site there draws from
its previous neighbour only too.

**Choice under a budget (beyond the paper; A.11 models the cost of
interval k, not which blocks).** Given per-block errors and savings, the
chosen sites are the set of would-be sites, no two adjacent (so each
site's neighbours are the diagnosed ``i +- 1``), whose savings meet the
budget with the lowest total error (exact, :func:`choose_sites`). When
non-adjacency does not bind and the savings are equal, these are simply
the blocks with the lowest errors. The saving of block ``i`` is measured,
not modelled: the cost of the E2E backbone minus that of the same
backbone with ``replacement=dict(indices=[i])`` (:func:`measure_savings`):

- FLOPs of a training step at the config's training batch size, the
  benchmark's convention (:func:`repl_mm.analysis.flops.step_flops`:
  3 x forward + recompute + 3 x the sites' weight-space synthesis);
- activation memory: bytes the backbone's training forward saves for
  backward (:class:`~repl_mm.analysis.memory.SavedTensorMeter`).

Savings of non-adjacent sites add up (each site changes only its own
block); :func:`measure_savings` on the chosen set checks it.

The tensor math and the chooser are plain torch functions; the task
codebases are imported when a config needs them, and models, checkpoints
and dataloaders come from :mod:`repl_mm.apis`.
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

# -- the tensor math -------------------------------------------------------


def span_moments(
        h: Tensor,
        prev: Tensor,
        nxt: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-image moments of the least-squares fit ``h ~ a prev + b nxt``.

    Args:
        h (Tensor): (B, D) features of the block, one row per image.
        prev (Tensor): (B, D) features of the block before.
        nxt (Tensor, optional): (B, D) features of the block after; None
            fits the span of ``prev`` alone.

    Returns:
        tuple[Tensor, Tensor, Tensor]: Gram matrices (B, k, k) of the
        basis (prev[, nxt]), cross products (B, k) of the basis with ``h``
        and squared norms (B, ) of ``h``, in float64; k = 2 (1 without
        ``nxt``).

    Example:
        >>> h = torch.tensor([[1., 2.]])
        >>> g, c, s = span_moments(h, torch.tensor([[1., 0.]]),
        ...                        torch.tensor([[0., 1.]]))
        >>> g.tolist(), c.tolist(), s.tolist()
        ([[[1.0, 0.0], [0.0, 1.0]]], [[1.0, 2.0]], [5.0])
    """
    rows = [prev] if nxt is None else [prev, nxt]
    for name, t in (('prev', prev), ('nxt', nxt)):
        if t is not None and t.shape != h.shape:
            raise ValueError(f'{name} has shape {tuple(t.shape)}, h has '
                             f'{tuple(h.shape)}: both must be (B, D)')
    basis = torch.stack(rows, 1).double()  # k x (B, D) -> (B, k, D)
    h = h.double()
    gram = basis @ basis.transpose(1, 2)  # (B, k, k)
    cross = (basis @ h.unsqueeze(-1)).squeeze(-1)  # (B, k, D)(B, D, 1)->(B, k)
    return gram, cross, (h * h).sum(1)


def _cosine(coef: Tensor, gram: Tensor, cross: Tensor, sq: Tensor) -> Tensor:
    """cos of the angle between h and coef . basis, from moments
    (batched over leading dims); nan where either vector is zero."""
    fit_sq = torch.einsum('...i,...ij,...j->...', coef, gram, coef)
    den = (sq * fit_sq).sqrt()
    dot = (coef * cross).sum(-1)
    return torch.where(den > 0, dot / den.clamp_min(1e-300),
                       torch.full_like(den, math.nan))


def fit_span(gram: Tensor, cross: Tensor, sq: Tensor) -> dict:
    """Least-squares coefficients, relative error and angle from moments.

    .. math::
        w = G^{+} c, \\qquad
        r = \\sqrt{(s - 2 w^T c + w^T G w) / s}, \\qquad
        \\cos\\theta = \\frac{w^T c}{\\sqrt{s \\, w^T G w}}

    Args:
        gram (Tensor): (k, k) Gram matrix summed over the data set, or
            (N, k, k) per image (summed here).
        cross (Tensor): (k, ) or (N, k) cross products.
        sq (Tensor): () or (N, ) squared norms of h.

    Returns:
        dict: ``coef`` (list of k floats; the minimum-norm solution when
        the Gram matrix is singular), ``error`` (r), ``angle`` (degrees),
        and, given per-image moments, ``error_mean`` and ``angle_mean``
        (means over images of the same quantities per image, with the
        shared coefficients; images with h = 0 are left out). ``error``
        and ``angle`` are nan when h is zero on the whole data set.
    """
    per_image = gram.dim() == 3
    g, c, s = (gram.sum(0), cross.sum(0),
               sq.sum(0)) if per_image else (gram, cross, sq)
    g, c, s = g.double(), c.double(), s.double()
    coef = torch.linalg.pinv(g) @ c
    res = (s - 2 * coef @ c + coef @ g @ coef).clamp_min(0)
    out = dict(
        coef=coef.tolist(),
        error=float((res / s).sqrt()) if s > 0 else math.nan,
        angle=float(
            torch.rad2deg(torch.arccos(_cosine(coef, g, c, s).clamp(-1, 1)))))
    if per_image:
        gram, cross, sq = gram.double(), cross.double(), sq.double()
        res_i = (sq - 2 * cross @ coef +
                 torch.einsum('i,nij,j->n', coef, gram, coef)).clamp_min(0)
        ok = sq > 0
        err_i = (res_i[ok] / sq[ok]).sqrt()
        ang_i = torch.rad2deg(
            torch.arccos(
                _cosine(coef, gram[ok], cross[ok], sq[ok]).clamp(-1, 1)))
        out['error_mean'] = float(err_i.mean()) if ok.any() else math.nan
        out['angle_mean'] = float(ang_i.nanmean()) if ok.any() else math.nan
    return out


class SpanAccumulator:
    """Streams :func:`span_moments` of one site over batches.

    Keeps (k*k + k + 1) float64 numbers per image, never the features.

    Example:
        >>> acc = SpanAccumulator()
        >>> prev, nxt = torch.randn(4, 10), torch.randn(4, 10)
        >>> acc.update(0.3 * prev + 0.6 * nxt, prev, nxt)
        >>> [round(v, 4) for v in acc.result()['coef']]
        [0.3, 0.6]
    """

    def __init__(self):
        self._moments: List[Tuple[Tensor, Tensor, Tensor]] = []

    @property
    def num_images(self) -> int:
        return sum(len(m[2]) for m in self._moments)

    def update(self, h: Tensor, prev: Tensor, nxt: Optional[Tensor] = None):
        """Add a batch: (B, ...) features, flattened per image here."""
        self._moments.append(
            span_moments(
                h.flatten(1), prev.flatten(1),
                None if nxt is None else nxt.flatten(1)))

    def result(self) -> dict:
        """:func:`fit_span` over every image added so far."""
        if not self._moments:
            raise ValueError('SpanAccumulator has no images')
        gram, cross, sq = (torch.cat(t) for t in zip(*self._moments))
        return fit_span(gram, cross, sq)


# -- the choice under a budget ---------------------------------------------


def choose_sites(errors: Dict[int, float],
                 savings: Optional[Dict[int, float]],
                 budget: float,
                 option: str = 'num_sites') -> List[int]:
    """Non-adjacent sites meeting a budget with the lowest total error.

    Minimises :math:`\\sum_{i \\in S} r_i` over sets S of candidate blocks
    with no two consecutive indices and :math:`\\sum_{i \\in S} s_i \\ge B`
    (ties: fewer sites, then lower indices), exactly, by dynamic
    programming along the blocks over the Pareto front of (saving, error,
    size); savings above the budget count as the budget. With unit
    savings (``savings=None``) and ``budget=N`` it chooses exactly N
    sites.

    Args:
        errors (dict[int, float]): Candidate block index -> error r_i.
        savings (dict[int, float], optional): Index -> saving s_i (same
            keys). None: every site saves 1 (count sites).
        budget (float): B, > 0.
        option (str): The option the budget came from, for messages.
            Defaults to 'num_sites'.

    Returns:
        list[int]: The chosen indices, ascending.

    Raises:
        ValueError: If no such set reaches the budget (the message gives
            the most any non-adjacent set saves).

    Example:
        >>> choose_sites({2: 0.1, 3: 0.05, 4: 0.2, 6: 0.3}, None, 2)
        [2, 4]
    """
    if savings is None:
        savings = {i: 1.0 for i in errors}
    if set(savings) != set(errors):
        raise ValueError(f'errors and savings must have the same blocks, '
                         f'got {sorted(errors)} and {sorted(savings)}')
    if not budget > 0:
        raise ValueError(f'{option} must be > 0, got {budget}')
    tol = 1e-9 * max(1.0, abs(budget))
    # entries: (capped saving, total error, sites); pruned per step to the
    # Pareto front within two groups: last candidate taken or not.
    front = [(0.0, 0.0, ())]
    for i in sorted(errors):
        taken = [(min(budget, s + savings[i]), e + errors[i], sites + (i, ))
                 for s, e, sites in front if not sites or sites[-1] != i - 1]
        front = _pareto(front) + _pareto(taken)
    done = [f for f in front if f[0] >= budget - tol]
    if not done:
        best = _max_saving(savings)
        raise ValueError(
            f'{option}={budget:g} is unreachable: non-adjacent sites among '
            f'blocks {sorted(errors)} save at most {best:g}')
    return list(min(done, key=lambda f: (f[1], len(f[2]), f[2]))[2])


def _pareto(entries: list) -> list:
    """Entries not dominated in (more saving, less error, fewer sites)."""
    entries = sorted(entries, key=lambda f: (-f[0], f[1], len(f[2]), f[2]))
    kept = []
    for f in entries:
        if not any(k[0] >= f[0] and k[1] <= f[1] and len(k[2]) <= len(f[2])
                   for k in kept):
            kept.append(f)
    return kept


def _max_saving(savings: Dict[int, float]) -> float:
    """Largest total saving of non-adjacent blocks (a max-weight
    independent set on a path)."""
    with_last = without_last = 0.0  # best totals with / without the last
    last = None
    for i in sorted(savings):
        best = max(with_last, without_last)
        base = without_last if last == i - 1 else best
        with_last, without_last = base + savings[i], best
        last = i
    return max(with_last, without_last)


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
    """Indices of shape-preserving blocks with a block before and after."""
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
