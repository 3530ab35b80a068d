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
from typing import Dict, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class NonReentrantCheckpoint:
    """Mixin: checkpoint ``super().forward`` non-reentrantly when
    ``self.with_cp`` is set and the segment records a graph.

    The segment may carry a *tail*: sites fused into this block's
    checkpoint (``fuse_into_segment``), run after it inside the same
    segment, so the boundary between the block and its sites is not kept
    for backward. The block's (and tail's) norm statistics are updated once:
    the recomputation in backward restores them.
    """

    def forward(self, x):
        # Unlike upstream's reentrant path, which needs an input that
        # requires grad, any trainable tensor in the segment is enough (the
        # first block after frozen stages is checkpointed too).
        if getattr(self, 'with_cp', False) and needs_graph(
                x, *self.parameters(),
                *(t for site in self.tail for t in site.trainable_tensors())):
            return recompute_in_backward(
                self._segment, x, stateful=(self, *self.tail))
        return self._segment(x)

    def _segment(self, x):
        # Also runs when backward recomputes, so the flag is off there too.
        with_cp, self.with_cp = getattr(self, 'with_cp', False), False
        try:
            x = super().forward(x)
        finally:
            self.with_cp = with_cp
        for site in self.tail:
            x = site.compute(x)
        return x

    @property
    def tail(self):
        return getattr(self, 'repl_tail', ())


class CheckpointedSite:
    """Mixin of the modules that stand in for a replaced block: the
    forward they share around their own ``compute``.

    A site fused into the previous block's segment (``fuse_into_segment``)
    passes its input through (the segment computed it); with ``with_cp`` it
    checkpoints itself, its buffers (norm statistics) updated once.
    Subclasses define ``compute(x)``, ``trainable_tensors()`` and
    ``with_cp``.
    """

    fused = False

    def forward(self, x):
        if self.fused:
            return x
        if self.with_cp and needs_graph(x, *self.trainable_tensors()):
            return recompute_in_backward(self.compute, x, stateful=self)
        return self.compute(x)


def fuse_into_segment(block: nn.Module, site: nn.Module):
    """Run ``site`` at the end of ``block``'s checkpoint segment.

    ``block`` must be a :class:`NonReentrantCheckpoint` block followed
    directly by ``site`` in the same container (nothing reads the output
    in between); the site then passes its input through when the container
    calls it. The tail is a plain list attribute: not a child module (no
    double registration), and ``copy.deepcopy`` maps it to the copy's
    sites.
    """
    if not isinstance(block, NonReentrantCheckpoint):
        raise TypeError(f'{type(block).__name__} is not a checkpointed block')
    if not hasattr(block, 'repl_tail'):
        block.repl_tail = []
    block.repl_tail.append(site)
    site.fused = True


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
def frozen_buffers(*modules: nn.Module):
    """Restore the buffers of ``modules`` on exit: a recomputed forward must
    not update BN running statistics a second time."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def recompute_in_backward(fn, *args,
                          stateful: Union[nn.Module, Sequence] = ()):
    """``fn(*args)``, storing only ``args`` for backward (non-reentrant
    checkpoint); the buffers of ``stateful`` (a module or modules) are left
    as the forward set them when backward re-runs ``fn``. RNG state (drop
    path) is replayed, so outputs and gradients equal a plain call's."""
    if isinstance(stateful, nn.Module):
        stateful = (stateful, )
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=lambda: (nullcontext(), frozen_buffers(*stateful)))


def needs_graph(*tensors) -> bool:
    """Whether autograd will record a graph through any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
