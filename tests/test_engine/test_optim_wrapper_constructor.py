"""RepLOptimWrapperConstructor: upstream's param groups, one log line."""
import logging
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper

import repl_mm  # noqa: F401  (registers the constructor and backbones)
from repl_mm.core import NO_DECAY_KEYS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [
    # CNN: custom_keys only; ViT: custom_keys merged with upstream DeiT's
    # norm / bias / flat rules
    'configs/demo/resnet32-repl_1xb64_15e_mnist5k.py',
    'configs/vit_cifar/vit-tiny-p8-repl_1xb512_250e_cifar10.py',
]


class ListHandler(logging.Handler):

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def build(path, constructor):
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(str(ROOT / path))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ow_cfg = cfg.optim_wrapper.to_dict()
    assert ow_cfg['constructor'] == 'RepLOptimWrapperConstructor'
    ow_cfg['constructor'] = constructor
    logger = MMLogger.get_current_instance()
    handler = ListHandler()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        optim_wrapper = build_optim_wrapper(model, ow_cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return model, optim_wrapper, handler.messages


def groups(model, optim_wrapper):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({
        k: v
        for k, v in g.items() if k != 'params'
    }, [names[id(p)] for p in g['params']])
            for g in optim_wrapper.optimizer.param_groups]


@pytest.mark.parametrize('path', CONFIGS)
def test_same_param_groups_one_summary_line(path):
    model, ours, ours_log = build(path, 'RepLOptimWrapperConstructor')
    model_up, upstream, up_log = build(path, 'DefaultOptimWrapperConstructor')
    # same groups, same order, same options (lr, weight_decay, ...)
    assert groups(model, ours) == groups(model_up, upstream)
    no_decay = [(o, n) for o, n in groups(model, ours)
                if any(k in n[0] for k in NO_DECAY_KEYS)]
    assert no_decay and all(o['weight_decay'] == 0.0 for o, _ in no_decay)

    # upstream: a line per option of every grouped parameter; ours: none,
    # and one summary line that accounts for every parameter tensor
    assert sum('paramwise_options --' in m for m in up_log) > 20
    assert not any('paramwise_options' in m for m in ours_log)
    summary = [m for m in ours_log if m.startswith('paramwise_cfg:')]
    assert len(summary) == 1, ours_log
    total = len(ours.optimizer.param_groups)
    assert summary[0].startswith(f'paramwise_cfg: {total} parameter tensors')
    for key in NO_DECAY_KEYS:
        if any(key in n for n in dict(model.named_parameters())):
            assert repr(key) in summary[0]


def test_summary_counts_by_options_and_key():
    from repl_mm.engine.optim_wrapper_constructor import summarize_param_groups
    model = torch.nn.Module()
    model.phi1_prev = torch.nn.Parameter(torch.ones(2))
    model.lin = torch.nn.Linear(2, 2)
    params = [{
        'params': [model.phi1_prev],
        'weight_decay': 0.0,
        'decay_mult': 0.0
    }, {
        'params': [model.lin.weight]
    }, {
        'params': [model.lin.bias]
    }]
    assert summarize_param_groups(params, model, {
        'phi': {}
    }) == ("paramwise_cfg: 3 parameter tensors in 2 groups: 2 with the "
           "optimizer's defaults; 1 with decay_mult=0.0, weight_decay=0.0 "
           "('phi' x 1)")
