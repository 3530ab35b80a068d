"""MMPretrain adapter: ``RepLConvNeXt`` (also mmdet's and mmseg's ConvNeXt
backbone, which their configs name ``mmpretrain.ConvNeXt``)."""
from typing import List

from mmpretrain.models.backbones import ConvNeXt
from mmpretrain.registry import MODELS
from torch import nn

from ..core import BlockKind, BlockSlot, ConvNeXtBlock, ReplacementPlan
from .base import RepLBackboneMixin


def describe_convnext_block(block: nn.Module) -> ConvNeXtBlock:
    """mmpretrain ``ConvNeXtBlock``: depthwise conv, channel LayerNorm,
    two pointwise layers (``nn.Linear``, or 1x1 convs with
    ``linear_pw_conv=False``), layer scale, optional GRN (ConvNeXt V2).

    GRN and layer scale need no refusal: the site synthesizes neither
    (spec §9.3), it has its own LN; the neighbours keep theirs.

    Raises:
        ValueError: If the depthwise conv is not depthwise (groups = C, one
            input channel per group) or a pointwise layer is not a linear
            or 1x1 conv.
    """
    dw = block.depthwise_conv
    dim = dw.out_channels
    if not isinstance(dw, nn.Conv2d) or dw.in_channels != dim or \
            dw.groups != dim:
        raise ValueError(
            'RepL needs the depthwise conv of a ConvNeXt block (groups = '
            f'in = out channels), got {dw!r}')
    for name in ('pointwise_conv1', 'pointwise_conv2'):
        pw = getattr(block, name)
        if not (isinstance(pw, nn.Linear) or
                (isinstance(pw, nn.Conv2d) and pw.kernel_size == (1, 1)
                 and pw.groups == 1 and pw.stride == (1, 1))):
            raise ValueError(
                f'RepL needs {name} of a ConvNeXt block to be an nn.Linear '
                f'or a dense 1x1 nn.Conv2d, got {pw!r}')
    return ConvNeXtBlock(
        dim=dim,
        dw=dw,
        pw1=block.pointwise_conv1,
        pw2=block.pointwise_conv2,
        norm=block.norm,
        act=block.act,
        drop_path=block.drop_path)


@MODELS.register_module()
class RepLConvNeXt(RepLBackboneMixin, ConvNeXt):
    """mmpretrain ``ConvNeXt`` with RepL (spec §1, §2, §9.3).

    Accepts every upstream keyword plus ``replacement=dict(...)``. Blocks
    are numbered over all stages (``stages[i][j]``; ConvNeXt-T: 3, 3, 9, 3
    -> 18 blocks, k = 4 -> sites 4, 8, 12, 16); every block preserves
    shape (the down-sampling layers sit between stages), so every block is
    replaceable. A neighbour across a down-sampling layer has another
    width and does not serve: a site with no serving neighbour owns its
    operators (the plan table says ``own``). ``vit_weights`` reads
    ``attn`` as the depthwise operator D and ``mlp`` as the pointwise M.
    Sites keep the ``stages.{i}.{j}.`` prefix, so ``get_layer_depth``
    gives them the replaced block's depth; a site's stochastic depth is
    the replaced block's rate. ``with_cp`` checkpoints every block and
    site with ``use_reentrant=False``. Sites in ``frozen_stages`` freeze
    with their stage.

    mmdet and mmseg configs use it as ``type='mmpretrain.RepLConvNeXt'``,
    as they use ``mmpretrain.ConvNeXt``.

    Example:
        >>> m = RepLConvNeXt(arch=dict(depths=[2, 2, 4, 2],
        ...                            channels=[8, 16, 32, 64]))
        >>> m.replacement_plan.indices
        (4, 8)
    """

    def __init__(self, *args, replacement=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_replacement(replacement)

    def block_slots(self) -> List[BlockSlot]:
        # The output of a stage's last block is read outside the stage
        # (the next down-sampling layer, an out_indices norm): the end of
        # its container, which needs no tap.
        return [
            BlockSlot(stage, j, i + 1, j + 1, True)
            for i, stage in enumerate(self.stages) for j in range(len(stage))
        ]

    def setup_replacement(self, replacement) -> ReplacementPlan:
        # upstream keeps with_cp on the blocks only
        with_cp = any(
            getattr(b, 'with_cp', False) for s in self.stages for b in s)
        plan = self._replace(self.block_slots(), replacement,
                             BlockKind.CONVNEXT, describe_convnext_block,
                             with_cp)
        self._freeze_stages()  # sites in frozen stages freeze with them
        return plan

    def _block_frozen(self, index: int) -> bool:
        end = 0
        for stage, blocks in enumerate(self.stages, 1):
            end += len(blocks)
            if index <= end:
                return stage <= self.frozen_stages
        raise IndexError(f'block {index} of {end}')
