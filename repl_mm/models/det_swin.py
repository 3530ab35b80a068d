"""MMDetection adapter: ``RepLSwinTransformer`` in mmdet's ``MODELS``."""
from mmdet.models.backbones import SwinTransformer
from mmdet.registry import MODELS

from .base import RepLSwinMixin


@MODELS.register_module()
class RepLSwinTransformer(RepLSwinMixin, SwinTransformer):
    """mmdet ``SwinTransformer`` with RepL (spec §1, §2, §4, §9.2).

    Accepts every upstream keyword plus ``replacement=dict(...)`` (see
    :class:`repl_mm.core.ReplacementConfig`). Blocks are numbered over all
    stages (Swin-T: 12 blocks; ``interval=4`` -> sites 4 and 8); a site is
    the token-wise ViT computing layer, drawn from the neighbours of its
    own width. State-dict keys of kept blocks are upstream's, so an
    upstream checkpoint (``init_cfg=dict(type='Pretrained', ...)``) loads
    them (spec §6). ``with_cp`` checkpoints every block non-reentrantly
    (spec §8). ``frozen_stages=i`` freezes stages 1..i as upstream does,
    sites in them included.

    Example:
        >>> m = RepLSwinTransformer(embed_dims=16, depths=(1, 6, 2),
        ...                         num_heads=(1, 2, 4), strides=(4, 2, 2),
        ...                         window_size=2, out_indices=(0, 1, 2))
        >>> m.replacement_plan.indices
        (4, 8)
        >>> [m.replacement_plan.sites[i].sources['attn'] for i in (0, 1)]
        [('prev', 'next'), ('next',)]
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)
