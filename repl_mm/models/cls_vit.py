"""MMPretrain adapter: ``RepLVisionTransformer``."""
from mmcv.cnn.bricks.transformer import FFN
from mmpretrain.models.backbones import VisionTransformer
from mmpretrain.registry import MODELS

from ..core import BlockKind, TransformerBlock
from .base import RepLBackboneMixin, sequential_slots


def describe_vit_layer(layer) -> TransformerBlock:
    """mmpretrain ``TransformerEncoderLayer``: fused qkv, proj, 2-fc FFN."""
    ffn = layer.ffn
    if not isinstance(ffn, FFN) or ffn.num_fcs != 2:
        raise ValueError("RepL's ViT computing layer needs the 'origin' FFN "
                         "with num_fcs=2 (fc1, act, fc2); got "
                         f'{type(ffn).__name__}')
    fc1, act = ffn.layers[0][0], ffn.layers[0][1]
    return TransformerBlock(
        dim=layer.embed_dims,
        attn=(layer.attn.qkv, layer.attn.proj),
        mlp=(fc1, ffn.layers[1]),
        norm=layer.ln1,
        act=act,
        drop_path=ffn.dropout_layer)


@MODELS.register_module()
class RepLVisionTransformer(RepLBackboneMixin, VisionTransformer):
    """mmpretrain ``VisionTransformer`` with RepL (spec §1, §2, §4).

    Accepts every upstream keyword plus ``replacement=dict(...)`` and
    ``with_cp``. ``with_cp`` is our feature (upstream's ViT has none): it
    checkpoints every encoder layer and site with ``use_reentrant=False``.
    Sites keep the ``layers.{i}.`` name prefix, so ``get_layer_depth``
    gives them the replaced layer's depth; a site's stochastic depth is the
    replaced layer's rate. Configs reproducing the paper's ViT runs use
    ``replacement=dict(indices=[3, 7, 11])`` (spec §1).

    ``frozen_stages`` freezes a site with its layer, and frozen means
    frozen: a site in the frozen part draws only from frozen layers, so no
    gradient reaches anything in that part and its output does not change
    as the later layers train. A site there that would draw from a layer
    that trains (e.g. site 4 with ``frozen_stages=4``: its next neighbour,
    layer 5, trains) is refused with a ``ValueError`` naming
    ``frozen_stages`` and the site; freeze the neighbour too, or draw the
    site from its previous neighbour only (``neighbors='prev'``).

    Example:
        >>> m = RepLVisionTransformer(arch='deit-small', img_size=32,
        ...                           patch_size=8)
        >>> m.replacement_plan.indices
        (4, 8)
    """

    def __init__(self, *args, replacement=None, with_cp=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement, with_cp)

    def block_slots(self):
        return sequential_slots(self.layers, self.out_indices)

    def setup_replacement(self, replacement, with_cp=False):
        self.with_cp = with_cp
        plan = self._replace(self.block_slots(), replacement,
                             BlockKind.TRANSFORMER, describe_vit_layer,
                             with_cp)
        if self.frozen_stages > 0:
            self._freeze_stages()
        return plan

    def _block_frozen(self, index: int) -> bool:
        return index <= self.frozen_stages
