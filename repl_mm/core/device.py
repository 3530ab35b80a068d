"""Where the tensors of a site live (spec §8, device and dtype).

Every tensor a site creates (mixing weights, owned weights, the ``scale``
buffer, static weights) is created on the device and in the dtype of the
block it replaces, whenever surgery runs: at build time (registry route),
or after mmengine has moved and cast the model (``ReplacementHook``), or on
the ``meta`` device. Nothing is created on the CPU in float32 and moved
later.
"""
from typing import Iterable, Optional

import torch
from torch import Tensor

from ..utils.compat import autocast_disabled


def factory_kwargs(device: Optional[torch.device] = None,
                   dtype: Optional[torch.dtype] = None,
                   like: Iterable[Tensor] = ()) -> dict:  # yapf: disable
    """``dict(device=..., dtype=...)`` for the tensors a site creates.

    Args:
        device (torch.device, optional): Given by surgery (the replaced
            block's). None: the device of the first tensor of ``like``.
        dtype (torch.dtype, optional): As ``device``, for the dtype.
        like (Iterable[Tensor]): The site's sources' weights, to follow
            when a site is built on its own. With none, torch's defaults.

    Returns:
        dict: Keyword arguments for ``torch.empty`` and the like.
    """
    first = next(iter(like), None)
    if first is not None:
        device = first.device if device is None else device
        dtype = first.dtype if dtype is None else dtype
    return dict(device=device, dtype=dtype)


def weight_factory(weight: Tensor) -> dict:
    """``dict(device=..., dtype=...)`` of a block's weight."""
    return dict(device=weight.device, dtype=weight.dtype)


class ScaleBuffer:
    """Mixin of the sites with a ``scale`` buffer (:class:`ConvSite`,
    :class:`TransformerSite`).

    ``scale`` stays a non-persistent buffer: state dicts, and so every
    checkpoint saved before and after, hold no ``scale`` key, and
    ``site.scale.fill_(...)`` sets it (A.12 diagnostics). A non-persistent
    buffer is restored by no state dict, so its value must survive every
    move of the module by itself: ``.to()`` / ``.half()`` convert it as any
    buffer, and after ``to_empty`` (a ``meta`` build materialised, FSDP
    style) it is refilled, with the value it held before, or with the
    value the site was built with when it was on ``meta`` (which holds no
    value).
    """

    def _register_scale(self, scale: float, **factory):
        self._built_scale = float(scale)
        self.register_buffer(
            'scale', torch.tensor(float(scale), **factory), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        old = self._buffers.get('scale')
        value = self._built_scale if old is None or old.is_meta else \
            float(old)
        out = super()._apply(fn, *args, **kwargs)
        new = self._buffers.get('scale')
        if new is not None and not new.is_meta:
            with torch.no_grad():
                new.fill_(value)
        return out


class Fp32Synthesis:
    """Mixin of the sites: ``synthesize`` runs the subclass's
    ``_synthesize()`` (weight-space math) with autocast off for the
    weights' device type and the caller's, whoever calls (the math itself
    casts to at least fp32)."""

    def _weights_device_type(self) -> str:
        return self.trainable_tensors()[0].device.type

    def synthesize(self, device_type: Optional[str] = None):
        """The synthesized weights, in at least fp32 with autocast off.

        Args:
            device_type (str, optional): The input's device type, for which
                autocast is turned off (as for the weights' device type).
                Defaults to the weights'.
        """
        weights = self._weights_device_type()
        with autocast_disabled(device_type or weights, weights):
            return self._synthesize()
