"""MMSegmentation adapter: ``RepLResNetV1c`` in mmseg's ``MODELS``."""
from mmseg.models.backbones import ResNetV1c
from mmseg.registry import MODELS

from .base import RepLResNetMixin


@MODELS.register_module()
class RepLResNetV1c(RepLResNetMixin, ResNetV1c):
    """mmseg ``ResNetV1c`` (deep stem) with RepL (spec §1-§3).

    Dilated stages (DeepLab's ``strides=(1, 2, 1, 1)``, ``dilations=(1, 1,
    2, 4)``) keep their dilations: a site is pointwise, so it has none to
    keep, and the first block of a dilated stage changes channels and is
    never a site. Accepts every upstream keyword plus
    ``replacement=dict(...)``.

    Example:
        >>> m = RepLResNetV1c(depth=50, strides=(1, 2, 1, 1),
        ...                   dilations=(1, 1, 2, 4))
        >>> m.replacement_plan.indices
        (5, 9, 12)
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)
