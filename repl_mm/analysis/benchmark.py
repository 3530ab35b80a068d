"""Efficiency benchmark: E2E against RepL, drop, stochastic depth and
activation checkpointing on one plan, one input and one process.

For every case (a model config and an input size) each *method* builds its
model from the same config with another backbone ``replacement`` dict and
flags (:data:`METHODS`), and is measured on the same synthetic batch:

- parameters (whole model and backbone);
- FLOPs of a training step, counted by :class:`mmengine.analysis.
  FlopAnalyzer` (multiply-adds, its convention): ``3 x forward`` plus the
  forward that backward re-runs (checkpointed blocks, recomputing sites),
  with the weight-space synthesis of the sites (which does not grow with
  the batch) reported apart;
- activation memory: bytes saved for backward by one training forward
  (:class:`repl_mm.analysis.memory.SavedTensorMeter`, deterministic);
- peak memory of one step: the allocator's high-water mark over the step
  above its level at the start, so nothing carries over between methods
  (CPU: torch profiler with ``profile_memory``; CUDA:
  ``max_memory_allocated`` after ``reset_peak_memory_stats``);
- step time (zero grad, forward, backward, SGD step): warm-up, then trials
  in which every method runs once, round robin, reported as the median of
  per-trial ratios to E2E with the interquartile range (on CUDA each timed
  step is bracketed by ``torch.cuda.synchronize``).

Models and batch live on one device (``run_case(..., device=)``: CPU by
default, or ``cuda[:N]``); :mod:`repl_mm.analysis.device` holds the only
device-specific code (timer, peak memory).

Derived: the saving efficiency S = (E2E - X) / (E2E - drop) of memory and
time (:func:`saving_efficiency`). ``docs/benchmark.md`` states every
convention and the measured suite.

Only torch and mmengine are imported here; mmdet, mmseg, mmpretrain and
matplotlib are imported when a case or a plot needs them.
"""
import copy
import functools
import gc
import importlib
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import elementwise_flop_counter, get_shape
from mmengine.config import Config, ConfigDict
from mmengine.logging import MMLogger, print_log
from torch import nn

from ..core import ConvSite, NonReentrantCheckpoint, TransformerSite
from .device import (describe_device, device_timer, peak_allocated,
                     peak_memory, resolve_device)
from .memory import SavedTensorMeter

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

# (default scope, upstream backbone type) -> our registered twin
TWINS = {
    ('mmdet', 'ResNet'): 'RepLResNet',
    ('mmseg', 'ResNetV1c'): 'RepLResNetV1c',
    ('mmpretrain', 'ResNet'): 'RepLResNet',
    ('mmpretrain', 'ResNet_CIFAR'): 'RepLResNet_CIFAR',
    ('mmpretrain', 'VisionTransformer'): 'RepLVisionTransformer',
}
# Twins whose upstream class has ``drop_path_rate`` (the others: no 'sd').
DROP_PATH_TWINS = {('mmpretrain', t)
                   for t in ('RepLResNet', 'RepLResNet_CIFAR',
                             'RepLVisionTransformer')}
TASKS = {'mmpretrain': 'cls', 'mmdet': 'det', 'mmseg': 'seg'}
DEFAULT_SIZE = {'cls': 224, 'det': 320, 'seg': 256}
# the project's targets of S_mem (activation memory) per backbone family:
# the share of drop's saving RepL should keep (docs/benchmark.md)
S_MEM_TARGETS = {'cifar': 0.70, 'bottleneck': 0.65, 'vit': 0.90}
S_TIME_TARGET = 0.8
CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # RepLResNet_CIFAR's 3-stage nets


def _cls_model(backbone: dict, in_channels: int, num_classes: int,
               vit: bool = False) -> dict:
    head = dict(
        type='VisionTransformerClsHead' if vit else 'LinearClsHead',
        num_classes=num_classes,
        in_channels=in_channels,
        loss=dict(type='CrossEntropyLoss'))
    return dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=None if vit else dict(type='GlobalAveragePooling'),
        head=head)


# name -> config and, for the full and the quick run, (input size, batch,
# timed trials); sized so the full suite takes ~20 min on 2 CPU cores.
SUITE: Dict[str, dict] = {
    'cifar-r32': dict(
        config=dict(default_scope='mmpretrain', model=_cls_model(
            dict(type='RepLResNet_CIFAR', depth=32), 64, 10)),
        full=(32, 64, 10), quick=(32, 8, 2)),
    'cifar-r110': dict(
        config=dict(default_scope='mmpretrain', model=_cls_model(
            dict(type='RepLResNet_CIFAR', depth=110), 64, 10)),
        full=(32, 32, 6), quick=(32, 4, 2)),
    'resnet50': dict(
        config=dict(default_scope='mmpretrain', model=_cls_model(
            dict(type='RepLResNet', depth=50), 2048, 1000)),
        full=(224, 4, 4), quick=(112, 2, 2)),
    'deit-s': dict(
        config=dict(default_scope='mmpretrain', model=_cls_model(
            dict(type='RepLVisionTransformer', arch='deit-small',
                 img_size=224, patch_size=16), 384, 1000, vit=True)),
        full=(224, 4, 4), quick=(224, 2, 2)),
    'retinanet-r50': dict(
        config='mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
        full=(320, 2, 3), quick=(192, 1, 2)),
    # batch >= 2: ASPP's image-pool BN needs more than one value
    'deeplabv3-r50': dict(
        config='mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-'
        '512x1024.py',
        full=(256, 2, 3), quick=(128, 2, 2)),
}


@dataclass
class Case:
    """One model config measured at one input size and batch.

    Args:
        name (str): Label of the case in the outputs.
        scope (str): Default scope (``mmpretrain``, ``mmdet``, ``mmseg``).
        model (dict): Model config, backbone switched to a RepL twin.
        input_size (tuple[int, int]): (H, W) of the synthetic batch.
        batch_size (int): Samples per step.
        repeats (int): Timed trials (every method once per trial).
        source (str): Where the config came from.
        indices (tuple[int], optional): Sites of method ``repl_idx``.
        config_plan (bool): The k = 4 methods (``repl``, ``drop``,
            ``repl+cp``, ...) keep the config's own sites (its
            ``indices``, e.g. the paper's ViT sites 3, 7, 11) instead of
            ``interval=4``. Defaults to False.
    """

    name: str
    scope: str
    model: dict
    input_size: tuple
    batch_size: int
    repeats: int
    source: str = ''
    indices: Optional[tuple] = None
    config_plan: bool = False

    @property
    def task(self) -> str:
        return TASKS[self.scope]

    @property
    def backbone_type(self) -> str:
        return self.model['backbone']['type']

    @property
    def depth(self) -> Optional[int]:
        return self.model['backbone'].get('depth')


def backbone_family(backbone: str, depth: Optional[int]) -> Optional[str]:
    """'cifar' (He et al.'s CIFAR ResNets), 'vit', 'bottleneck' (ResNet-50
    and deeper) or None: which issue-3 target applies."""
    if 'VisionTransformer' in backbone:
        return 'vit'
    if 'CIFAR' in backbone and depth in CIFAR_DEPTHS:
        return 'cifar'
    return 'bottleneck' if depth is not None and depth >= 50 else None


# -- configs ---------------------------------------------------------------
def load_config(config) -> Config:
    """A Config from a dict, a file or an ``mmdet::``-style package path."""
    if isinstance(config, dict):
        return Config(copy.deepcopy(config))
    if '::' in config:
        from mmengine.hub import get_config
        return get_config(config)
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config file {config!r} does not exist')
    return Config.fromfile(config)


def _offline(node):
    """In place: SyncBN -> BN and no pretrained weights anywhere."""
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
        if 'pretrained' in node:
            node['pretrained'] = None
        init = node.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            node['init_cfg'] = None
        for v in node.values():
            _offline(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _offline(v)


def prepare_model_cfg(cfg: Config) -> dict:
    """The model config of ``cfg`` as a plain dict, offline (no pretrained
    weights, BN instead of SyncBN), its backbone switched to the RepL twin
    of a stock upstream type.

    Raises:
        ValueError: If the default scope or the backbone is not supported.
    """
    scope = cfg.get('default_scope')
    if scope not in TASKS:
        raise ValueError(f'default_scope must be one of {sorted(TASKS)}, '
                         f'got {scope!r}')
    model = cfg.model.to_dict() if isinstance(
        cfg.model, ConfigDict) else copy.deepcopy(cfg.model)
    _offline(model)
    backbone = model['backbone']
    btype = backbone['type'].split('.')[-1]
    if btype in TWINS.values():
        backbone['type'] = btype
    elif (scope, btype) in TWINS:
        backbone['type'] = TWINS[scope, btype]
    else:
        raise ValueError(
            f'backbone type {backbone["type"]!r} (scope {scope}) has no RepL '
            f'twin; supported: {sorted(set(k[1] for k in TWINS))} and their '
            'RepL names')
    return model


def default_input_size(scope: str, backbone: dict) -> int:
    """32 for CIFAR ResNets, a ViT's ``img_size``, else the task's size."""
    if 'CIFAR' in backbone['type']:
        return 32
    if 'VisionTransformer' in backbone['type']:
        return backbone.get('img_size', 224)
    return DEFAULT_SIZE[TASKS[scope]]


def make_case(config,
              name: Optional[str] = None,
              input_size=None,
              batch_size: int = 2,
              repeats: int = 3) -> Case:
    """A :class:`Case` from a config (dict, file or ``pkg::path``).

    Args:
        config (dict | str): The config.
        name (str, optional): Label. Defaults to the file's stem.
        input_size (int | tuple[int, int], optional): Input (H, W).
            Defaults to :func:`default_input_size`.
        batch_size (int): Defaults to 2.
        repeats (int): Timed trials. Defaults to 3.
    """
    cfg = load_config(config)
    model = prepare_model_cfg(cfg)
    if input_size is None:
        input_size = default_input_size(cfg.default_scope, model['backbone'])
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if name is None:
        name = 'config' if isinstance(config, dict) else os.path.splitext(
            os.path.basename(config))[0]
    return Case(name, cfg.default_scope, model, tuple(input_size),
                batch_size, repeats,
                source=config if isinstance(config, str) else 'built-in')


def suite_cases(names: Sequence[str] = (), quick: bool = False) -> List[Case]:
    """The built-in cases (all when ``names`` is empty)."""
    unknown = sorted(set(names) - set(SUITE))
    if unknown:
        raise ValueError(f'unknown suite case(s) {unknown}; known: '
                         f'{list(SUITE)}')
    return [
        make_case(s['config'], n, *s['quick' if quick else 'full'])
        for n, s in SUITE.items() if not names or n in names
    ]


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


@contextmanager
def _quiet():
    """Silence INFO logs (plan tables, init reports) of model builds."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel('WARNING')
    try:
        yield
    finally:
        logger.setLevel(level)


def build_model(scope: str, model_cfg: dict) -> nn.Module:
    """Build with the registry of ``scope``, initialise, train mode."""
    import repl_mm  # noqa: F401  (registers the RepL backbones)
    from mmengine.registry import DefaultScope
    registry = importlib.import_module(f'{scope}.registry')
    with DefaultScope.overwrite_default_scope(scope), _quiet():
        model = registry.MODELS.build(copy.deepcopy(model_cfg))
        model.init_weights()
    return model.train()


# -- synthetic batches -----------------------------------------------------
def make_batch(case: Case, model: nn.Module, seed: int = 0) -> tuple:
    """(inputs, data_samples) for ``model.loss``: normalised noise images
    (B, 3, H, W) and random labels, boxes or label maps."""
    g = torch.Generator().manual_seed(seed)
    h, w = case.input_size
    b = case.batch_size
    inputs = torch.randn(b, 3, h, w, generator=g)
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))
    if case.task == 'cls':
        from mmpretrain.structures import DataSample
        n = model.head.num_classes
        labels = torch.randint(n, (b, ), generator=g)
        samples = [DataSample().set_gt_label(int(y)) for y in labels]
    elif case.task == 'det':
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData
        n = model.bbox_head.num_classes
        samples = []
        for _ in range(b):
            xy = torch.rand(4, 2, generator=g) * torch.tensor([w, h]) * 0.6
            wh = (torch.rand(4, 2, generator=g) * 0.35 + 0.05) * torch.tensor(
                [w, h])
            s = DetDataSample(metainfo=dict(
                meta, batch_input_shape=(h, w), scale_factor=(1., 1.)))
            s.gt_instances = InstanceData(
                bboxes=torch.cat([xy, xy + wh], 1),  # (4, 4) x1y1x2y2
                labels=torch.randint(n, (4, ), generator=g))
            samples.append(s)
    else:
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        n = model.decode_head.num_classes
        samples = []
        for _ in range(b):
            s = SegDataSample(metainfo=meta)
            s.gt_sem_seg = PixelData(
                data=torch.randint(n, (1, h, w), generator=g))
            samples.append(s)
    return inputs, samples


def to_device(batch: tuple, device) -> tuple:
    """``(inputs, data_samples)`` on ``device`` (unchanged on CPU, where
    :func:`make_batch` builds it)."""
    device = torch.device(device)
    if device.type == 'cpu':
        return batch
    inputs, samples = batch
    return inputs.to(device), [s.to(device) for s in samples]


def training_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """The scalar loss of ``model.loss`` on a synthetic batch."""
    loss, _ = model.parse_losses(model.loss(*batch))
    return loss


# -- FLOPs -----------------------------------------------------------------
def _sdpa_flop_jit(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention (no mmengine handle): Q K^T and
    the product with V, q (..., N, d), k (..., S, d), v (..., S, dv)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


# ops of the weight-space synthesis that mmengine counts as free
_ELEMENTWISE = {
    'aten::mul': elementwise_flop_counter(0, 1),
    'aten::add': elementwise_flop_counter(0, 1),
    'aten::sum': elementwise_flop_counter(1, 0),
}


class _Call(nn.Module):
    """Holds ``model`` (so its weights are traced as parameters) and runs
    ``fn(model, *args)``."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, *args):
        return self._fn(self.model, *args)


class _Synthesis(nn.Module):
    """Calls one site's ``synthesize()``; the site is not registered (the
    wrapper below holds the model), so the trace scopes it by this shim."""

    def __init__(self, site: nn.Module):
        super().__init__()
        self.__dict__['site'] = site

    def forward(self) -> tuple:
        mats = self.site.synthesize()
        return tuple(mats.values() if isinstance(mats, dict) else mats)


def _sites(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (ConvSite, TransformerSite))}


def _analyze(module: nn.Module, inputs: tuple,
             handles: Optional[dict] = None) -> FlopAnalyzer:
    analyzer = FlopAnalyzer(module, inputs)
    analyzer.set_op_handle('aten::scaled_dot_product_attention',
                           _sdpa_flop_jit, **(handles or {}))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer


def synthesis_flops(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """FLOPs of one weight-space synthesis per site (per forward, any
    batch), by site name. ``counted``: what mmengine's default handles
    count (matmuls; also inside the traced forward); ``total``: with the
    element-wise ops (kernel tap sums, channel scaling, sums) too."""
    sites = _sites(model)
    if not sites:
        return dict(counted={}, total={})
    shims = nn.ModuleList(_Synthesis(s) for s in sites.values())
    wrapper = _Call(model, lambda m, _: tuple(t for s in shims for t in s()))
    wrapper.shims = shims
    out = {}
    with torch.no_grad():
        for kind, handles in (('counted', None), ('total', _ELEMENTWISE)):
            per = _analyze(wrapper, (torch.zeros(1), ), handles).by_module()
            out[kind] = {n: per[f'shims.{i}'] for i, n in enumerate(sites)}
    return out


def forward_flops(model: nn.Module, inputs: torch.Tensor) -> dict:
    """Traced forward (``mode='tensor'``, no loss) in train mode, without
    autograd: {'total', 'by_module' (names of ``model``), 'unsupported'}."""
    wrapper = _Call(model, lambda m, x: m(x, mode='tensor'))
    with torch.no_grad():
        analyzer = _analyze(wrapper, (inputs, ))
        by_module = {
            k[len('model.'):]: v
            for k, v in analyzer.by_module().items() if k.startswith('model.')
        }
        return dict(total=analyzer.total(), by_module=by_module,
                    unsupported=dict(analyzer.unsupported_ops()))


@contextmanager
def track_recompute(model: nn.Module):
    """Yield a dict that a training forward inside the block fills with
    the modules whose forward backward re-runs: ``'all'`` for a block or
    site checkpointed non-reentrantly (``with_cp`` and an input that needs
    grad, as their forward decides), ``'update'`` for a recomputing site
    (its light update, not its synthesis)."""
    found: Dict[str, str] = {}

    def hook(name):

        def pre(mod, args):
            if not torch.is_grad_enabled():
                return
            if mod.with_cp and args[0].requires_grad:
                found[name] = 'all'
            elif getattr(mod, 'recompute', False) and not mod.with_cp and (
                    args[0].requires_grad
                    or any(p.requires_grad for p in mod.parameters())):
                found[name] = 'update'

        return pre

    handles = [
        m.register_forward_pre_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (ConvSite, TransformerSite, NonReentrantCheckpoint))
    ]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def step_flops(model: nn.Module,
               inputs: torch.Tensor,
               recomputed: Dict[str, str],
               cache: Optional[dict] = None,
               key=None) -> dict:
    """FLOPs of one training step (see the module docstring).

    Args:
        model (nn.Module): In train mode.
        inputs (Tensor): (B, 3, H, W).
        recomputed (dict[str, str]): From :func:`track_recompute`.
        cache (dict, optional): Forward analyses by ``key``: methods that
            differ only in checkpointing, stochastic depth or recompute
            trace the same forward.
        key (hashable, optional): Cache key.

    Returns:
        dict: ``forward`` (per batch, synthesis excluded), ``synthesis``
        (per forward, element-wise ops included), ``recompute`` (forward
        re-run in backward, synthesis excluded), ``step`` (3 x forward +
        recompute) and ``synthesis_step`` (3 x synthesis).
    """
    if cache is not None and key in cache:
        fwd = cache[key]
    else:
        fwd = forward_flops(model, inputs)
        if cache is not None:
            cache[key] = fwd
    syn = synthesis_flops(model)
    forward = fwd['total'] - sum(syn['counted'].values())
    recompute = sum(
        fwd['by_module'].get(n, 0) -
        (syn['counted'].get(n, 0) if kind == 'update' else 0)
        for n, kind in recomputed.items())
    synthesis = sum(syn['total'].values())
    return dict(forward=forward, synthesis=synthesis, recompute=recompute,
                step=3 * forward + recompute, synthesis_step=3 * synthesis,
                unsupported=fwd['unsupported'])


# -- memory and time -------------------------------------------------------
def _weights(model: nn.Module) -> list:
    return list(model.parameters()) + list(model.buffers())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               batch: tuple, meter: Optional[SavedTensorMeter] = None):
    """Zero grad, forward (inside ``meter`` if given), backward, SGD step;
    gradients are freed again afterwards."""
    optimizer.zero_grad(set_to_none=True)
    if meter is None:
        loss = training_loss(model, batch)
    else:
        with meter:
            loss = training_loss(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_memory(model: nn.Module, optimizer: torch.optim.Optimizer,
                   batch: tuple, device='cpu') -> dict:
    """``saved_bytes`` (saved for backward by the forward, weights
    excluded) and ``peak_bytes`` (:func:`~repl_mm.analysis.device.
    peak_memory` on ``device``, where model and batch are) of one step,
    and the part of ``saved_bytes`` that is weight-space synthesis
    (:func:`synthesis_kept_bytes`)."""
    meter = SavedTensorMeter(_weights(model))
    torch.manual_seed(0)
    peak = peak_memory(lambda: train_step(model, optimizer, batch, meter),
                       device)
    return dict(saved_bytes=meter.bytes, peak_bytes=peak,
                synthesis_kept_bytes=synthesis_kept_bytes(model))


def synthesis_kept_bytes(model: nn.Module) -> int:
    """Bytes of weight-space tensors that the sites' synthesis keeps for
    backward in a training forward: what autograd saves inside
    ``synthesize()`` and the synthesized matrices themselves (the site's
    chain keeps them). They do not grow with the batch. Sites that
    recompute (``recompute=True``, the default: the synthesis re-runs in
    backward) or checkpoint (``with_cp``) keep none."""
    meter = SavedTensorMeter(_weights(model))
    sites = [
        s for s in _sites(model).values()
        if not s.with_cp and not getattr(s, 'recompute', False)
    ]
    with torch.enable_grad(), meter:
        mats = [t for s in sites for t in _Synthesis(s)()]
    for t in mats:
        if t.requires_grad:
            meter._record(t)
    return meter.bytes


def time_round_robin(steps: Dict[str, Callable[[], None]], repeats: int,
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


def saving_efficiency(e2e: float, x: float, drop: float) -> Optional[float]:
    """S = (E2E - X) / (E2E - drop): the share of what dropping the sites
    saves that method X keeps; None when drop saves nothing."""
    if e2e == drop:
        return None
    return (e2e - x) / (e2e - drop)


# -- one case --------------------------------------------------------------
def run_case(case: Case,
             methods: Sequence[str] = tuple(METHODS),
             warmup: int = 0,
             device='cpu') -> dict:
    """Measure every applicable method of ``case`` on ``device`` (``'cpu'``,
    ``'cuda'``, ``'cuda:N'``: models and batch live there); see the module
    doc."""
    if 'e2e' not in methods:
        raise ValueError("methods must include 'e2e' (the reference)")
    device = resolve_device(device)
    logger = MMLogger.get_current_instance()
    h, w = case.input_size
    print_log(f'[{case.name}] {case.backbone_type} ({case.task}), input '
              f'{case.batch_size}x3x{h}x{w}, {case.repeats} trials, on '
              f'{device}', logger=logger)
    models, optims, batch, flop_cache, out = {}, {}, None, {}, {}
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
        opt = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=1e-3, momentum=0.9)
        backbone = model.backbone
        plan = backbone.replacement_plan
        rep = cfg['backbone']['replacement']
        key = tuple(sorted((k, str(v)) for k, v in rep.items()
                           if k != 'recompute'))
        with track_recompute(model) as recomputed:
            train_step(model, opt, batch)  # warm-up: momentum buffers
        flops = step_flops(model, batch[0], recomputed, flop_cache, key)
        mem = measure_memory(model, opt, batch, device)
        out[m] = dict(
            sites=list(plan.indices) if plan.mode != 'none' else [],
            plan_sites=list(plan.indices),
            params=sum(p.numel() for p in model.parameters()),
            backbone_params=sum(p.numel() for p in backbone.parameters()),
            flops=flops, **mem)
        models[m], optims[m] = model, opt
        print_log(
            f'[{case.name}] ({i}/{len(methods)}) {m}: sites '
            f'{out[m]["sites"]}, {out[m]["params"] / 1e6:.2f} M params, '
            f'{flops["step"] / 1e9:.2f} GFLOPs/step, activations '
            f'{mem["saved_bytes"] / 2**20:.1f} MB, peak '
            f'{mem["peak_bytes"] / 2**20:.1f} MB '
            f'({time.perf_counter() - t0:.1f} s)', logger=logger)
    print_log(f'[{case.name}] timing {len(models)} methods x {case.repeats} '
              f'trials (+{warmup} warm-up), round robin', logger=logger)
    times = time_round_robin(
        {m: (lambda m=m: train_step(models[m], optims[m], batch))
         for m in models}, case.repeats, warmup, device)
    for m, r in out.items():
        t = np.asarray(times[m]) * 1e3
        r['time_ms'] = dict(median=float(np.median(t)),
                            q1=float(np.percentile(t, 25)),
                            q3=float(np.percentile(t, 75)))
        r['time_ratio'] = ratio_stats(times[m], times['e2e'])
    return dict(name=case.name, source=case.source, task=case.task,
                backbone=case.backbone_type, depth=case.depth,
                input_size=list(case.input_size),
                batch_size=case.batch_size, repeats=case.repeats,
                warmup=warmup, device=str(device), methods=out)


def _derive(out: Dict[str, dict]):
    """Ratios to E2E and saving efficiencies, in place. ``S_mem_large_batch``
    takes the batch-independent synthesis tensors out of the activation
    memory: the limit of ``S_mem`` as the batch grows."""
    ref = out['e2e']
    for r in out.values():
        r['mem_ratio'] = r['saved_bytes'] / ref['saved_bytes']
        r['peak_ratio'] = r['peak_bytes'] / ref['peak_bytes']
        r['mem_ratio_large_batch'] = (
            r['saved_bytes'] - r['synthesis_kept_bytes']) / ref['saved_bytes']
        r['flops_ratio'] = (r['flops']['step'] + r['flops']['synthesis_step']
                            ) / ref['flops']['step']
    drop = out.get('drop')
    plan = drop and drop['plan_sites']
    ratio = {
        'S_mem': lambda r: r['mem_ratio'],
        'S_mem_large_batch': lambda r: r['mem_ratio_large_batch'],
        'S_peak': lambda r: r['peak_ratio'],
        'S_time': lambda r: r['time_ratio']['median'],
        'S_flops': lambda r: r['flops_ratio'],
    }
    for r in out.values():
        for s, get in ratio.items():
            # S compares with dropping the same sites: none for another plan
            r[s] = None if r['plan_sites'] != plan else saving_efficiency(
                1.0, get(r), get(drop))


def check_targets(case: dict) -> List[dict]:
    """The project's targets (:data:`S_MEM_TARGETS`) for one case's
    results: S_mem (activation memory) and S_time of 'repl', and 'repl+cp'
    below 'cp' in activation memory."""
    ms, rows = case['methods'], []
    repl = ms.get('repl')
    if repl is not None and repl['S_mem'] is not None:
        goal = S_MEM_TARGETS.get(backbone_family(case['backbone'],
                                              case.get('depth')))
        if goal is not None:
            rows.append(dict(target=f'repl S_mem >= {goal:.2f}',
                             value=repl['S_mem'], met=repl['S_mem'] >= goal))
        if repl['S_time'] is not None:
            rows.append(dict(target=f'repl S_time >= {S_TIME_TARGET} (aim)',
                             value=repl['S_time'],
                             met=repl['S_time'] >= S_TIME_TARGET))
    if 'cp' in ms and 'repl+cp' in ms:
        rows.append(dict(target='act. mem repl+cp / cp < 1',
                         value=ms['repl+cp']['saved_bytes'] /
                         ms['cp']['saved_bytes'],
                         met=ms['repl+cp']['saved_bytes'] <
                         ms['cp']['saved_bytes']))
    for r in rows:
        r['case'] = case['name']
    return rows


# -- outputs ---------------------------------------------------------------
def _fmt(v, spec='.3f'):
    return '-' if v is None else format(v, spec)


def to_markdown(results: dict) -> str:
    """One table per case and the targets table."""
    mb = 2.0**20
    lines = []
    for c in results['cases']:
        h, w = c['input_size']
        on = '' if c.get('device', 'cpu') == 'cpu' else f", on {c['device']}"
        lines += [
            f"### {c['name']}: {c['backbone']}, batch {c['batch_size']} x "
            f'3x{h}x{w}, {c["repeats"]} trials{on}', '',
            '| method | sites | params (M) | GFLOPs/step | synth. GFLOPs/'
            'step | act. mem (MB) | x E2E | of it synth. (MB) | peak (MB) | '
            'x E2E | step (ms) | time x E2E [IQR] | S_mem | S_mem B->inf | '
            'S_peak | S_time | S_flops |', '|---' * 17 + '|'
        ]
        for m, r in c['methods'].items():
            tr, f = r['time_ratio'], r['flops']
            lines.append(
                f"| {m} | {r['sites'] or '-'} | {r['params'] / 1e6:.2f} | "
                f"{f['step'] / 1e9:.2f} | {f['synthesis_step'] / 1e9:.4f} | "
                f"{r['saved_bytes'] / mb:.1f} | {r['mem_ratio']:.3f} | "
                f"{r['synthesis_kept_bytes'] / mb:.1f} | "
                f"{r['peak_bytes'] / mb:.1f} | {r['peak_ratio']:.3f} | "
                f"{r['time_ms']['median']:.0f} | {tr['median']:.3f} "
                f"[{tr['q1']:.3f}, {tr['q3']:.3f}] | " + ' | '.join(
                    _fmt(r[k]) for k in ('S_mem', 'S_mem_large_batch',
                                         'S_peak', 'S_time', 'S_flops')) +
                ' |')
        lines.append('')
    if results.get('targets'):
        lines += ['### Issue-3 targets', '',
                  '| case | target | value | met |', '|---|---|---|---|']
        lines += [
            f"| {t['case']} | {t['target']} | {t['value']:.3f} | "
            f"{'yes' if t['met'] else 'no'} |" for t in results['targets']
        ]
        lines.append('')
    return '\n'.join(lines)


def plot_ratios(results: dict, path: str):
    """Bars of time (median, IQR whiskers), activation-memory and peak
    ratios to E2E per method, one panel per case."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cases = results['cases']
    cols = min(3, len(cases))
    rows = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, c in zip(axes.flat, cases):
        names = list(c['methods'])
        x = np.arange(len(names))
        ms = [c['methods'][n] for n in names]
        tr = np.array([[m['time_ratio'][k] for k in ('median', 'q1', 'q3')]
                       for m in ms])
        ax.bar(x - 0.27, tr[:, 0], 0.27, label='step time',
               yerr=[tr[:, 0] - tr[:, 1], tr[:, 2] - tr[:, 0]], capsize=2)
        ax.bar(x, [m['mem_ratio'] for m in ms], 0.27, label='act. memory')
        ax.bar(x + 0.27, [m['peak_ratio'] for m in ms], 0.27,
               label='peak memory')
        ax.axhline(1.0, color='k', lw=0.6)
        ax.set_xticks(x, names, rotation=45, ha='right', fontsize=7)
        ax.set_title(c['name'], fontsize=9)
        ax.set_ylabel('ratio to E2E')
    for ax in list(axes.flat)[len(cases):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_accuracies(path: str) -> Dict[str, Dict[str, float]]:
    """``{case: {method: top-1 or mAP or mIoU}}`` from a JSON file."""
    with open(path) as f:
        acc = json.load(f)
    if not isinstance(acc, dict) or not all(
            isinstance(v, dict) and all(
                isinstance(a, (int, float)) for a in v.values())
            for v in acc.values()):
        raise ValueError(f'{path}: expected {{case: {{method: number}}}}')
    return acc


def plot_accuracy_memory(results: dict, accuracies: Dict[str, Dict[str,
                                                                    float]],
                         path: str) -> bool:
    """Accuracy against activation memory (ratio to E2E), bubble area
    proportional to step time, one panel per case with accuracies (like
    the paper's Fig. 1). Returns False (and writes nothing) when no case
    has both results and accuracies."""
    cases = [c for c in results['cases']
             if set(accuracies.get(c['name'], {})) & set(c['methods'])]
    if not cases:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(
        1, len(cases), figsize=(4.5 * len(cases), 3.8), squeeze=False)
    for ax, c in zip(axes.flat, cases):
        for m, a in accuracies[c['name']].items():
            r = c['methods'].get(m)
            if r is None:
                continue
            ax.scatter(r['mem_ratio'], a, s=400 * r['time_ratio']['median'],
                       alpha=0.5)
            ax.annotate(m, (r['mem_ratio'], a), fontsize=7, ha='center')
        ax.set_xlabel('activation memory (x E2E)')
        ax.set_ylabel('accuracy')
        ax.set_title(f"{c['name']} (area: step time)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine_info() -> dict:
    """Versions, machine, command, and the code's git commit (``+dirty``
    when the work tree differs from it), for the record."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

    def git(*args):
        try:
            return subprocess.run(['git', '-C', root, *args],
                                  capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ''

    dirty = git('status', '--porcelain', '--', 'repl_mm')
    return dict(
        python=platform.python_version(), torch=torch.__version__,
        cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
        platform=platform.platform(), argv=sys.argv,
        commit=git('rev-parse', 'HEAD') + ('+dirty' if dirty else ''),
        date=time.strftime('%Y-%m-%d %H:%M:%S'))


def finalize(results: dict) -> dict:
    """(Re)compute every derived figure (ratios, S, targets) from the
    measured ones, in place: a run's JSON can be rendered again."""
    results['targets'] = []
    for c in results['cases']:
        _derive(c['methods'])
        results['targets'] += check_targets(c)
    return results


def write_outputs(results: dict, out_dir: str,
                  accuracies: Optional[dict] = None) -> List[str]:
    """Write ``benchmark.json``, ``benchmark.md``, ``ratios.png`` and,
    given accuracies, ``accuracy_memory.png`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    path = functools.partial(os.path.join, out_dir)
    with open(path('benchmark.json'), 'w') as f:
        json.dump(results, f, indent=1)
    with open(path('benchmark.md'), 'w') as f:
        f.write(to_markdown(results))
    plot_ratios(results, path('ratios.png'))
    written = [path(n) for n in ('benchmark.json', 'benchmark.md',
                                 'ratios.png')]
    if accuracies and plot_accuracy_memory(results, accuracies,
                                           path('accuracy_memory.png')):
        written.append(path('accuracy_memory.png'))
    return written


def run_benchmark(cases: Sequence[Case],
                  out_dir: str,
                  methods: Sequence[str] = tuple(METHODS),
                  warmup: int = 0,
                  accuracies: Optional[dict] = None,
                  device='cpu') -> dict:
    """Run ``cases`` on ``device``, write the outputs
    (:func:`write_outputs`) and return the results dict."""
    device = resolve_device(device)
    results = dict(meta=machine_info(), cases=[])
    results['meta'].update(describe_device(device))
    results['meta']['load_before'] = os.getloadavg()
    t0 = time.perf_counter()
    for case in cases:
        results['cases'].append(run_case(case, methods, warmup, device))
    results['meta']['load_after'] = os.getloadavg()
    results['meta']['seconds'] = time.perf_counter() - t0
    written = write_outputs(finalize(results), out_dir, accuracies)
    print_log(f'benchmark done in {results["meta"]["seconds"]:.0f} s: '
              f'{", ".join(written)}\n{to_markdown(results)}',
              logger='current')
    return results


__all__ = [
    'METHODS', 'SUITE', 'TWINS', 'Case', 'make_case', 'suite_cases',
    'method_model_cfg', 'build_model', 'make_batch', 'step_flops',
    'track_recompute',
    'synthesis_flops', 'measure_memory', 'peak_allocated', 'peak_memory',
    'device_timer', 'resolve_device', 'to_device',
    'synthesis_kept_bytes',
    'time_round_robin', 'ratio_stats', 'saving_efficiency', 'run_case',
    'check_targets', 'to_markdown', 'plot_ratios', 'plot_accuracy_memory',
    'load_accuracies', 'run_benchmark', 'finalize', 'write_outputs',
    'backbone_family'
]
