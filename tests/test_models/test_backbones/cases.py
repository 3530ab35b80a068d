"""Every registered RepL backbone with its upstream twin, sized tiny."""
import importlib
from dataclasses import dataclass, field

import repl_mm  # noqa: F401

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


@dataclass
class Case:
    name: str
    repl: str  # 'module:Class'
    upstream: str
    kwargs: dict
    shape: tuple = (2, 3, 32, 32)
    kind: str = 'conv'
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
    Case(
        'cls-vit',
        'repl_mm.models.cls_vit:RepLVisionTransformer',
        'mmpretrain.models.backbones:VisionTransformer',
        TINY_VIT,
        kind='transformer'),
    Case(
        'cls-convnext',
        'repl_mm.models.cls_convnext:RepLConvNeXt',
        'mmpretrain.models.backbones:ConvNeXt',
        TINY_CONVNEXT,
        kind='convnext'),
]
IDS = [c.name for c in CASES]
