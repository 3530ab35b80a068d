"""Non-reentrant activation checkpointing for upstream blocks (spec §8).

Upstream ResNet blocks call ``torch.utils.checkpoint`` in its reentrant
form. Under DDP, a weight read by two modules (a kept block and the site
that synthesizes from it) then raises "Expected to mark a variable ready
only once". :func:`use_non_reentrant_checkpoint` re-classes a block so its
``with_cp`` path checkpoints the whole upstream forward with
``use_reentrant=False``; state-dict keys and ``isinstance`` checks are
unchanged.
"""
from typing import Dict

from torch import nn
from torch.utils.checkpoint import checkpoint


class NonReentrantCheckpoint:
    """Mixin: checkpoint ``super().forward`` non-reentrantly when
    ``self.with_cp`` is set and the input requires grad."""

    def forward(self, x):
        if getattr(self, 'with_cp', False) and x.requires_grad:
            return checkpoint(self._forward_without_cp, x, use_reentrant=False)
        return super().forward(x)

    def _forward_without_cp(self, x):
        # Also runs when backward recomputes, so the flag is off there too.
        self.with_cp = False
        try:
            return super().forward(x)
        finally:
            self.with_cp = True


_CLASSES: Dict[type, type] = {}


def use_non_reentrant_checkpoint(module: nn.Module) -> nn.Module:
    """Swap ``module``'s class for a cached ``NonReentrantCheckpoint``
    subclass of it (idempotent) and return the module."""
    cls = type(module)
    if issubclass(cls, NonReentrantCheckpoint):
        return module
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f'NonReentrant{cls.__name__}',
                             (NonReentrantCheckpoint, cls),
                             {'__module__': __name__})
    module.__class__ = _CLASSES[cls]
    return module
