"""The new backbone families end to end through the tools, as a user runs
them: a tiny config that inherits a shipped Swin, ConvNeXt or ResNeXt
config -> ``train.py`` -> ``test.py`` from the checkpoint; and RepL switched
on in a stock upstream Swin config by ``ReplacementHook``.

Each user's config shrinks the shipped one to seconds on 2 loaded cores:
tiny widths and depths (enough blocks for sites at interval 4), small
images, batch 2, BN instead of SyncBN, ``init_cfg=None`` on the backbone (no
pretrained download), no validation inside training, and, on this CPU, the
AMP optim wrapper swapped for a plain one that keeps the shipped
constructor and paramwise_cfg.
"""
import json
import math
import textwrap
from dataclasses import dataclass

import pytest

from repl_mm.datasets.det_seg_writers import (SHAPE_CLASSES,
                                              make_cityscapes_shapes,
                                              make_coco_shapes)
from .test_cls_pipeline import ROOT, load, run

# Swin with 8 blocks over 4 stages of widths 16..128, 16 channels an
# attention head: at interval 4 one site, block 4 (stage 2's second block);
# windows of 4 (the last stage, 3x4 at 128x96, is padded)
SWIN_DET = """
    data_root = '{data}/'
    metainfo = dict(classes={classes})
    model = dict(
        backbone=dict(embed_dims=16, depths=(2, 2, 2, 2),
                      num_heads=(1, 2, 4, 8), window_size=4,
                      drop_path_rate=0.0, init_cfg=None),
        neck=dict(in_channels=[32, 64, 128], out_channels=32),
        bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32),
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
    train_cfg = dict(max_epochs=1)
    default_hooks = dict(checkpoint=dict(interval=1), logger=dict(interval=1))
"""

# the ADE20K config on the Cityscapes-format shapes set: Cityscapes' dataset
# type, folders and 19 classes (no zero-label reduction), whole-image test
CONVNEXT_SEG = """
    data_root = '{data}/'
    crop_size = (64, 64)
    norm_cfg = dict(type='BN', requires_grad=True)
    model = dict(
        data_preprocessor=dict(size=crop_size),
        backbone=dict(
            arch=dict(_delete_=True, depths=[2, 2, 2, 2],
                      channels=[8, 16, 32, 64]),
            init_cfg=None),
        decode_head=dict(in_channels=[8, 16, 32, 64], channels=16,
                         num_classes=19, norm_cfg=norm_cfg),
        auxiliary_head=dict(in_channels=32, channels=8, num_classes=19,
                            norm_cfg=norm_cfg),
        test_cfg=dict(_delete_=True, mode='whole'))
    optim_wrapper = dict(
        _delete_=True,
        type='OptimWrapper',  # AmpOptimWrapper needs a GPU
        optimizer={{{{_base_.optim_wrapper.optimizer}}}},
        constructor={{{{_base_.optim_wrapper.constructor}}}},
        paramwise_cfg={{{{_base_.optim_wrapper.paramwise_cfg}}}})
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
        dataset=dict(
            type='CityscapesDataset', data_root=data_root,
            data_prefix=dict(img_path='leftImg8bit/train',
                             seg_map_path='gtFine/train'),
            pipeline=train_pipeline))
    test_dataloader = dict(
        num_workers=0, persistent_workers=False,
        dataset=dict(
            type='CityscapesDataset', data_root=data_root,
            data_prefix=dict(img_path='leftImg8bit/val',
                             seg_map_path='gtFine/val'),
            pipeline=test_pipeline))
    val_dataloader = val_cfg = val_evaluator = None  # test.py evaluates
    train_cfg = dict(max_iters=2)
    default_hooks = dict(checkpoint=dict(interval=2), logger=dict(interval=1))
"""

# ResNeXt-50's 16 blocks at a quarter of the width (4 groups of width 4) on
# the 32x32 CIFAR-format set, as the demo configs read it
RESNEXT_CLS = """
    data_root = '{data}'
    model = dict(
        backbone=dict(depth=50, groups=4, width_per_group=4,
                      stem_channels=16, base_channels=16, init_cfg=None),
        head=dict(num_classes=10, in_channels=512))
    data_preprocessor = dict(num_classes=10)
    train_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False,
        dataset=dict(_delete_=True, type='CIFARFormat', data_root=data_root,
                     split='train', pipeline=[dict(type='PackInputs')]))
    test_dataloader = dict(
        batch_size=8, num_workers=0, persistent_workers=False,
        dataset=dict(_delete_=True, type='CIFARFormat', data_root=data_root,
                     split='test', pipeline=[dict(type='PackInputs')]))
    val_dataloader = val_cfg = val_evaluator = None  # test.py evaluates
    train_cfg = dict(max_epochs=1)
    default_hooks = dict(checkpoint=dict(interval=1), logger=dict(interval=1))
"""

# RepL by the hook in upstream's own config, with the Swin delta above
SWIN_HOOK = """
    custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
    custom_hooks = [dict(type='ReplacementHook', interval=4)]
""" + SWIN_DET


@dataclass
class Case:
    """One run: the config it inherits (a shipped one, or upstream's by its
    ``mmdet::`` name), its tiny delta, the data set, the metric ``test.py``
    reports and its largest value (COCO's mAP is a fraction, mIoU and
    top-1 are percentages), the checkpoint of the run, a state-dict key of
    one of the family's sites and one of the stock block it replaced."""
    config: str
    template: str
    data: str
    metric: str
    metric_max: float
    ckpt: str
    site_key: str
    removed_key: str


CASES = {
    'swin-det':
    Case(
        str(ROOT / 'configs/swin/retinanet_repl-swin-t-p4-w7_fpn_1x_coco.py'),
        SWIN_DET, 'coco', 'coco/bbox_mAP', 1.0, 'epoch_1.pth',
        'backbone.stages.1.blocks.1.alpha',
        'backbone.stages.1.blocks.1.attn.w_msa.qkv.weight'),
    'convnext-seg':
    Case(
        str(ROOT / 'configs/convnext/convnext-tiny-repl_upernet_8xb2-amp-'
            '160k_ade20k-512x512.py'), CONVNEXT_SEG, 'cityscapes', 'mIoU',
        100.0, 'iter_2.pth', 'backbone.stages.1.1.alpha',
        'backbone.stages.1.1.depthwise_conv.weight'),
    'resnext-cls':
    Case(
        str(ROOT / 'configs/resnext/resnext50-32x4d-repl_8xb32_in1k.py'),
        RESNEXT_CLS, 'cifar', 'accuracy/top1', 100.0, 'epoch_1.pth',
        'backbone.layer2.1.phi2_prev', 'backbone.layer2.1.conv2.weight'),
    'swin-hook':
    Case('mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', SWIN_HOOK,
         'coco', 'coco/bbox_mAP', 1.0, 'epoch_1.pth',
         'backbone.stages.1.blocks.1.site_norm.weight',
         'backbone.stages.1.blocks.1.ffn.layers.0.0.weight'),
}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """The three tiny sets: 4 train images (2 iterations an epoch at batch
    2) and 2 val images for detection and segmentation; 2 images a class,
    split into train and test, for classification."""
    root = tmp_path_factory.mktemp('data')
    sizes = dict(num_train=4, num_val=2)
    make_coco_shapes(str(root / 'coco'), **sizes)
    make_cityscapes_shapes(str(root / 'cityscapes'), **sizes)
    run('tools/dataset_converters/make_datasets.py', 'synthetic-cifar',
        '--out', str(root / 'cifar'), '--num-per-class', '2')
    return root


def tiny_config(name, folder, data):
    """A user's config: the inherited one, shrunk to seconds on this CPU."""
    case = CASES[name]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'tiny_{name}.py'
    body = textwrap.dedent(case.template).format(
        data=data / case.data, classes=SHAPE_CLASSES)
    path.write_text(f"_base_ = '{case.config}'\n" + body)
    return str(path)


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """``trained(name)``: ``(work dir, train.py's log)`` of the case's tiny
    training run, run once a module for all the tests that look at it."""
    runs = {}

    def train(name):
        if name not in runs:
            work = tmp_path_factory.mktemp(name)
            run('tools/train.py', tiny_config(name, work / 'cfg', data),
                '--work-dir', str(work / 'run'))
            log = next((work / 'run').rglob('*.log')).read_text()
            runs[name] = work / 'run', log
        return runs[name]

    return train


@pytest.mark.parametrize('name', list(CASES))
def test_train_then_test_reports_metric(name, trained, data, tmp_path):
    work, _ = trained(name)
    case = CASES[name]
    sd = load(work / case.ckpt)['state_dict']
    assert 'backbone.replacement_plan' in sd
    assert case.site_key in sd
    assert case.removed_key not in sd
    out = tmp_path / 'metrics.json'
    tested = run('tools/test.py', tiny_config(name, tmp_path, data),
                 str(work / case.ckpt), '--work-dir', str(tmp_path), '--out',
                 str(out))
    # mmengine loads non-strictly: a checkpoint that does not fit the model
    # (a hook route that built no sites, say) only logs its keys
    log = tested.stdout + tested.stderr
    assert 'Load checkpoint from' in log
    assert 'missing keys' not in log and 'unexpected key' not in log
    value = json.loads(out.read_text())[case.metric]
    assert math.isfinite(value) and 0 <= value <= case.metric_max, value


def test_hook_run_records_the_repl_model(trained):
    """The hook turned upstream's ``SwinTransformer`` into its RepL twin
    before training, with the registry route's parameter names; the
    checkpoint names that model for hook-less tools."""
    work, log = trained('swin-hook')
    ckpt = load(work / CASES['swin-hook'].ckpt)
    registry_work, _ = trained('swin-det')
    registry = load(registry_work / CASES['swin-det'].ckpt)
    assert list(ckpt['state_dict']) == list(registry['state_dict'])
    meta = ckpt['meta']
    backbone = meta['repl_model']['backbone']
    assert backbone['type'] == 'RepLSwinTransformer'
    assert backbone['replacement']['interval'] == 4
    assert backbone['embed_dims'] == 16  # the user's model, not Swin-T's
    assert 'ReplacementHook: RepLSwinTransformer built from the config' in log


def test_layer_decay_keeps_no_decay_keys(trained):
    """The ConvNeXt run's optimizer comes from the shipped layer-decay
    constructor: stage-wise lr scales, and the sites' mixing scalars and
    norms in groups without weight decay."""
    work, _ = trained('convnext-seg')
    ckpt = load(work / CASES['convnext-seg'].ckpt)
    groups = ckpt['optimizer']['param_groups']
    by_name = {n: g for g in groups for n in g['param_names']}
    assert len({g['lr_scale'] for g in groups}) > 1  # stage-wise scales
    for key in ('backbone.stages.1.1.alpha',
                'backbone.stages.1.1.site_norm.weight'):
        assert by_name[key]['weight_decay'] == 0.0, key
    kept = by_name['backbone.stages.1.0.depthwise_conv.weight']
    assert kept['weight_decay'] == 0.05
