"""Activation memory of a training step, counted deterministically.

The figure is the bytes of the tensors autograd keeps for backward during
one forward, each storage counted once, the model's own parameters and
buffers excluded. It is what a step holds between forward and backward on
top of the weights, independent of the allocator and of the machine's load.

Two kinds of kept tensors do not pass through autograd's pack hooks, and the
meter catches both:

- tensors saved by ``save_for_backward`` and by built-in ops go through
  :func:`torch.autograd.graph.saved_tensors_hooks` (the reentrant
  checkpoint of upstream blocks saves its inputs this way);
- the non-reentrant checkpoint keeps its inputs in a closure to recompute
  from, and saves nothing inside: the meter records those inputs by
  wrapping ``torch.utils.checkpoint``'s generator for the duration of the
  measurement. Tensors saved inside a checkpointed region are discarded
  by the checkpoint (its own hooks take precedence) and are not counted,
  which is the point of checkpointing.
"""
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils import checkpoint as _cp

_GENERATOR = '_checkpoint_without_reentrant_generator_impl'


def _storage_key(t: Tensor):
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


class SavedTensorMeter:
    """Count the bytes autograd saves for backward inside a ``with`` block.

    Args:
        exclude (Iterable[Tensor]): Tensors whose storages are not counted
            (a model's parameters and buffers: weights, not activations).

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> x = torch.rand(8, 4, requires_grad=True)
        >>> with SavedTensorMeter(lin.parameters()) as m:
        ...     y = torch.relu(lin(x))
        >>> m.bytes  # x (saved by the linear) and relu's output
        256
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self._exclude = {_storage_key(t)[0] for t in exclude}
        self.storages: Dict[tuple, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _record(self, t):
        # A model compiled inside the block traces its checkpoint regions
        # with fake tensors (no storage): what a compiled step saves is
        # counted when it runs, not while it is traced.
        if isinstance(t, Tensor) and t.layout == torch.strided and \
                not is_fake(t):
            key, nbytes = _storage_key(t)
            if key not in self._exclude:
                self.storages[key] = nbytes

    def _pack(self, t):
        self._record(t)
        return t

    @contextmanager
    def _checkpoint_inputs(self):
        real = getattr(_cp, _GENERATOR, None)
        if real is None:  # another torch: checkpoint inputs go uncounted
            yield
            return

        def spy(fn, args, kwargs, **options):
            for a in list(args) + list(kwargs.values()):
                self._record(a)
            return real(fn, args, kwargs, **options)

        setattr(_cp, _GENERATOR, spy)
        try:
            yield
        finally:
            setattr(_cp, _GENERATOR, real)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda t: t)
        self._cp = self._checkpoint_inputs()
        self._hooks.__enter__()
        self._cp.__enter__()
        return self

    def __exit__(self, *exc):
        self._cp.__exit__(*exc)
        self._hooks.__exit__(*exc)
        return False


def saved_bytes(model: nn.Module,
                forward: Callable[[nn.Module], object],
                backward: Optional[Callable[[object], None]] = None) -> int:
    """Bytes saved for backward by ``forward(model)`` (weights excluded).

    Args:
        model (nn.Module): The model, in the mode to measure (``train()``).
        forward (Callable): Runs one forward of ``model``, returns the loss
            (or outputs).
        backward (Callable, optional): Called on what ``forward`` returned
            after measuring, e.g. to free the graph by running backward.
    """
    weights = list(model.parameters()) + list(model.buffers())
    with SavedTensorMeter(weights) as meter:
        out = forward(model)
    if backward is not None:
        backward(out)
    return meter.bytes
