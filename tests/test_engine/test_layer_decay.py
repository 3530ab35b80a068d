"""RepLLearningRateDecayOptimizerConstructor (repl_mm/engine/layer_decay.py):
upstream's layer-wise / stage-wise lr decay of mmdet and mmseg, with the
no-decay keys of RepL's mixing weights applied after it."""
import pytest
import torch
from mmengine.registry import DefaultScope
from torch import nn

from repl_mm.core import NO_DECAY_KEYS
from repl_mm.engine.layer_decay import (CONSTRUCTORS, NAME, apply_decay_keys,
                                        decay_multiplier)
from repl_mm.models.cls_convnext import RepLConvNeXt

KEYS = {k: dict(decay_mult=0.0) for k in NO_DECAY_KEYS}


class Detector(nn.Module):
    """What upstream's constructor reads: ``module.backbone``."""

    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = RepLConvNeXt(
            arch='atto', replacement=dict(mode=mode, interval=4))


def build(scope, constructor, paramwise_cfg):
    import importlib
    registry = importlib.import_module(
        f'{scope}.registry').OPTIM_WRAPPER_CONSTRUCTORS
    return registry.build(
        dict(
            type=constructor,
            optim_wrapper_cfg=dict(
                type='OptimWrapper',
                optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)),
            paramwise_cfg=paramwise_cfg))


def groups_of(scope, constructor, paramwise_cfg, mode='synthesize'):
    model = Detector(mode)
    # the scope a runner of that codebase sets (another test may have left
    # a different default scope behind)
    with DefaultScope.overwrite_default_scope(scope):
        wrapper = build(scope, constructor, paramwise_cfg)(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g['lr'], g['weight_decay'], [names[id(p)] for p in g['params']])
            for g in wrapper.optimizer.param_groups]


@pytest.mark.parametrize(
    'scope, decay',
    [('mmdet', dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6)),
     ('mmseg', dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6))])
def test_mixing_weights_get_no_decay_and_keep_their_lr(scope, decay):
    assert CONSTRUCTORS[scope].__qualname__ == f'{NAME}[{scope}]'
    ours = groups_of(scope, NAME, dict(decay, custom_keys=KEYS))
    theirs = groups_of(scope, 'LearningRateDecayOptimizerConstructor',
                       dict(decay))
    lr = {n: g_lr for g_lr, _, names in theirs for n in names}
    wd = {n: g_wd for _, g_wd, names in theirs for n in names}
    seen = set()
    for g_lr, g_wd, names in ours:
        for n in names:
            seen.add(n)
            assert g_lr == lr[n], n  # upstream's layer-wise lr, untouched
            if any(k in n for k in NO_DECAY_KEYS):
                assert g_wd == 0.0, n
            else:
                assert g_wd == wd[n], n
    assert seen == set(lr)
    # upstream alone decays the 0-d mixing scalars: the reason for ours
    alpha = [n for n in lr if n.endswith('.alpha')]
    assert alpha and all(wd[n] == 0.05 for n in alpha)


def test_e2e_twin_groups_equal_upstreams():
    """In mode none no name matches a key: the groups are upstream's."""
    decay = dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6)
    assert groups_of('mmdet', NAME, dict(decay, custom_keys=KEYS), 'none') \
        == groups_of('mmdet', 'LearningRateDecayOptimizerConstructor',
                     decay, 'none')


def test_apply_decay_keys_by_hand():
    a, b, c = (nn.Parameter(torch.zeros(())) for _ in range(3))
    groups = [
        dict(
            params=[a, b, c],
            param_names=['x.alpha', 'x.weight', 'x.site_norm.weight'],
            weight_decay=0.05,
            lr=1.0,
            group_name='layer_1_decay')
    ]
    keys = {
        '.alpha': dict(decay_mult=0.0),
        '.site_norm.': dict(decay_mult=0.5)
    }
    out = apply_decay_keys(groups, keys)
    assert [(g['group_name'], g['param_names'], g['weight_decay'], g['lr'])
            for g in out] == [
                ('layer_1_decay', ['x.weight'], 0.05, 1.0),
                ('layer_1_decay_decay_mult_0.0', ['x.alpha'], 0.0, 1.0),
                ('layer_1_decay_decay_mult_0.5', ['x.site_norm.weight'], 0.025,
                 1.0),
            ]
    assert decay_multiplier('x.weight', keys) is None
