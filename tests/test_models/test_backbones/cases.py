"""Every registered RepL backbone with its upstream twin, sized tiny."""
import importlib
from dataclasses import dataclass, field

import repl_mm  # noqa: F401

# ResNeXt / V1c / V1d cases: ResNet-50's 16 blocks at a quarter of the
# width (stem and base 16 channels), 4 groups of width 4 in conv2.
NARROW = dict(depth=50, stem_channels=16, base_channels=16)
TINY_X50 = dict(NARROW, groups=4, base_width=4)
TINY_VIT = dict(
    arch=dict(
        embed_dims=32, num_layers=6, num_heads=2, feedforward_channels=128),
    img_size=32,
    patch_size=8)
# 12 blocks over 4 stages: site 4 draws from its stage's block 3 only (its
# next neighbour lies across a down-sampling layer), site 8 from both.
TINY_CONVNEXT = dict(
    arch=dict(depths=[2, 2, 6, 2], channels=[8, 16, 24, 32]),
    out_indices=(0, 1, 2, 3),
    gap_before_final_norm=False)

# Three stages of widths 16, 32, 64: at interval 4, site 4 draws from both
# neighbours and site 8 from its previous one only (block 9, across the
# patch merging, has another width); neither starts a stage, so both fuse
# into a checkpoint segment under with_cp. No stochastic depth (upstream's
# default 0.1 would draw masks).
TINY_SWIN = dict(
    embed_dims=16,
    depths=(2, 6, 1),
    num_heads=(1, 2, 4),
    strides=(4, 2, 2),
    window_size=2,
    out_indices=(0, 1, 2),
    drop_path_rate=0.0)
TINY_CLS_SWIN = dict(
    arch=dict(embed_dims=16, depths=[2, 6, 1], num_heads=[1, 2, 4]),
    img_size=32,
    window_size=2,
    out_indices=(0, 1, 2),
    drop_path_rate=0.0)


@dataclass
class Case:
    name: str
    repl: str  # 'module:Class'
    upstream: str
    kwargs: dict
    shape: tuple = (2, 3, 32, 32)
    kind: str = 'conv'
    # extra=dict(frozen=...): the frozen_stages kwargs that freeze a site
    extra: dict = field(default_factory=dict)

    def cls(self, which):
        mod, name = getattr(self, which).split(':')
        return getattr(importlib.import_module(mod), name)

    def build(self, **replacement):
        return self.cls('repl')(**self.kwargs, replacement=replacement)

    def build_upstream(self):
        """Upstream's class; for depths upstream lacks (He et al.'s CIFAR
        nets) our own ``mode='none'``, tested equal to plain blocks."""
        if self.upstream == self.repl:
            return self.build(mode='none')
        return self.cls('upstream')(**self.kwargs)


CASES = [
    Case('det-r18', 'repl_mm.models.det_resnet:RepLResNet',
         'mmdet.models.backbones:ResNet',
         dict(depth=18, out_indices=(0, 1, 2, 3))),
    Case('det-r50', 'repl_mm.models.det_resnet:RepLResNet',
         'mmdet.models.backbones:ResNet', dict(depth=50)),
    Case('seg-r50v1c', 'repl_mm.models.seg_resnet:RepLResNetV1c',
         'mmseg.models.backbones:ResNetV1c',
         dict(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))),
    Case('cls-r18', 'repl_mm.models.cls_resnet:RepLResNet',
         'mmpretrain.models.backbones:ResNet', dict(depth=18)),
    Case('cls-r50', 'repl_mm.models.cls_resnet:RepLResNet',
         'mmpretrain.models.backbones:ResNet', dict(depth=50)),
    Case('cls-cifar-r18', 'repl_mm.models.cls_resnet:RepLResNet_CIFAR',
         'mmpretrain.models.backbones:ResNet_CIFAR', dict(depth=18)),
    Case('cls-cifar-r20', 'repl_mm.models.cls_resnet:RepLResNet_CIFAR',
         'repl_mm.models.cls_resnet:RepLResNet_CIFAR', dict(depth=20)),
    Case('det-x50', 'repl_mm.models.det_resnext:RepLResNeXt',
         'mmdet.models.backbones:ResNeXt', TINY_X50),
    Case('det-r50v1d', 'repl_mm.models.det_resnet:RepLResNetV1d',
         'mmdet.models.backbones:ResNetV1d', NARROW),
    Case('seg-x50', 'repl_mm.models.seg_resnext:RepLResNeXt',
         'mmseg.models.backbones:ResNeXt',
         dict(TINY_X50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))),
    Case('cls-x50', 'repl_mm.models.cls_resnext:RepLResNeXt',
         'mmpretrain.models.backbones:ResNeXt',
         dict(NARROW, groups=4, width_per_group=4)),
    Case('cls-r50v1c', 'repl_mm.models.cls_resnet:RepLResNetV1c',
         'mmpretrain.models.backbones:ResNetV1c', NARROW),
    Case('cls-r50v1d', 'repl_mm.models.cls_resnet:RepLResNetV1d',
         'mmpretrain.models.backbones:ResNetV1d', NARROW),
    Case(
        'cls-vit',
        'repl_mm.models.cls_vit:RepLVisionTransformer',
        'mmpretrain.models.backbones:VisionTransformer',
        TINY_VIT,
        kind='transformer'),
    Case(
        'det-swin',
        'repl_mm.models.det_swin:RepLSwinTransformer',
        'mmdet.models.backbones:SwinTransformer',
        TINY_SWIN,
        kind='transformer',
        extra=dict(frozen=dict(frozen_stages=1))),
    Case(
        'seg-swin',
        'repl_mm.models.seg_swin:RepLSwinTransformer',
        'mmseg.models.backbones:SwinTransformer',
        TINY_SWIN,
        kind='transformer',
        extra=dict(frozen=dict(frozen_stages=1))),
    Case(
        'cls-swin',
        'repl_mm.models.cls_swin:RepLSwinTransformer',
        'mmpretrain.models.backbones:SwinTransformer',
        TINY_CLS_SWIN,
        kind='transformer',
        extra=dict(frozen=dict(frozen_stages=0))),
    Case(
        'cls-convnext',
        'repl_mm.models.cls_convnext:RepLConvNeXt',
        'mmpretrain.models.backbones:ConvNeXt',
        TINY_CONVNEXT,
        kind='convnext'),
]
IDS = [c.name for c in CASES]
