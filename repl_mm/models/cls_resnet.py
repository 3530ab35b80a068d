"""MMPretrain adapters: ``RepLResNet``, ``RepLResNet_CIFAR``,
``RepLResNetV1c`` and ``RepLResNetV1d``."""
from mmpretrain.models.backbones import (ResNet, ResNet_CIFAR, ResNetV1c,
                                         ResNetV1d)
from mmpretrain.models.backbones.resnet import BasicBlock
from mmpretrain.registry import MODELS

from .base import RepLResNetMixin


@MODELS.register_module()
class RepLResNet(RepLResNetMixin, ResNet):
    """mmpretrain ``ResNet`` with RepL (spec §1-§3).

    Accepts every upstream keyword plus ``replacement=dict(...)``. With
    ``drop_path_rate``, a site applies the stochastic-depth rate of the
    block it replaced to its update. Sites keep the replaced block's
    parameter-name prefix (``layer2.1.``), so ``get_layer_depth`` (layer-wise
    LR decay) gives them the replaced block's depth.

    Example:
        >>> m = RepLResNet(depth=50)
        >>> m.replacement_plan.indices
        (5, 9, 12)
    """

    def __init__(self, depth, *args, replacement=None, **kwargs):
        super().__init__(depth, *args, **kwargs)
        self.setup_replacement(replacement)


@MODELS.register_module()
class RepLResNet_CIFAR(RepLResNetMixin, ResNet_CIFAR):
    """mmpretrain ``ResNet_CIFAR`` with RepL, plus He et al.'s CIFAR nets.

    Depths 18-152 are upstream's (4 stages, ImageNet widths, 3x3 stem).
    Depths 20, 32, 44, 56 and 110 build He et al.'s 3-stage CIFAR ResNets
    (16/32/64 channels, (depth - 2) / 6 BasicBlocks per stage, 3x3 stride-1
    stem; defaults ``num_stages=3``, ``stem_channels=base_channels=16``,
    ``strides=(1, 2, 2)``, ``out_indices=(2, )``). Their down-sampling
    shortcuts are mmpretrain's 1x1-conv projections, where He et al. used
    zero-padding (option A). ``replacement=dict(mode='none')`` is their
    plain end-to-end form.

    Example:
        >>> m = RepLResNet_CIFAR(depth=32)
        >>> m.replacement_plan.indices
        (4, 8, 12)
    """

    HE_DEPTHS = {n: (n - 2) // 6 for n in (20, 32, 44, 56, 110)}
    arch_settings = {
        **ResNet_CIFAR.arch_settings,
        **{
            d: (BasicBlock, (k, k, k))
            for d, k in HE_DEPTHS.items()
        }
    }

    def __init__(self, depth, *args, replacement=None, **kwargs):
        if depth in self.HE_DEPTHS:
            for k, v in dict(
                    num_stages=3,
                    stem_channels=16,
                    base_channels=16,
                    strides=(1, 2, 2),
                    dilations=(1, 1, 1),
                    out_indices=(2, )).items():
                kwargs.setdefault(k, v)
        super().__init__(depth, *args, **kwargs)
        self.setup_replacement(replacement)


@MODELS.register_module()
class RepLResNetV1c(RepLResNetMixin, ResNetV1c):
    """mmpretrain ``ResNetV1c`` (deep stem) with RepL (spec §1-§3).

    The deep stem is not a residual block: plans equal
    :class:`RepLResNet`'s. Accepts every upstream keyword plus
    ``replacement=dict(...)``.

    Example:
        >>> m = RepLResNetV1c(depth=50)
        >>> m.replacement_plan.indices
        (5, 9, 12)
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)


@MODELS.register_module()
class RepLResNetV1d(RepLResNetMixin, ResNetV1d):
    """mmpretrain ``ResNetV1d`` (deep stem, average-pool down-sampling
    shortcuts) with RepL (spec §1-§3).

    Only the stem and the down-sampling blocks' shortcuts differ from
    ``ResNet``, never a site: plans equal :class:`RepLResNet`'s. Accepts
    every upstream keyword plus ``replacement=dict(...)``.

    Example:
        >>> m = RepLResNetV1d(depth=50)
        >>> m.replacement_plan.indices
        (5, 9, 12)
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)
