"""The benchmark's cases: which model is measured, on which input.

A :class:`Case` is a model config (any mmdet / mmseg / mmpretrain config,
ours or upstream, its backbone switched to the RepL twin and made offline)
at one input size and batch; :data:`SUITE` holds the built-in ones. This
module also builds a case's models (:func:`build_model`) and its synthetic
batch (:func:`make_batch`), and computes the training loss on it
(:func:`training_loss`): everything the measuring modules
(:mod:`.flops`, :mod:`.profiling`) and :mod:`.benchmark` share about the
model under test.

Only torch and mmengine are imported at module level; mmdet, mmseg and
mmpretrain are imported when a case needs them.
"""
import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import MMLogger
from torch import nn

from ..apis import scope_of

# (default scope, upstream backbone type) -> our registered twin; mmdet and
# mmseg configs name ConvNeXt with its scope (mmpretrain.ConvNeXt)
TWINS = {
    ('mmdet', 'ResNet'): 'RepLResNet',
    ('mmseg', 'ResNetV1c'): 'RepLResNetV1c',
    ('mmpretrain', 'ResNet'): 'RepLResNet',
    ('mmpretrain', 'ResNet_CIFAR'): 'RepLResNet_CIFAR',
    ('mmpretrain', 'VisionTransformer'): 'RepLVisionTransformer',
    ('mmdet', 'ResNeXt'): 'RepLResNeXt',
    ('mmdet', 'ResNetV1d'): 'RepLResNetV1d',
    ('mmseg', 'ResNeXt'): 'RepLResNeXt',
    ('mmpretrain', 'ResNeXt'): 'RepLResNeXt',
    ('mmpretrain', 'ResNetV1c'): 'RepLResNetV1c',
    ('mmpretrain', 'ResNetV1d'): 'RepLResNetV1d',
    ('mmdet', 'SwinTransformer'): 'RepLSwinTransformer',
    ('mmseg', 'SwinTransformer'): 'RepLSwinTransformer',
    ('mmpretrain', 'SwinTransformer'): 'RepLSwinTransformer',
    ('mmpretrain', 'ConvNeXt'): 'RepLConvNeXt',
    ('mmdet', 'ConvNeXt'): 'RepLConvNeXt',
    ('mmseg', 'ConvNeXt'): 'RepLConvNeXt',
}
# default scope (repl_mm.apis.SCOPES) -> the task its synthetic
# batch and default input size follow
TASKS = {'mmpretrain': 'cls', 'mmdet': 'det', 'mmseg': 'seg'}

DEFAULT_SIZE = {'cls': 224, 'det': 320, 'seg': 256}


def _cls_model(backbone: dict,
               in_channels: int,
               num_classes: int,
               vit: bool = False,
               pooled: Optional[bool] = None) -> dict:
    """An ImageClassifier: ViT head or linear head, and no neck where the
    backbone pools itself (``pooled``, default ``vit``: ViT's cls token,
    ConvNeXt's ``gap_before_final_norm``), else global average pooling."""
    pooled = vit if pooled is None else pooled
    head = dict(
        type='VisionTransformerClsHead' if vit else 'LinearClsHead',
        num_classes=num_classes,
        in_channels=in_channels,
        loss=dict(type='CrossEntropyLoss'))
    return dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=None if pooled else dict(type='GlobalAveragePooling'),
        head=head)


# name -> config and, for the full and the quick run, (input size, batch,
# timed trials); sized so that a case takes minutes on 2 CPU cores.
SUITE: Dict[str, dict] = {
    'cifar-r32':
    dict(
        config=dict(
            default_scope='mmpretrain',
            model=_cls_model(dict(type='RepLResNet_CIFAR', depth=32), 64, 10)),
        full=(32, 64, 10),
        quick=(32, 8, 2)),
    'cifar-r110':
    dict(
        config=dict(
            default_scope='mmpretrain',
            model=_cls_model(dict(type='RepLResNet_CIFAR', depth=110), 64,
                             10)),
        full=(32, 32, 6),
        quick=(32, 4, 2)),
    'resnet50':
    dict(
        config=dict(
            default_scope='mmpretrain',
            model=_cls_model(dict(type='RepLResNet', depth=50), 2048, 1000)),
        full=(224, 4, 4),
        quick=(112, 2, 2)),
    # ResNeXt-50 32x4d: the grouped-conv sites of spec §9.1
    'resnext50':
    dict(
        config=dict(
            default_scope='mmpretrain',
            model=_cls_model(
                dict(
                    type='RepLResNeXt', depth=50, groups=32,
                    width_per_group=4), 2048, 1000)),
        full=(224, 4, 4),
        quick=(112, 2, 2)),
    'deit-s':
    dict(
        config=dict(
            default_scope='mmpretrain',
            model=_cls_model(
                dict(
                    type='RepLVisionTransformer',
                    arch='deit-small',
                    img_size=224,
                    patch_size=16),
                384,
                1000,
                vit=True)),
        full=(224, 4, 4),
        quick=(224, 2, 2)),
    # mmpretrain's Swin pads no map smaller than its window (7): 224 keeps
    # the last stage's 7 x 7
    'swin-t':
    dict(
        config='mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
        full=(224, 4, 4),
        quick=(224, 2, 2)),
    # upstream's ImageNet ConvNeXt-T classifier (its neck-free head)
    'convnext-t':
    dict(
        config=dict(
            default_scope='mmpretrain',
            model=_cls_model(
                dict(type='RepLConvNeXt', arch='tiny'), 768, 1000,
                pooled=True)),
        full=(224, 4, 4),
        quick=(112, 2, 2)),
    'retinanet-r50':
    dict(
        config='mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
        full=(320, 2, 3),
        quick=(192, 1, 2)),
    # batch >= 2: ASPP's image-pool BN needs more than one value
    'deeplabv3-r50':
    dict(
        config='mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-'
        '512x1024.py',
        full=(256, 2, 3),
        quick=(128, 2, 2)),
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


@contextmanager
def quiet():
    """Silence INFO logs (plan tables, init reports) of model builds."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel('WARNING')
    try:
        yield
    finally:
        logger.setLevel(level)


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
        ValueError: If the default scope (:data:`repl_mm.apis.SCOPES`) or
            the backbone is not supported.
    """
    scope = scope_of(cfg)
    if scope not in TASKS:
        raise ValueError(f'default_scope {scope!r}: the benchmark makes '
                         f'synthetic batches for {sorted(TASKS)} only')
    model = cfg.model.to_dict() if isinstance(
        cfg.model, ConfigDict) else copy.deepcopy(cfg.model)
    _offline(model)
    backbone = model['backbone']
    # a scope prefix (mmdet's 'mmpretrain.ConvNeXt') stays on the twin
    prefix, _, btype = backbone['type'].rpartition('.')
    prefix = f'{prefix}.' if prefix else ''
    if btype in TWINS.values():
        backbone['type'] = prefix + btype
    elif (scope, btype) in TWINS:
        backbone['type'] = prefix + TWINS[scope, btype]
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
    return Case(
        name,
        cfg.default_scope,
        model,
        tuple(input_size),
        batch_size,
        repeats,
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


# -- models ----------------------------------------------------------------
def build_model(scope: str, model_cfg: dict) -> nn.Module:
    """:func:`repl_mm.apis.build_model`, then ``init_weights`` and train
    mode, with the build's INFO logs silenced.

    The benchmark measures freshly initialised models (no checkpoint), so
    it initialises what ``apis.build_model`` leaves as the constructors
    made it; the plan tables every build logs would drown its progress
    lines.
    """
    from ..apis import build_model as build
    with quiet():
        model = build(model_cfg, scope)
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
            s = DetDataSample(
                metainfo=dict(
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


def training_loss(model: nn.Module,
                  batch: tuple,
                  forward: Optional[Callable] = None) -> torch.Tensor:
    """The scalar loss of ``model.loss`` on a synthetic batch.

    Args:
        model (nn.Module): The model (its ``parse_losses`` is used).
        batch (tuple): ``(inputs, data_samples)``.
        forward (Callable, optional): Called as ``forward(*batch,
            mode='loss')`` instead of ``model.loss``, e.g. the
            ``torch.compile`` of ``model`` (whose ``loss`` attribute is the
            eager one). Defaults to None.
    """
    losses = model.loss(*batch) if forward is None else forward(
        *batch, mode='loss')
    loss, _ = model.parse_losses(losses)
    return loss
