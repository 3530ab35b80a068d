"""Non-reentrant activation checkpointing for upstream blocks (spec §8).

Upstream ResNet blocks call ``torch.utils.checkpoint`` in its reentrant
form. Under DDP, a weight read by two modules (a kept block and the site
that synthesizes from it) then raises "Expected to mark a variable ready
only once". :func:`use_non_reentrant_checkpoint` re-classes a block so its
``with_cp`` path checkpoints the whole upstream forward with
``use_reentrant=False``; state-dict keys and ``isinstance`` checks are
unchanged.
"""
from contextlib import contextmanager, nullcontext
from typing import Dict

import torch
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


@contextmanager
def frozen_buffers(module: nn.Module):
    """Restore ``module``'s buffers on exit: a recomputed forward must not
    update BN running statistics a second time."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def recompute_in_backward(fn, *args, stateful: nn.Module = None):
    """``fn(*args)``, storing only ``args`` for backward (non-reentrant
    checkpoint); ``stateful``'s buffers are left as the forward set them
    when backward re-runs ``fn``. RNG state (drop path) is replayed, so
    outputs and gradients equal those of a plain call."""
    if stateful is None:
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=lambda: (nullcontext(), frozen_buffers(stateful)))


def needs_graph(*tensors) -> bool:
    """Whether autograd will record a graph through any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
