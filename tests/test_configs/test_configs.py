"""Every shipped config builds its model offline; RepL configs stand beside
E2E twins with the same plan; the shipped paramwise rules keep mixing
weights and site norms out of weight decay (spec §8)."""
import functools
import importlib
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

from repl_mm.core import NO_DECAY_KEYS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(
    p for p in (ROOT / 'configs').rglob('*.py') if '_base_' not in p.parts)
IDS = [str(p.relative_to(ROOT / 'configs')) for p in CONFIGS]
SCOPES = {'mmdet': 'mmdet', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain'}


def load(path):
    cfg = Config.fromfile(str(path))
    # offline: no pretrained download
    cfg.model.pop('pretrained', None)
    cfg.model.backbone.pop('init_cfg', None)
    cfg.model.backbone.pop('pretrained', None)
    if cfg.model.backbone.get('norm_cfg', {}).get('type') == 'SyncBN':
        cfg.model.backbone.norm_cfg.type = 'BN'
    return cfg


def build(cfg):
    registry = importlib.import_module(f'{SCOPES[cfg.default_scope]}.registry')
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return registry.MODELS.build(cfg.model)


@functools.lru_cache(maxsize=4)  # twins are neighbours in the order
def built(path):
    """A config's model, shared by the tests that read it in a row."""
    return build(load(path))


def test_configs_exist_in_pairs():
    assert CONFIGS
    for p in CONFIGS:
        assert 'repl' in p.name or 'e2e' in p.name, p
        assert twin_of(p).exists(), f'{p.name} has no twin'


def twin_of(path):
    name = path.name
    return path.with_name(
        name.replace('repl', 'e2e') if 'repl' in
        name else name.replace('e2e', 'repl'))


@pytest.mark.parametrize('path', CONFIGS, ids=IDS)
def test_config_builds(path):
    cfg = load(path)
    assert 'repl_mm' in cfg.custom_imports['imports']
    plan = built(path).backbone.replacement_plan
    if 'e2e' in path.name:
        assert plan.mode == 'none'
        # the E2E twin has the RepL config's plan
        twin = built(twin_of(path)).backbone.replacement_plan
        assert twin.mode != 'none' and twin.indices == plan.indices
    if 'r50' in path.name or 'resnet50' in path.name:
        assert plan.indices == (5, 9, 12)  # ResNet-50, k = 4 (spec §1)
    if 'convnext' in path.name:  # ConvNeXt-T, 18 blocks, k = 4
        assert plan.indices == (4, 8, 12, 16)


@pytest.mark.parametrize(
    'path', [p for p in CONFIGS if 'repl' in p.name],
    ids=[i for i in IDS if 'repl' in i])
def test_paramwise_no_decay_on_mixing_weights(path):
    cfg = load(path)
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert set(NO_DECAY_KEYS) <= set(keys)
    model = built(path)
    e2e = built(twin_of(path))
    # the keys never match an upstream (E2E) parameter
    for name, _ in e2e.named_parameters():
        assert not any(k in name for k in NO_DECAY_KEYS), name
    cfg.optim_wrapper.optimizer = dict(
        type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4)
    cfg.optim_wrapper.pop('clip_grad', None)
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper':
        # needs a GPU; the param groups do not depend on the wrapper type
        cfg.optim_wrapper.type = 'OptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)
    # the config's scope, as the runner builds it: the layer-decay
    # constructors live in mmdet's and mmseg's registries
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            decay[id(p)] = group['weight_decay']
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mixing = [n for n in names if any(k in n for k in NO_DECAY_KEYS)]
    assert any(k in n for n in mixing for k in ('.phi', '.alpha'))
    assert any('site_norm' in n for n in mixing)
    for n, p in names.items():
        if n in mixing:
            assert decay[id(p)] == 0, n
    # upstream's own no-decay tensors (ViT, Swin) keep upstream's rule
    upstream_no_decay = ('.pos_embed', '.cls_token', '.absolute_pos_embed',
                         '.relative_position_bias_table')
    kept = [
        n for n, p in names.items()
        if n.startswith('backbone.') and p.ndim >= 2 and n not in mixing
        and not n.endswith(upstream_no_decay)
    ]
    assert kept
    for n in kept:
        assert decay[id(names[n])] == pytest.approx(1e-4), n
    assert len(decay) == len(names)  # every parameter optimised once
