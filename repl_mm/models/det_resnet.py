"""MMDetection adapter: ``RepLResNet`` in mmdet's ``MODELS``."""
from mmdet.models.backbones import ResNet
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
