"""MMPretrain adapter: ``RepLSwinTransformer`` in mmpretrain's ``MODELS``."""
from mmpretrain.models.backbones import SwinTransformer
from mmpretrain.registry import MODELS

from .base import RepLSwinMixin


class SwinCheckpointVersions(SwinTransformer):
    """Upstream's handling of old checkpoints, for a subclass too.

    mmpretrain's ``SwinTransformer`` adapts the state of old checkpoints
    (metadata version < 2: ``norm.`` -> ``norm{last}.``; < 3: the
    ``attn_mask`` buffers dropped) only when ``self.__class__`` is exactly
    itself. Its method runs here with the class set to upstream's for the
    call, so its subclasses load what upstream loads (old ImageNet
    checkpoints, e.g.); nothing else differs.
    """

    def _load_from_state_dict(self, *args, **kwargs):
        cls = self.__class__
        self.__class__ = SwinTransformer
        try:
            SwinTransformer._load_from_state_dict(self, *args, **kwargs)
        finally:
            self.__class__ = cls


@MODELS.register_module()
class RepLSwinTransformer(RepLSwinMixin, SwinCheckpointVersions,
                          SwinTransformer):
    """mmpretrain ``SwinTransformer`` with RepL (spec §1, §2, §4, §9.2).

    Accepts every upstream keyword plus ``replacement=dict(...)``. Blocks
    are numbered over all stages (``arch='tiny'``: 12 blocks, sites 4 and
    8 at ``interval=4``); a site is the token-wise ViT computing layer,
    drawn from the neighbours of its own width. Sites keep the
    ``stages.{i}.blocks.{j}.`` name prefix, so ``get_layer_depth`` gives
    them the replaced block's depth. ``with_cp`` checkpoints every block
    non-reentrantly (spec §8). ``frozen_stages=i`` freezes stages 1..i+1,
    as upstream does (``frozen_stages=0`` freezes the first stage), sites
    in them included. An FFN layer scale (``stage_cfgs`` with
    ``ffn_cfgs=dict(layer_scale_init_value=...)``) is not synthesized: a
    site's own norm sets its scale.

    Old checkpoints load as into upstream's class (see
    :class:`SwinCheckpointVersions`).

    Example:
        >>> m = RepLSwinTransformer(
        ...     arch=dict(embed_dims=16, depths=[1, 6, 2],
        ...               num_heads=[1, 2, 4]),
        ...     img_size=32, window_size=2, out_indices=(0, 1, 2))
        >>> m.replacement_plan.indices
        (4, 8)
    """

    frozen_offset = 1

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)
