"""MMPretrain adapter: ``RepLResNeXt`` in mmpretrain's ``MODELS``."""
from mmpretrain.models.backbones import ResNeXt
from mmpretrain.registry import MODELS

from .base import RepLResNetMixin


@MODELS.register_module()
class RepLResNeXt(RepLResNetMixin, ResNeXt):
    """mmpretrain ``ResNeXt`` (depths 50-152, ``groups``,
    ``width_per_group``) with RepL (spec §1-§3, §9.1).

    A site's conv2 position is the grouped 3x3 collapsed over its taps: a
    grouped pointwise operator with the same ``groups``
    (:class:`~repl_mm.core.ConvSite`). Accepts every upstream keyword plus
    ``replacement=dict(...)``. With ``drop_path_rate``, a site applies the
    stochastic-depth rate of the block it replaced to its update; sites
    keep the replaced block's parameter-name prefix, so
    ``get_layer_depth`` gives them the replaced block's depth.

    Example:
        >>> m = RepLResNeXt(depth=50, groups=4, width_per_group=4,
        ...                 base_channels=16, stem_channels=16)
        >>> m.replacement_plan.indices
        (5, 9, 12)
    """

    def __init__(self, depth, *args, replacement=None, **kwargs):
        super().__init__(depth, *args, **kwargs)
        self.setup_replacement(replacement)
