"""Every torch-version-specific API the package uses, in one place.

The supported range is torch 2.1 (the stack OpenMMLab's prebuilt mmcv
2.1.0 wheels need) through the newest release tested here (2.14). Code
elsewhere calls these helpers instead of testing versions itself.

==============================  ============================================
guard                           what differs between torch versions
==============================  ============================================
:func:`is_autocast_enabled`     ``torch.is_autocast_enabled(device_type)``
                                takes the device type from 2.4; 2.1-2.3
                                have one function per device type.
:func:`safe_globals`            ``torch.serialization.safe_globals`` (a
                                scoped allow-list for ``weights_only``
                                loads) exists from 2.5; before 2.6
                                ``torch.load`` defaults to
                                ``weights_only=False`` and needs none.
:func:`event_start_ns`          profiler events have ``start_ns()`` from
                                2.2 (2.1: ``start_us()``).
==============================  ============================================

Torch-only: imports nothing but torch.
"""
from contextlib import nullcontext
from typing import Iterable, Tuple

import torch


def torch_version(version: str = None) -> Tuple[int, int]:
    """(major, minor) of ``version`` (default: the installed torch)."""
    text = (version or torch.__version__).split('+')[0]
    major, minor = text.split('.')[:2]
    return int(major), int(''.join(c for c in minor if c.isdigit()) or 0)


TORCH_VERSION = torch_version()


def is_autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``'cpu'``, ``'cuda'``,
    ...), on every supported torch."""
    if TORCH_VERSION >= (2, 4):
        try:
            return torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type autocast does not know (meta)
            return False
    if device_type == 'cuda':
        return torch.is_autocast_enabled()
    fn = getattr(torch, f'is_autocast_{device_type}_enabled', None)
    return bool(fn()) if fn is not None else False


def safe_globals(globals_: Iterable) :
    """A context in which ``torch.load(weights_only=True)`` accepts
    ``globals_`` (torch >= 2.5). Before torch 2.6, ``torch.load`` defaults
    to ``weights_only=False`` and mmengine's loads need no allow-list, so on
    torch < 2.5 this is a no-op (a ``weights_only=True`` load there still
    refuses the globals: pass ``weights_only=False`` only for files you
    trust)."""
    fn = getattr(torch.serialization, 'safe_globals', None)
    if fn is None:
        return nullcontext()
    return fn(list(globals_))


def event_start_ns(event) -> int:
    """Start time (ns) of a profiler event (kineto result)."""
    if hasattr(event, 'start_ns'):
        return event.start_ns()
    return int(event.start_us() * 1000)


__all__ = ['TORCH_VERSION', 'torch_version', 'is_autocast_enabled',
           'safe_globals', 'event_start_ns']
