"""MMSegmentation adapter: ``RepLResNeXt`` in mmseg's ``MODELS``."""
from mmseg.models.backbones import ResNeXt
from mmseg.registry import MODELS

from .base import RepLResNetMixin


@MODELS.register_module()
class RepLResNeXt(RepLResNetMixin, ResNeXt):
    """mmseg ``ResNeXt`` (depths 50-152, ``groups``, ``base_width``, deep
    stem and dilated stages as upstream allows) with RepL (spec §1-§3,
    §9.1).

    A site's conv2 position is the grouped 3x3 collapsed over its taps: a
    grouped pointwise operator with the same ``groups``
    (:class:`~repl_mm.core.ConvSite`); a site is pointwise, so a dilated
    stage's dilation has nothing to act on in it. Accepts every upstream
    keyword plus ``replacement=dict(...)``; blocks with ``dcn`` or
    ``plugins`` are refused
    (:func:`~repl_mm.models.base.describe_resnet_block`).

    Example:
        >>> m = RepLResNeXt(depth=50, groups=4, base_width=4,
        ...                 base_channels=16, stem_channels=16)
        >>> m.replacement_plan.indices
        (5, 9, 12)
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)
