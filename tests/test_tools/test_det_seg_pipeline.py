"""Detection and segmentation end to end through the tools, as a user runs
them: the tiny COCO / Cityscapes sets of ``make_datasets.py`` ->
``train.py`` -> ``test.py`` from the checkpoint (``coco/bbox_mAP``,
``mIoU``) -> ``--resume`` -> ``publish_model.py`` -> upstream inferencers
(the published and its ``mode='static'`` model);
and upstream ImageNet weights loading into the kept blocks (spec §6).

A user's tiny config inherits a shipped RepL config and shrinks it to
seconds per iteration on 2 loaded cores: ResNet-18 with the slim necks and
heads of upstream's r18 configs, images of 128x96 / 128x64, batch 2,
SyncBN -> BN, no pretrained weights, no validation inside training.
"""
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from repl_mm.datasets.det_seg_writers import (SHAPE_CLASSES,
                                              make_cityscapes_shapes,
                                              make_coco_shapes)
from .test_cls_pipeline import ROOT, load, run

DET_TINY = """
    data_root = '{data}/'
    metainfo = dict(classes={classes})
    model = dict(
        backbone=dict(depth=18, norm_cfg=dict(type='BN', requires_grad=True)),
        neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
        bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64),
        test_cfg=dict(score_thr=0.0))  # untrained scores are ~0.01
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='Resize', scale=(128, 96), keep_ratio=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackDetInputs')
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(128, 96), keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='PackDetInputs', meta_keys=(
            'img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
    ]
    train_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False,
        dataset=dict(data_root=data_root, metainfo=metainfo,
                     pipeline=train_pipeline))
    test_dataloader = dict(
        num_workers=0, persistent_workers=False,
        dataset=dict(data_root=data_root, metainfo=metainfo,
                     pipeline=test_pipeline))
    test_evaluator = dict(
        ann_file=data_root + 'annotations/instances_val2017.json')
    val_dataloader = val_cfg = val_evaluator = None  # test.py evaluates
    train_cfg = dict(max_epochs={length})
    default_hooks = dict(checkpoint=dict(interval=1), logger=dict(interval=1))
"""

SEG_TINY = """
    data_root = '{data}/'
    crop_size = (64, 64)
    norm_cfg = dict(type='BN', requires_grad=True)
    model = dict(
        data_preprocessor=dict(size=crop_size),
        backbone=dict(depth=18, norm_cfg=norm_cfg),
        decode_head=dict(in_channels=512, channels=64, c1_in_channels=64,
                         c1_channels=12, norm_cfg=norm_cfg),
        auxiliary_head=dict(in_channels=256, channels=32, norm_cfg=norm_cfg))
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations'),
        dict(type='RandomResize', scale=(128, 64), ratio_range=(0.5, 2.0),
             keep_ratio=True),
        dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PhotoMetricDistortion'),
        dict(type='PackSegInputs')
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(128, 64), keep_ratio=True),
        dict(type='LoadAnnotations'),
        dict(type='PackSegInputs')
    ]
    train_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False,
        dataset=dict(data_root=data_root, pipeline=train_pipeline))
    test_dataloader = dict(
        num_workers=0, persistent_workers=False,
        dataset=dict(data_root=data_root, pipeline=test_pipeline))
    val_dataloader = val_cfg = val_evaluator = None  # test.py evaluates
    train_cfg = dict(max_iters={length})
    default_hooks = dict(checkpoint=dict(interval=2), logger=dict(interval=1))
"""


@dataclass
class Case:
    """One codebase's run: a shipped config, its tiny delta, the metric
    ``test.py`` reports, and the checkpoints of a first run of ``length``
    (epochs or iterations) and of its resumed continuation."""
    config: str
    template: str
    metric: str
    length: int
    ckpt: str
    resumed_ckpt: str
    resumed_at: str


CASES = {
    'retinanet':
    Case(
        'configs/retinanet/retinanet_repl-r50_fpn_4xb2-scratch-adam-100e_'
        'coco.py', DET_TINY, 'coco/bbox_mAP', 1, 'epoch_1.pth', 'epoch_2.pth',
        'resumed epoch: 1, iter: 2'),
    'deeplabv3plus':
    Case(
        'configs/deeplabv3plus/deeplabv3plus_repl-r50-d8_1xb16-30k_'
        'cityscapes-768x768.py', SEG_TINY, 'mIoU', 2, 'iter_2.pth',
        'iter_4.pth', 'resumed epoch: 0, iter: 2'),
}
PLAN_R18 = [4]  # ResNet-18, k = 4: block 8 is the last one


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    sizes = dict(num_train=4, num_val=2)  # 2 iterations an epoch
    make_coco_shapes(str(root / 'coco'), **sizes)
    make_cityscapes_shapes(str(root / 'cityscapes'), **sizes)
    return dict(retinanet=root / 'coco', deeplabv3plus=root / 'cityscapes')


def tiny_config(name, folder, data, length):
    """A user's config: the shipped one, shrunk to seconds on this CPU."""
    case = CASES[name]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'tiny_{name}_{length}.py'
    body = textwrap.dedent(case.template).format(
        data=data[name], classes=SHAPE_CLASSES, length=length)
    path.write_text(f"_base_ = '{ROOT / case.config}'\n" + body)
    return str(path)


@pytest.fixture(scope='module', params=sorted(CASES))
def trained(request, data, tmp_path_factory):
    """``(name, work dir)`` after a first tiny training run."""
    name = request.param
    work = tmp_path_factory.mktemp(name)
    cfg = tiny_config(name, work / 'cfg', data, CASES[name].length)
    run('tools/train.py', cfg, '--work-dir', str(work / 'run'))
    return name, work / 'run'


def test_train_then_test_reports_metric(trained, data, tmp_path):
    name, work = trained
    case = CASES[name]
    ckpt = load(work / case.ckpt)
    assert 'rng_state' in ckpt
    sd = ckpt['state_dict']
    assert 'backbone.replacement_plan' in sd
    assert 'backbone.layer2.1.site_norm.weight' in sd  # site 4
    assert 'backbone.layer2.1.conv1.weight' not in sd
    out = tmp_path / 'metrics.json'
    run('tools/test.py', tiny_config(name, tmp_path, data, case.length),
        str(work / case.ckpt), '--work-dir', str(tmp_path), '--out', str(out))
    value = json.loads(out.read_text())[case.metric]
    assert math.isfinite(value) and 0 <= value <= 100, value


def test_resume_continues_from_the_checkpoint(trained, data, tmp_path):
    name, work = trained
    case = CASES[name]
    first = load(work / case.ckpt)['meta']
    cfg = tiny_config(name, tmp_path, data, 2 * case.length)
    out = run('tools/train.py', cfg, '--work-dir', str(tmp_path / 'run'),
              '--resume', str(work / case.ckpt))
    log = next((tmp_path / 'run').rglob('*.log')).read_text()
    assert case.resumed_at in log, out.stderr[-2000:]
    meta = load(tmp_path / 'run' / case.resumed_ckpt)['meta']
    assert meta['iter'] == 2 * first['iter']
    assert meta['epoch'] == 2 * first['epoch']


def test_resume_without_a_fixed_seed_restores_the_rng_state(
        trained, data, tmp_path):
    """mmengine's resume re-seeds after loading when the config has no
    fixed seed (the tiny configs leave mmdet's and mmseg's default, None);
    the saved state wins."""
    import random

    from repl_mm.engine import build_runner
    name, work = trained
    case = CASES[name]
    cfg = Config.fromfile(tiny_config(name, tmp_path, data, 2 * case.length))
    assert cfg.get('randomness') is None  # Runner's default: seed=None
    cfg.work_dir, cfg.launcher = str(tmp_path / 'run'), 'none'
    cfg.randomness = dict(seed=None)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        runner = build_runner(cfg, train=True)
    ckpt = load(work / case.ckpt)
    runner.resume(str(work / case.ckpt))
    # the first run's (drawn) seed, set by mmengine's resume
    assert runner.seed == ckpt['meta']['seed'] is not None
    saved = ckpt['rng_state'][0]
    assert torch.equal(torch.get_rng_state(), saved['torch'])
    state = np.random.get_state(legacy=False)
    assert state['state']['key'].tolist() == saved['numpy']['state']['key']
    assert state['state']['pos'] == saved['numpy']['state']['pos']
    assert list(random.getstate()[1]) == list(saved['python'][1])


def infer(name, cfg, weights, img):
    """The upstream inferencer's prediction for one image."""
    if name == 'retinanet':
        from mmdet.apis import DetInferencer
        inferencer = DetInferencer(
            model=cfg, weights=weights, device='cpu', show_progress=False)
    else:
        from mmseg.apis import MMSegInferencer
        inferencer = MMSegInferencer(model=cfg, weights=weights, device='cpu')
    return inferencer(img, return_vis=False)['predictions']


def test_publish_loads_in_upstream_inferencer(trained, data, tmp_path):
    name, work = trained
    case = CASES[name]
    out = run('tools/model_converters/publish_model.py', str(work / case.ckpt),
              str(tmp_path / f'{name}.pth'))
    published = Path(out.stdout.strip().splitlines()[-1])
    assert published.name.startswith(f'{name}-') and published.exists()
    ckpt = torch.load(published, weights_only=True)  # no allow-list
    assert set(ckpt) == {'state_dict', 'meta'}
    assert ckpt['meta']['replacement_plans']['backbone']['indices'] == \
        PLAN_R18
    cfg = tiny_config(name, tmp_path, data, case.length)
    img = np.random.default_rng(0).integers(0, 255, (64, 128, 3), np.uint8)
    pred = infer(name, cfg, str(published), img)
    if name == 'retinanet':
        pred = pred[0]
        assert len(pred['labels']) == len(pred['scores']) == len(
            pred['bboxes']) > 0
        assert np.asarray(pred['bboxes']).shape[1] == 4
        assert set(pred['labels']) <= {0, 1, 2}
    else:
        assert np.asarray(pred).shape == (64, 128)  # the input's H x W
        assert set(np.unique(pred)) <= set(range(19))
    # its mode='static' model in the same inferencer: same prediction
    from repl_mm.converters.to_static import convert_checkpoint
    static = convert_checkpoint(cfg, str(published), str(tmp_path / 'static'))
    static_pred = infer(name, static['config'], static['checkpoint'], img)
    # (an untrained net's outputs nearly tie: compare what a 1e-6 change
    # cannot reorder, the sorted scores and the share of equal pixels)
    if name == 'retinanet':
        static_pred = static_pred[0]
        assert len(static_pred['scores']) == len(pred['scores'])
        np.testing.assert_allclose(
            sorted(static_pred['scores']), sorted(pred['scores']), rtol=1e-4)
    else:
        assert np.mean(np.asarray(static_pred) == np.asarray(pred)) > 0.999


# (shipped config, its codebase, stock backbone type, how the config names
# the backbone's pretrained weights)
PRETRAINED = [
    ('configs/retinanet/retinanet_repl-r50_fpn_1x_coco.py', 'mmdet', 'ResNet',
     'model.backbone.init_cfg.checkpoint'),
    ('configs/deeplabv3/deeplabv3_repl-r50-d8_4xb2-80k_cityscapes-512x1024.'
     'py', 'mmseg', 'ResNetV1c', 'model.pretrained'),
]


@pytest.mark.parametrize(
    'config,scope,stock_type,key', PRETRAINED, ids=['mmdet', 'mmseg'])
def test_upstream_pretrained_backbone_loads_kept_blocks(
        config, scope, stock_type, key, tmp_path):
    """An upstream E2E backbone checkpoint (torchvision / open-mmlab style:
    the stock backbone's plain state dict) loads into the RepL backbone of
    a shipped config: kept blocks equal, replaced blocks' keys unused."""
    import importlib

    import repl_mm  # noqa: F401
    registry = importlib.import_module(f'{scope}.registry').MODELS
    cfg = Config.fromfile(str(ROOT / config))
    if cfg.model.backbone.get('norm_cfg', {}).get('type') == 'SyncBN':
        cfg.model.backbone.norm_cfg.type = 'BN'
    with DefaultScope.overwrite_default_scope(scope):
        stock_cfg = {
            k: v
            for k, v in cfg.model.backbone.items()
            if k not in ('type', 'replacement', 'init_cfg')
        }
        stock = registry.build(dict(stock_cfg, type=stock_type))
        expected = {k: v.clone() for k, v in stock.state_dict().items()}
        path = tmp_path / 'upstream.pth'
        torch.save(expected, path)
        cfg.merge_from_dict({key: str(path)})
        model = registry.build(cfg.model)
        before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        model.init_weights()
    backbone = model.backbone
    assert backbone.replacement_plan.indices == (5, 9, 12)
    ours = backbone.state_dict()
    sites = tuple(backbone._site_prefixes.values())
    unused = [k for k in expected if k.startswith(sites) and k not in ours]
    assert unused and all(k.startswith(sites) for k in unused)
    for k, v in expected.items():
        if k not in unused:
            assert torch.equal(ours[k], v), k  # kept block: loaded
    changed = [
        k for k in ours
        if k in expected and not torch.equal(before[k], expected[k])
    ]
    assert changed  # the weights did change from the random init


def test_v3plus_paper_config_has_upstream_v3plus_model():
    """The paper-setting DeepLabV3+ config swaps the DeepLabV3 head: its
    model is upstream's DeepLabV3+ model but for the RepL backbone, the
    pretrained weights and the crop."""

    def model(path):
        cfg = Config.fromfile(str(ROOT / path)).model.to_dict()
        for key in ('pretrained', 'data_preprocessor'):
            cfg.pop(key)
        for key in ('type', 'replacement'):
            cfg['backbone'].pop(key)
        return cfg

    upstream = model('configs/deeplabv3plus/deeplabv3plus_e2e-r50-d8_4xb2-'
                     '80k_cityscapes-512x1024.py')
    paper = model('configs/deeplabv3plus/deeplabv3plus_repl-r50-d8_1xb16-'
                  '30k_cityscapes-768x768.py')
    assert paper == upstream
