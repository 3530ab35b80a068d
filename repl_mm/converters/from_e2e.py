"""Start RepL from a trained end-to-end model.

An E2E model (``replacement=dict(mode='none')``) and its RepL twin share a
plan (spec §1), so every module of the RepL model except the sites has the
E2E model's parameter names and shapes. :func:`convert` copies those
unchanged and *fits* each site to the block it replaces: it records the
replaced block's input :math:`x_i` and output :math:`y_i` (and residual
branch) on a few batches of the E2E model (eval mode) and fits the site's
mixing weights and fresh norm so that :math:`site(x_i) \\approx y_i`
(:func:`repl_mm.converters.site_fit.fit_site`, which says how each kind of
site is fitted).

This module is the mmengine side of the conversion: it checks that the
two configs are twins and the checkpoint is the E2E one
(:func:`check_plans`, :func:`check_e2e`), transfers the kept weights
(:func:`transfer_state`), records the blocks (:func:`record_blocks`),
writes the RepL checkpoint and, optionally, tests the E2E model and RepL
with fresh and with fitted sites (:class:`ConversionReport`). Models,
checkpoints and dataloaders come from :mod:`repl_mm.apis`.
"""
import copy
import os
import os.path as osp
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import set_random_seed
from torch import Tensor, nn

from ..apis import (build_dataloader, check_output, init_model,
                    load_checkpoint_state, repl_backbones)
from ..core import InterpolatedBlock, iter_sites
from ..models.base import PLAN_KEY, decode_plan
from .site_fit import check_max_points, fit_site

FITTABLE_MODES = ('synthesize', 'interpolate')


@dataclass
class SiteFit:
    """The fit of one site: ``backbone`` is the backbone's module name."""

    backbone: str
    index: int
    kind: str
    fresh_error: float
    fitted_error: float


@dataclass
class ConversionReport:
    """What :func:`convert` did: per-site errors and, unless skipped, the
    test metrics of the E2E model, of RepL with fresh sites and of RepL
    with fitted sites (before any training)."""

    out_file: str
    sites: List[SiteFit] = field(default_factory=list)
    metrics: Dict[str, dict] = field(default_factory=dict)

    def __str__(self):
        rows = [('backbone', 'site', 'kind', 'fresh err', 'fitted err')]
        rows += [(s.backbone, str(s.index), s.kind, f'{s.fresh_error:.4f}',
                  f'{s.fitted_error:.4f}') for s in self.sites]
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = ['relative fit error ||site(x) - y|| / ||y|| per site:']
        lines += [
            '  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
            for r in rows
        ]
        names = {
            'e2e': 'E2E',
            'repl_fresh': 'RepL, fresh sites',
            'repl_fitted': 'RepL, fitted sites'
        }
        for key, metrics in self.metrics.items():
            vals = ', '.join(
                f'{k}={v:.2f}' if isinstance(v, float) else f'{k}={v}'
                for k, v in metrics.items())
            lines.append(f'{names.get(key, key)}: {vals}')
        lines.append(f'saved {self.out_file}')
        return '\n'.join(lines)


def _listed(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def check_e2e(model: nn.Module, state: Dict[str, Tensor], path: str,
              config_name: str):
    """Raise a ``ValueError`` unless ``state`` is an E2E checkpoint of
    exactly ``model`` (same keys and shapes, no RepL plan)."""
    plans = [k for k in state if k.endswith(PLAN_KEY)]
    if plans:
        plan = decode_plan(state[plans[0]])
        raise ValueError(f'{path} is a RepL checkpoint (key {plans[0]}: mode '
                         f"{plan.get('config', {}).get('mode')!r}, indices "
                         f"{plan.get('indices')}), not an end-to-end one")
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    if missing or unexpected:
        raise ValueError(
            f'checkpoint {path} does not match the E2E config '
            f'{config_name}: missing keys [{_listed(missing)}]; unexpected '
            f'keys [{_listed(unexpected)}]')
    shapes = [
        f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}'
        for k, v in own.items() if state[k].shape != v.shape
    ]
    if shapes:
        raise ValueError(f'checkpoint {path} does not match the E2E config '
                         f'{config_name}: shapes differ (checkpoint vs '
                         f'model): {_listed(shapes)}')


def check_plans(e2e_bbs: Dict[str, nn.Module], repl_bbs: Dict[str, nn.Module]):
    """Raise a ``ValueError`` unless the E2E model is the ``mode='none'``
    twin of the RepL one: same RepL backbones, same plans, and a RepL
    mode whose sites can be fitted."""
    if not e2e_bbs:
        raise ValueError('the E2E config has no RepL backbone: use the RepL '
                         "backbone with replacement=dict(mode='none') (the "
                         'E2E twin of the RepL config)')
    if set(e2e_bbs) != set(repl_bbs):
        raise ValueError(f'RepL backbones differ: E2E config has '
                         f'{sorted(e2e_bbs)}, RepL config has '
                         f'{sorted(repl_bbs)}')
    for name, e2e in e2e_bbs.items():
        ep, rp = e2e.replacement_plan, repl_bbs[name].replacement_plan
        if ep.mode != 'none':
            raise ValueError(
                f"E2E config: {name} has replacement mode={ep.mode!r}; the "
                "E2E model must be the mode='none' twin")
        if rp.mode == 'drop':
            raise ValueError(
                f"RepL config: {name} has replacement mode='drop', which "
                'removes the replaced blocks: there is nothing to fit')
        if rp.mode not in FITTABLE_MODES:
            raise ValueError(
                f'RepL config: {name} has replacement mode={rp.mode!r}; '
                f'only modes {FITTABLE_MODES} have sites to fit')
        if (ep.num_blocks, ep.indices) != (rp.num_blocks, rp.indices):
            raise ValueError(
                f'replacement plans differ for {name}: the E2E config '
                f'plans sites {list(ep.indices)} of {ep.num_blocks} blocks, '
                f'the RepL config sites {list(rp.indices)} of '
                f'{rp.num_blocks} blocks (set the same interval/offset/'
                'indices in both)')


def _site_prefixes(model: nn.Module) -> Dict[str, nn.Module]:
    """'backbone.layer1.3.' -> site module, for every site of ``model``."""
    return {r.name + '.': r.module for r in iter_sites(model)}


def _sites_by_key(model: nn.Module) -> Dict[str, nn.Module]:
    """'backbone/5' -> what stands at site 5 of the RepL backbone named
    ``backbone`` (of an E2E twin: the block)."""
    return {f'{r.backbone}/{r.index}': r.module for r in iter_sites(model)}


@torch.no_grad()
def transfer_state(e2e_state: Dict[str, Tensor],
                   repl_model: nn.Module) -> List[str]:
    """Copy every E2E tensor that the RepL model has under the same name.

    A RepL key missing from the E2E state must belong to a site (a mixing
    weight or fresh norm); an ``InterpolatedBlock``'s own parameters
    (``<site>.block.<name>``) come from the replaced block
    (``<site>.<name>``). An E2E key the RepL model does not use must
    belong to a replaced block.

    Returns:
        list[str]: The RepL keys that kept their fresh values.
    """
    sites = _site_prefixes(repl_model)
    state = repl_model.state_dict()
    fresh, foreign, used, shapes = [], [], set(), []
    for key, value in state.items():
        if key.endswith(PLAN_KEY):
            continue
        prefix = next((p for p in sites if key.startswith(p)), None)
        src = key
        if prefix is not None and isinstance(sites[prefix],
                                             InterpolatedBlock) and \
                key.startswith(prefix + 'block.'):
            src = prefix + key[len(prefix) + len('block.'):]
        if src not in e2e_state:
            (fresh if prefix is not None else foreign).append(key)
            continue
        if e2e_state[src].shape != value.shape:
            shapes.append(f'{key} {tuple(value.shape)} <- {src} '
                          f'{tuple(e2e_state[src].shape)}')
            continue
        value.copy_(e2e_state[src])
        used.add(src)
    unused = [
        k for k in e2e_state
        if k not in used and not any(k.startswith(p) for p in sites)
    ]
    if foreign or unused or shapes:
        raise ValueError(
            'the E2E and RepL configs differ beyond the replacement: RepL '
            f'keys not in the E2E checkpoint [{_listed(foreign)}]; E2E keys '
            f'the RepL model does not use [{_listed(unused)}]; shape '
            f'mismatches [{_listed(shapes)}]')
    return fresh


def _last_norm(block: nn.Module) -> Optional[nn.Module]:
    """The norm whose output is a ResNet block's residual branch."""
    for name in ('norm3', 'norm2'):
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    return None


@torch.no_grad()
def record_blocks(model: nn.Module, blocks: Dict[str, nn.Module],
                  batches: Iterable[dict]) -> Dict[str, dict]:
    """Run ``batches`` through ``model`` (eval mode, its data
    preprocessor, then ``extract_feat``) and record, per named block, its
    input ``x``, output ``y`` and, for ResNet blocks, residual branch
    ``branch`` (concatenated over the batches), and ``args``, the block's
    further positional arguments (a Swin block's ``hw_shape``).

    Raises:
        ValueError: If a block's further arguments differ between batches
            (Swin at varying input sizes): the concatenated record would
            mix token grids.
    """
    records = {k: dict(x=[], y=[], branch=[]) for k in blocks}
    args = {}
    hooks = []
    for key, block in blocks.items():

        def on_block(mod, inputs, output, key=key):
            # clone: upstream blocks add and ReLU in place
            records[key]['x'].append(inputs[0].detach().clone())
            records[key]['y'].append(output.detach().clone())
            rest = tuple(inputs[1:])
            if args.setdefault(key, rest) != rest:
                raise ValueError(
                    f'block {key} was called with {args[key]} and then '
                    f'{rest}: recording needs one input size for all '
                    'batches (the record is concatenated over them)')

        def on_norm(mod, inputs, output, key=key):
            records[key]['branch'].append(output.detach().clone())

        hooks.append(block.register_forward_hook(on_block))
        norm = _last_norm(block)
        if norm is not None:
            hooks.append(norm.register_forward_hook(on_norm))
    model.eval()
    try:
        for data in batches:
            data = model.data_preprocessor(data, False)
            model.extract_feat(data['inputs'])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for key, rec in records.items():
        if not rec['x']:
            raise ValueError('no batch was recorded (empty dataloader?)')
        out[key] = {k: torch.cat(v) if v else None for k, v in rec.items()}
        out[key]['args'] = args.get(key, ())
    return out


def _batches(cfg, split: str, num_batches: int, seed: int):
    loader = build_dataloader(cfg, split, seed=seed)
    for i, data in enumerate(loader):
        if i >= num_batches:
            break
        yield data


def evaluate(cfg, checkpoint: str, work_dir: str, tag: str) -> dict:
    """Test metrics of ``checkpoint`` with ``cfg`` (its test dataloader and
    evaluator), through a ``RepLRunner`` as ``tools/test.py`` runs it."""
    cfg = copy.deepcopy(cfg)
    cfg.load_from = checkpoint
    cfg.resume = False
    cfg.launcher = 'none'
    cfg.work_dir = osp.join(work_dir, tag)
    cfg.experiment_name = f'e2e_to_repl_{tag}_{time.time_ns()}'
    cfg.setdefault('runner_type', 'RepLRunner')
    return dict(RUNNERS.build(cfg).test())


def _plain(value):
    if hasattr(value, 'item') and getattr(value, 'ndim', None) == 0:
        value = value.item()  # numpy / torch scalar
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def convert(e2e_config,
            e2e_checkpoint: str,
            repl_config,
            out_file: str,
            num_batches: int = 4,
            split: str = 'train',
            steps: int = 30,
            max_points: int = 32768,
            evaluate_metrics: bool = True,
            work_dir: Optional[str] = None,
            seed: int = 0,
            cfg_options: Optional[dict] = None,
            force: bool = False) -> ConversionReport:
    """Build a RepL checkpoint from a trained E2E one (module docstring).

    Args:
        e2e_config (str | Config): The E2E config (RepL backbone with
            ``mode='none'``).
        e2e_checkpoint (str): A checkpoint of that model.
        repl_config (str | Config): The RepL config (same backbone and
            plan, ``mode='synthesize'`` or ``'interpolate'``).
        out_file (str): Where to save the RepL checkpoint (mmengine format,
            ``{'state_dict', 'meta'}``).
        num_batches (int): Batches to record. Defaults to 4.
        split (str): ``'train'`` or ``'test'``: the E2E config's dataloader
            to record from. Defaults to ``'train'``.
        steps (int): L-BFGS iterations per site. Defaults to 30.
        max_points (int): Pixels or tokens per site the L-BFGS runs see.
            Defaults to 32768.
        evaluate_metrics (bool): Test the E2E model, RepL with fresh sites
            and RepL with fitted sites. Defaults to True.
        work_dir (str, optional): For the evaluation runners' logs; a
            temporary folder (removed) if None.
        seed (int): Seed of the recording dataloader. Defaults to 0.
        cfg_options (dict, optional): Overrides applied to both configs.
        force (bool): Overwrite ``out_file`` if it exists (never when it
            is one of the inputs). Defaults to False.

    Returns:
        ConversionReport: Per-site errors and the metrics.

    Raises:
        ValueError: If ``out_file`` is an input (checkpoint or config) or
            an option is out of range.
        FileExistsError: If ``out_file`` exists and ``force`` is False.
    """
    check_output(
        'out_file', out_file,
        dict(
            e2e_checkpoint=e2e_checkpoint,
            e2e_config=e2e_config,
            repl_config=repl_config), force)
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', but got "
                         f'{split!r}')
    if isinstance(num_batches,
                  bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f'num_batches must be an int >= 1, but got '
                         f'{num_batches!r}')
    check_max_points(max_points)

    e2e_name = e2e_config if isinstance(e2e_config, str) else 'E2E config'
    set_random_seed(seed)  # the recorded batches (shuffle, augmentation)
    e2e_model = init_model(e2e_config, cfg_options=cfg_options)
    repl_model = init_model(repl_config, cfg_options=cfg_options)
    e2e_cfg, repl_cfg = e2e_model.cfg, repl_model.cfg
    e2e_bbs, repl_bbs = repl_backbones(e2e_model), repl_backbones(repl_model)
    check_plans(e2e_bbs, repl_bbs)
    state = load_checkpoint_state(e2e_checkpoint)
    check_e2e(e2e_model, state, e2e_checkpoint, e2e_name)
    e2e_model.load_state_dict(state, strict=True)
    transfer_state(state, repl_model)

    tmp = tempfile.mkdtemp(prefix='e2e_to_repl_')
    runs = work_dir or tmp
    report = ConversionReport(out_file=out_file)
    meta = dict(
        converted_from=osp.abspath(e2e_checkpoint),
        e2e_config=e2e_name,
        cfg=repl_cfg.pretty_text)
    try:
        if evaluate_metrics:
            fresh = osp.join(tmp, 'repl_fresh.pth')
            torch.save(
                dict(state_dict=repl_model.state_dict(), meta={}), fresh)
        blocks, sites = _sites_by_key(e2e_model), _sites_by_key(repl_model)
        records = record_blocks(e2e_model, blocks,
                                _batches(e2e_cfg, split, num_batches, seed))
        for key, site in sites.items():
            name, i = key.rsplit('/', 1)
            rec = records[key]
            before, after = fit_site(site, rec['x'], rec['y'], rec['branch'],
                                     steps, max_points, rec['args'])
            report.sites.append(
                SiteFit(name, int(i),
                        type(site).__name__, before, after))
            print_log(
                f'{name} site {i} ({type(site).__name__}, '
                f"{len(rec['x'])} samples): relative error {before:.4f} "
                f'(fresh) -> {after:.4f} (fitted)',
                logger='current')
        meta['site_fit'] = [vars(s) for s in report.sites]
        out_dir = osp.dirname(osp.abspath(out_file))
        os.makedirs(out_dir, exist_ok=True)
        sd = {k: v.detach().cpu() for k, v in repl_model.state_dict().items()}
        torch.save(dict(state_dict=sd, meta=meta), out_file)
        if evaluate_metrics:
            report.metrics['e2e'] = evaluate(e2e_cfg, e2e_checkpoint, runs,
                                             'e2e')
            report.metrics['repl_fresh'] = evaluate(repl_cfg, fresh, runs,
                                                    'repl_fresh')
            report.metrics['repl_fitted'] = evaluate(repl_cfg, out_file, runs,
                                                     'repl_fitted')
            report.metrics = {
                k: {
                    m: _plain(v)
                    for m, v in d.items()
                }
                for k, d in report.metrics.items()
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


__all__ = [
    'ConversionReport', 'FITTABLE_MODES', 'SiteFit', 'check_e2e',
    'check_plans', 'convert', 'evaluate', 'record_blocks', 'transfer_state'
]
