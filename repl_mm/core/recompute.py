"""Non-reentrant activation checkpointing for upstream blocks (spec §8).

Upstream ResNet blocks call ``torch.utils.checkpoint`` in its reentrant
form. Under DDP, a weight read by two modules (a kept block and the site
that synthesizes from it) then raises "Expected to mark a variable ready
only once". :func:`use_non_reentrant_checkpoint` re-classes a block so its
``with_cp`` path checkpoints the whole upstream forward with
``use_reentrant=False``; state-dict keys and ``isinstance`` checks are
unchanged.

The classes it makes at run time have unique names derived from the
upstream class's module and name (mmdet's and mmpretrain's ``BasicBlock``
become ``NonReentrant_mmdet_models_backbones_resnet_BasicBlock`` and
``NonReentrant_mmpretrain_models_backbones_resnet_BasicBlock``), are
attributes of this module under those names, and pickle by the upstream
class (see :meth:`NonReentrantCheckpoint.__reduce_ex__`): ``torch.save`` of
a whole ``with_cp`` model, ``pickle`` and ``copy.deepcopy`` work, also in a
process that has not made the class yet.

Recomputation in backward may run any number of times on one graph
(``retain_graph=True``, ``torch.autograd.grad`` then ``backward``,
``gradcheck``): each run restores the buffers it touched
(:class:`FrozenBuffers`), so gradients of several backward passes add up
as without recompute.
"""
import copyreg
import functools
import sys
from contextlib import nullcontext
from typing import Dict, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..utils.compat import buffers_swapped, compiles_sites, is_compiling


class NonReentrantCheckpoint:
    """Mixin: checkpoint ``super().forward`` non-reentrantly when
    ``self.with_cp`` is set and the segment records a graph.

    The segment may carry a *tail*: sites fused into this block's
    checkpoint (``fuse_into_segment``), run after it inside the same
    segment, so the boundary between the block and its sites is not kept
    for backward. The block's (and tail's) norm statistics are updated once:
    the recomputation in backward restores them.
    """

    def forward(self, x, *args):
        if is_compiling() and not compiles_sites():
            return run_eagerly(self._forward, x, *args)
        return self._forward(x, *args)

    def _forward(self, x, *args):
        # Unlike upstream's reentrant path, which needs an input that
        # requires grad, any trainable tensor in the segment is enough (the
        # first block after frozen stages is checkpointed too).
        if getattr(self, 'with_cp', False) and needs_graph(
                x, *self.parameters(),
                *(t for site in self.tail for t in site.trainable_tensors())):
            # The tail sites' synthesized weights are made here, outside
            # the segment: backward keeps them instead of synthesizing
            # again; only the feature-map part is recomputed.
            weights = [tuple(site.weights(x)) for site in self.tail]
            counts = tuple(len(w) for w in weights)
            return recompute_in_backward(
                lambda x, *flat: self._segment(x, flat, counts, args),
                x,
                *(t for w in weights for t in w),
                stateful=(self, *self.tail))
        return self._segment(x, args=args)

    def _segment(self, x, flat=(), counts=None, args=()):
        """The block, then its tail sites (with the given weights, in
        order, ``counts[i]`` for site i; their own when None). ``args``:
        the block's further positional arguments (a Swin block's
        ``hw_shape``), passed to the block and to every tail site."""
        # Also runs when backward recomputes, so the flag is off there too.
        with_cp, self.with_cp = getattr(self, 'with_cp', False), False
        try:
            x = super().forward(x, *args)
        finally:
            self.with_cp = with_cp
        start = 0
        for i, site in enumerate(self.tail):
            if counts is None:
                x = site.compute(x, *args)
                continue
            x = site.forward_with(x, *flat[start:start + counts[i]],
                                  **block_args(args))
            start += counts[i]
        return x

    @property
    def tail(self):
        return getattr(self, 'repl_tail', ())

    def __reduce_ex__(self, protocol):
        """Pickle as the upstream class, re-swapped on load.

        The class itself is made at run time, so a pickle naming it could
        not be loaded where it has not been made yet. The object is instead
        rebuilt by :func:`_rebuild_non_reentrant` from the (importable)
        upstream class, which swaps the class again; the state (the
        module's ``__dict__``) is pickled as usual, so ``copy.deepcopy``
        still maps everything it references (a ``repl_tail``) to the copy.
        """
        rv = super().__reduce_ex__(max(protocol, 2))
        upstream = type(self).__dict__.get('_repl_upstream')
        if upstream is None or not isinstance(rv, tuple) or \
                rv[0] is not copyreg.__newobj__ or \
                rv[1][0] is not type(self):
            return rv  # not one of our classes or a custom reduction
        return (_rebuild_non_reentrant, (upstream, *rv[1][1:])) + tuple(rv[2:])


class CheckpointedSite:
    """Mixin of the modules that stand in for a replaced block: the
    forward they share around their own function.

    A site's function is split in two: ``weights(x)``, the weight-space
    part (synthesis from the neighbours' live weights: small tensors), and
    ``forward_with(x, *weights)``, the feature-map part; ``compute(x)`` is
    ``forward_with(x, *weights(x))``. A block called with further positional
    arguments (``block(x, hw_shape)``) is stood in for by a site called the
    same way: they reach ``forward_with`` as ``block_args`` (see
    :func:`block_args`). Every recomputation in backward re-runs
    ``forward_with`` only: the synthesized weights are kept for backward, so
    synthesis runs once per step.

    A site fused into the previous block's segment (``fuse_into_segment``)
    passes its input through (the segment computed it); with ``with_cp`` it
    checkpoints ``forward_with``, its buffers (norm statistics) updated once.
    Subclasses define ``weights(x)``, ``forward_with(x, *weights,
    block_args=())``, ``trainable_tensors()`` and ``with_cp``.
    """

    fused = False

    def forward(self, x, *args):
        if is_compiling() and not compiles_sites():
            return run_eagerly(self._forward, x, *args)
        return self._forward(x, *args)

    def _forward(self, x, *args):
        if self.fused:
            return x
        if self.with_cp and needs_graph(x, *self.trainable_tensors()):
            fn = self.forward_with
            if args:
                fn = functools.partial(fn, **block_args(args))
            return recompute_in_backward(
                fn, x, *self.weights(x), stateful=self)
        return self.compute(x, *args)

    def compute(self, x, *args):
        """The site's function, without ``with_cp`` checkpointing."""
        return self.forward_with(x, *self.weights(x), **block_args(args))


def block_args(args: tuple) -> dict:
    """``forward_with``'s keywords for a block's further positional
    arguments ``args`` (a Swin block's ``hw_shape``): none when there are
    none, so ResNet and ViT sites are called exactly as before.

    A block called as ``block(x, *args)`` is stood in for by a module
    called the same way; a site whose function is token- or pixel-wise
    ignores ``block_args``, an :class:`~repl_mm.core.InterpolatedBlock`
    passes it on to the block it runs.
    """
    return dict(block_args=tuple(args)) if args else {}


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


def _class_name(cls: type) -> str:
    """``NonReentrant_<module>_<qualname>`` of an upstream class, dots as
    underscores, made unique among the names this module holds."""
    base = 'NonReentrant_' + f'{cls.__module__}.{cls.__qualname__}'.replace(
        '.', '_').replace('<', '_').replace('>', '_')
    name, n = base, 1
    module = sys.modules[__name__]
    while getattr(module, name, None) is not None:
        n += 1
        name = f'{base}_{n}'
    return name


def use_non_reentrant_checkpoint(module: nn.Module) -> nn.Module:
    """Swap ``module``'s class for a cached ``NonReentrantCheckpoint``
    subclass of it (idempotent) and return the module.

    The subclass is made once per upstream class, named uniquely after the
    upstream class's module and name (see :func:`_class_name`) and set as
    an attribute of this module under that name.
    """
    cls = type(module)
    if issubclass(cls, NonReentrantCheckpoint):
        return module
    if cls not in _CLASSES:
        name = _class_name(cls)
        new = type(name, (NonReentrantCheckpoint, cls), {
            '__module__': __name__,
            '__qualname__': name,
            '_repl_upstream': cls
        })
        setattr(sys.modules[__name__], name, new)
        _CLASSES[cls] = new
    module.__class__ = _CLASSES[cls]
    return module


def _rebuild_non_reentrant(upstream: type, *args) -> nn.Module:
    """Unpickling: a bare ``upstream`` object with the class swapped (its
    state is set afterwards, as for any pickled module)."""
    return use_non_reentrant_checkpoint(upstream.__new__(upstream, *args))


class FrozenBuffers:
    """Restore the buffers of ``modules`` on exit: a recomputed forward must
    not update BN running statistics a second time.

    Reusable (and re-entrant): every ``with`` snapshots the buffers on entry
    and restores them on exit. Non-reentrant checkpointing makes its
    recompute context once per forward and enters it at every recompute,
    i.e. once per backward through the segment; a single-use (generator)
    context manager would fail at the second backward.

    Args:
        *modules (nn.Module): Modules whose buffers (all, recursively) are
            restored.
    """

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self._saved = []

    def __enter__(self) -> 'FrozenBuffers':
        self._saved.append([(b, b.detach().clone()) for m in self.modules
                            for b in m.buffers()])
        return self

    def __exit__(self, *exc_info) -> bool:
        saved = self._saved.pop()
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        return False


def frozen_buffers(*modules: nn.Module) -> FrozenBuffers:
    """A fresh :class:`FrozenBuffers` of ``modules``."""
    return FrozenBuffers(*modules)


def recompute_in_backward(fn, *args, stateful: Union[nn.Module,
                                                     Sequence] = ()):
    """``fn(*args)``, storing only ``args`` for backward (non-reentrant
    checkpoint); the buffers of ``stateful`` (a module or modules) are left
    as the forward set them when backward re-runs ``fn``, however many
    backward passes run through the graph. RNG state (drop path) is
    replayed, so outputs and gradients equal a plain call's.

    Under ``torch.compile`` the checkpoint is traced as a region that the
    compiler recomputes in its backward graph (:func:`_compiled_region`;
    dynamo cannot trace :class:`FrozenBuffers`' ``context_fn``). (Where
    torch cannot trace the sites, they never reach this under compile:
    :func:`run_eagerly`.)
    """
    if isinstance(stateful, nn.Module):
        stateful = (stateful, )
    stateful = tuple(stateful)
    if is_compiling():
        return _compiled_region(fn, args, stateful)

    def context_fn():
        # Fresh, reusable context managers at every call: the recompute
        # one is entered once per backward through the segment.
        return nullcontext(), FrozenBuffers(*stateful)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)


def _compiled_region(fn, args: tuple, stateful: tuple):
    """``fn(*args)`` as a checkpoint region that mutates no buffer.

    The region runs ``fn`` on copies of the buffers of ``stateful``
    (swapped in with :func:`~repl_mm.utils.compat.buffers_swapped`),
    returns the copies as the forward left them, and the buffers take
    those values after the region: the norm statistics are updated once,
    by the forward, however the backend treats the region. A backend that
    functionalizes the graph (AOTAutograd: ``aot_eager``, inductor) would
    update them once anyway; one that runs the traced region as an eager
    checkpoint (``backend='eager'``) would otherwise replay the in-place
    updates in backward, which torch's checkpoint rejects ("modified by an
    inplace operation"). The region's inputs are copies too, so nothing
    the recomputation reads changes after the forward. The copies are of
    per-channel statistics: a few kB.
    """
    named = [dict(m.named_buffers()) for m in stateful]
    flat = [b for buffers in named for b in buffers.values()]
    if not flat:
        return checkpoint(fn, *args, use_reentrant=False)
    n = len(args)

    def region(*inputs):
        copies = [b.clone() for b in inputs[n:]]
        it = iter(copies)
        swaps = [{name: next(it) for name in buffers} for buffers in named]
        return (_with_buffers(stateful, swaps, fn, inputs[:n]), *copies)

    out, *updated = checkpoint(
        region, *args, *(b.clone() for b in flat), use_reentrant=False)
    with torch.no_grad():
        for b, v in zip(flat, updated):
            b.copy_(v)
    return out


def _with_buffers(modules: tuple, swaps: list, fn, args: tuple):
    """``fn(*args)`` with ``modules[i]``'s buffers swapped for
    ``swaps[i]``, for every i (nested ``with`` blocks: dynamo traces them
    one by one)."""
    if not modules:
        return fn(*args)
    with buffers_swapped(modules[0], swaps[0]):
        return _with_buffers(modules[1:], swaps[1:], fn, args)


@torch._dynamo.disable
def run_eagerly(fn, *args):
    """``fn(*args)`` outside any ``torch.compile`` graph: where torch cannot
    trace RepL's sites and checkpointed blocks
    (:func:`~repl_mm.utils.compat.compiles_sites`), compiled models run
    them eagerly, with their eager recompute, between compiled graphs (a
    graph break at each)."""
    return fn(*args)


def needs_graph(*tensors) -> bool:
    """Whether autograd will record a graph through any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
