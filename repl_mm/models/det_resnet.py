"""MMDetection adapters: ``RepLResNet`` and ``RepLResNetV1d`` in mmdet's
``MODELS``."""
from mmdet.models.backbones import ResNet, ResNetV1d
from mmdet.registry import MODELS

from .base import RepLResNetMixin


@MODELS.register_module()
class RepLResNet(RepLResNetMixin, ResNet):
    """mmdet ``ResNet`` (depths 18-152) with RepL (spec §1-§3).

    Accepts every upstream keyword plus ``replacement=dict(...)`` (see
    :class:`repl_mm.core.ReplacementConfig`). State-dict keys of kept
    blocks are upstream's, so ``init_cfg=dict(type='Pretrained', ...)``
    with an upstream checkpoint loads them (spec §6). ``with_cp`` uses
    non-reentrant checkpointing for every block (spec §8).

    Example:
        >>> import torch
        >>> m = RepLResNet(depth=50, replacement=dict(interval=4))
        >>> m.replacement_plan.indices
        (5, 9, 12)
        >>> [o.shape for o in m(torch.rand(1, 3, 64, 64))]  # doctest: +SKIP
        [torch.Size([1, 256, 16, 16]), torch.Size([1, 512, 8, 8]), ...]
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)


@MODELS.register_module()
class RepLResNetV1d(RepLResNetMixin, ResNetV1d):
    """mmdet ``ResNetV1d`` (deep stem, average-pool down-sampling
    shortcuts) with RepL (spec §1-§3).

    The variant changes the stem and the down-sampling blocks' shortcuts,
    never a site (a site is a block with an identity shortcut), so plans
    equal :class:`RepLResNet`'s. Accepts every upstream keyword plus
    ``replacement=dict(...)``; blocks with ``dcn`` or ``plugins`` are
    refused (:func:`~repl_mm.models.base.describe_resnet_block`).

    Example:
        >>> m = RepLResNetV1d(depth=50)
        >>> m.replacement_plan.indices
        (5, 9, 12)
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)
