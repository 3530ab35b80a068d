"""MMDetection adapter: ``RepLResNeXt`` in mmdet's ``MODELS``."""
from mmdet.models.backbones import ResNeXt
from mmdet.registry import MODELS

from .base import RepLResNetMixin


@MODELS.register_module()
class RepLResNeXt(RepLResNetMixin, ResNeXt):
    """mmdet ``ResNeXt`` (depths 50-152, ``groups``, ``base_width``) with
    RepL (spec §1-§3, §9.1).

    A site's conv2 position is the grouped 3x3 collapsed over its taps: a
    grouped pointwise operator with the same ``groups``, drawn from the
    neighbours' grouped 3x3 convs (:class:`~repl_mm.core.ConvSite`).
    Accepts every upstream keyword plus ``replacement=dict(...)``; blocks
    with ``dcn`` or ``plugins`` are refused
    (:func:`~repl_mm.models.base.describe_resnet_block`). State-dict
    keys of kept blocks are upstream's.

    Example:
        >>> m = RepLResNeXt(depth=50, groups=4, base_width=4,
        ...                 base_channels=16, stem_channels=16)
        >>> m.replacement_plan.indices
        (5, 9, 12)
        >>> m.layer2[1].conv_groups
        (1, 4, 1)
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)
