"""The CPU-sized detection / segmentation configs on the synthetic shapes
sets (configs/shapes): each RepL config stands beside an E2E twin that
differs from it only in ``mode``; both build a from-scratch ResNet-18 with
BN and one shared plan (k = 4: block 4 of 8); the data is the synthetic
set's, validated once at the end of training. Offline, no data on disk:
only configs are parsed and models built (no training)."""
import copy
import functools
import importlib
import re
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / 'configs' / 'shapes'
CONFIGS = sorted(FOLDER.glob('*.py'))
REPL = [p for p in CONFIGS if '_repl-' in p.name]
NAME = re.compile(r'^(retinanet|deeplabv3)_(repl|e2e)-r18[-_].*_(\d+)xb(\d+)-'
                  r'[\w-]+_(coco|cityscapes)-shapes\.py$')
DATA = {
    'retinanet': 'data/coco-shapes/',
    'deeplabv3': 'data/cityscapes-shapes/'
}
SCOPES = {'retinanet': 'mmdet', 'deeplabv3': 'mmseg'}
PLAN_R18 = (4, )  # ResNet-18, k = 4: block 8 is the last one


def twin_of(path):
    return path.with_name(path.name.replace('_repl-', '_e2e-'))


@functools.lru_cache(maxsize=None)
def _load(path):
    return Config.fromfile(str(path))


def load(path):
    return copy.deepcopy(_load(path))


@functools.lru_cache(maxsize=None)
def built(path):
    """A config's model (each built once per session)."""
    cfg = load(path)
    scope = cfg.default_scope
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg.model)


def norm_types(cfg_dict):
    """Every ``norm_cfg.type`` in a (nested) config dict."""
    if isinstance(cfg_dict, dict):
        found = [cfg_dict['norm_cfg']['type']] if isinstance(
            cfg_dict.get('norm_cfg'), dict) else []
        return found + [t for v in cfg_dict.values() for t in norm_types(v)]
    if isinstance(cfg_dict, (list, tuple)):
        return [t for v in cfg_dict for t in norm_types(v)]
    return []


def test_folder_has_the_four_configs_in_pairs():
    algos = sorted(NAME.match(p.name).group(1) for p in REPL)
    assert algos == ['deeplabv3', 'retinanet']
    assert len(CONFIGS) == 4
    for path in CONFIGS:
        assert NAME.match(path.name), path.name
    for path in REPL:
        assert twin_of(path).exists(), f'{path.name} has no E2E twin'


@pytest.mark.parametrize('path', REPL, ids=[p.name for p in REPL])
def test_e2e_twin_differs_only_in_mode(path):
    repl, e2e = load(path), load(twin_of(path))
    assert repl.model.backbone.replacement == dict(interval=4)
    assert e2e.model.backbone.replacement == dict(interval=4, mode='none')
    e2e.model.backbone.replacement.pop('mode')
    assert e2e.to_dict() == repl.to_dict()


@pytest.mark.parametrize('path', CONFIGS, ids=[p.name for p in CONFIGS])
def test_from_scratch_r18_on_the_synthetic_set(path):
    cfg = load(path)
    algo, _, gpus, per_gpu, _ = NAME.match(path.name).groups()
    assert cfg.default_scope == SCOPES[algo]
    assert 'repl_mm' in cfg.custom_imports['imports']
    backbone = cfg.model.backbone
    assert backbone.depth == 18
    assert backbone.get('init_cfg') is None
    assert cfg.model.get('pretrained') is None and cfg.load_from is None
    assert set(norm_types(cfg.model.to_dict())) == {'BN'}  # one process
    assert cfg.train_dataloader.batch_size == int(per_gpu) and gpus == '1'
    assert cfg.auto_scale_lr.base_batch_size == int(per_gpu)
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        assert loader.dataset.data_root == DATA[algo], split
    if algo == 'retinanet':
        assert cfg.val_evaluator.ann_file.startswith(DATA[algo])
        assert cfg.train_dataloader.dataset.metainfo.classes == ('rectangle',
                                                                 'circle',
                                                                 'triangle')
        assert cfg.model.bbox_head.num_classes == 3
    # validation once, at the end of training
    length = cfg.train_cfg.get('max_epochs', cfg.train_cfg.get('max_iters'))
    assert cfg.train_cfg.val_interval == length


@pytest.mark.parametrize('path', REPL, ids=[p.name for p in REPL])
def test_twins_build_with_one_plan(path):
    repl = built(path)
    e2e = built(twin_of(path))
    plan, e2e_plan = (m.backbone.replacement_plan for m in (repl, e2e))
    assert plan.mode == 'synthesize' and e2e_plan.mode == 'none'
    assert plan.indices == e2e_plan.indices == PLAN_R18
    repl_keys = set(repl.state_dict())
    e2e_keys = set(e2e.state_dict())
    # site 4 is the second block of stage 2: a light site in RepL, a
    # BasicBlock in E2E; everything outside the backbone is the same
    assert 'backbone.layer2.1.site_norm.weight' in repl_keys
    assert 'backbone.layer2.1.conv1.weight' not in repl_keys
    assert 'backbone.layer2.1.conv1.weight' in e2e_keys
    outside = {k for k in e2e_keys if not k.startswith('backbone.')}
    assert outside == {k for k in repl_keys if not k.startswith('backbone.')}
    size = sum(p.numel() for p in repl.parameters())
    assert size < sum(p.numel() for p in e2e.parameters())
