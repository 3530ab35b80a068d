"""ReplacementHook on a model mmengine has already moved and cast: the
model stays where it was (device and dtype), with every tensor the
surgery creates there too, and SyncBN process groups are shared, not
copied (spec §8). The GPU is proxied on the CPU by float64 and ``meta``.
"""
import threading
from itertools import chain

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from torch import nn

from repl_mm.engine.hooks.replacement_hook import ReplacementHook
from ..test_core.test_device_dtype import SMALL_CIFAR, checkpoint_runs_on_meta
from ..test_models.test_backbones.cases import TINY_VIT


def model_cfg(kind, **backbone):
    if kind == 'conv':
        backbone = dict(type='ResNet_CIFAR', **SMALL_CIFAR, **backbone)
        neck, width = dict(type='GlobalAveragePooling'), 64
    else:
        backbone = dict(type='VisionTransformer', **TINY_VIT, **backbone)
        neck, width = None, 32
    return dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=neck,
        head=dict(
            type='LinearClsHead',
            num_classes=4,
            in_channels=width,
            loss=dict(type='CrossEntropyLoss')))


class RunnerStub:
    """What ``before_run`` reads of a runner that has built, moved and
    (here) not wrapped the model, with no optimizer yet."""

    def __init__(self, model, cfg):
        self.model = model
        self.cfg = Config(dict(model=cfg))
        self.optim_wrapper = None


def build(cfg):
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg)


def run_hook(model, cfg, **replacement):
    runner = RunnerStub(model, cfg)
    ReplacementHook(**replacement).before_run(runner)
    assert runner.model is model
    return model.backbone.site_modules()


def placement(model):
    """(device type, dtype) of every parameter and buffer, by kind."""
    return {(t.device.type, t.dtype, t.is_floating_point())
            for t in chain(model.parameters(), model.buffers())}


def samples(n):
    from mmpretrain.structures import DataSample
    return [DataSample().set_gt_label(i % 4) for i in range(n)]


def train_step(model, x):
    """One SGD step on the classification loss; the parameters that
    moved."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    losses = model(x, samples(x.shape[0]), mode='loss')
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return [
        p for p, b in zip(model.parameters(), before) if not torch.equal(p, b)
    ]


@pytest.mark.parametrize('kind', ['conv', 'transformer'])
def test_hook_on_a_float64_model(kind):
    cfg = model_cfg(kind)
    model = build(cfg).double()
    where = placement(model)
    sites = run_hook(model, cfg, interval=2, zero_init=False)
    assert sites
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == torch.float64, name
    assert placement(model) == where  # nothing new (float32, elsewhere)
    moved = train_step(model, torch.rand(4, 3, 32, 32, dtype=torch.float64))
    assert all(p.dtype == torch.float64 for p in moved)
    names = {id(p): n for n, p in model.named_parameters()}
    moved_names = {names[id(p)] for p in moved}
    assert any(
        n.split('.')[-1].startswith(('phi', 'alpha', 'beta'))
        for n in moved_names)


@pytest.mark.parametrize('kind', ['conv', 'transformer'])
def test_hook_on_a_meta_model(kind):
    """The model moved before the hook (to ``meta`` here, to the GPU in
    ``Runner.__init__``): the sites are created there; a forward and a
    backward run."""
    cfg = model_cfg(kind)
    model = build(cfg).to('meta')
    # the sites' recomputation checkpoints, which torch 2.1 cannot on meta
    run_hook(model, cfg, interval=2, recompute=checkpoint_runs_on_meta())
    assert all(t.is_meta for t in chain(model.parameters(), model.buffers()))
    x = torch.rand(2, 3, 32, 32, device='meta', requires_grad=True)
    model.train()
    feats = model.extract_feat(x)
    sum(f.sum() for f in feats).backward()
    assert x.grad.shape == x.shape


def test_hook_with_syncbn_holding_a_process_group():
    """After DDP conversion a SyncBN holds its process group, which cannot
    be copied (a lock stands in for it here)."""
    cfg = model_cfg('conv', norm_cfg=dict(type='SyncBN'))
    model = build(cfg)
    group = threading.Lock()
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.process_group = group
    sites = run_hook(model, cfg, interval=2)
    assert sites
    for site in sites.values():
        assert isinstance(site.site_norm, nn.SyncBatchNorm)
        assert site.site_norm.process_group is group
    assert train_step(model, torch.rand(4, 3, 32, 32))
