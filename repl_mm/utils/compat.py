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
:func:`autocast_disabled`       built on :func:`is_autocast_enabled`; enters
                                ``torch.autocast`` only for device types
                                where autocast is on (``meta`` has none).
:func:`safe_globals`            ``torch.serialization.safe_globals`` (a
                                scoped allow-list for ``weights_only``
                                loads) exists from 2.5; before 2.6
                                ``torch.load`` defaults to
                                ``weights_only=False`` and needs none.
:func:`load_allowing`           ``torch.load(weights_only=True)`` with a
                                scoped allow-list from 2.5; torch 2.1-2.4
                                have no scoped one (2.4: a global one
                                only), so there it loads as mmengine does
                                on that torch, ``weights_only=False``.
:func:`event_start_ns`          profiler events have ``start_ns()`` from
                                2.2 (2.1: ``start_us()``).
:func:`cuda_bf16_native`        ``torch.cuda.is_bf16_supported()`` answers
                                native support (compute capability >= 8)
                                on 2.1; later releases also count emulated
                                bf16 (pre-Ampere GPUs, no bf16 cuDNN
                                convolutions) and, once they have it, take
                                ``including_emulation=False`` for the
                                native answer.
:func:`is_compiling`            ``torch.compiler.is_compiling()`` from 2.3;
                                2.1-2.2: ``torch._dynamo.is_compiling()``.
:func:`compiles_sites`          whether ``torch.compile`` traces RepL's
                                sites and checkpointed blocks: yes on 2.14
                                (tested, no graph break inside a site);
                                torch 2.1's dynamo breaks on context
                                managers, cannot trace the custom autograd
                                Functions of synthesis and fails on BN
                                statistics updated in a checkpointed
                                region. Releases in between are untested
                                and treated like 2.1: the sites run
                                eagerly inside compiled models.
:func:`buffers_swapped`         ``torch.nn.utils.stateless.
                                _reparametrize_module`` (private, the
                                engine of ``torch.func.functional_call``,
                                in every supported torch): a module's
                                buffers replaced for a ``with`` block, in
                                a way dynamo traces without a graph break
                                (also inside a checkpoint region, 2.14).
:func:`numpy_multiarray`        numpy's ``multiarray`` module (what its
                                pickles reference): ``numpy._core`` from
                                numpy 2, ``numpy.core`` in 1.x (1.26 has a
                                ``numpy._core`` stub without it).
==============================  ============================================

Torch-only: imports nothing but torch (and numpy, which torch needs).
"""
import importlib
import inspect
from contextlib import ExitStack, contextmanager, nullcontext
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


@contextmanager
def autocast_disabled(*device_types: str):
    """A context with autocast off for each of ``device_types`` where it
    is on; nothing is entered for the others (autocast off already, or a
    device type autocast does not know, such as ``'meta'``).

    Example:
        >>> with torch.autocast('cpu', dtype=torch.bfloat16):
        ...     with autocast_disabled('cpu'):
        ...         (torch.rand(2, 2) @ torch.rand(2, 2)).dtype
        torch.float32
    """
    with ExitStack() as stack:
        for device_type in dict.fromkeys(device_types):
            if is_autocast_enabled(device_type):
                stack.enter_context(
                    torch.autocast(device_type=device_type, enabled=False))
        yield


def safe_globals(globals_: Iterable):
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


def load_allowing(path: str, globals_: Iterable, map_location='cpu'):
    """``torch.load`` of a checkpoint that pickles ``globals_`` (e.g. an
    mmengine training checkpoint): ``weights_only=True`` with exactly
    those globals allowed, on torch >= 2.5; on older torch, which has no
    scoped allow-list, ``weights_only=False`` (what mmengine's own loads do
    there: load only files you trust)."""
    if hasattr(torch.serialization, 'safe_globals'):
        with safe_globals(globals_):
            return torch.load(
                path, map_location=map_location, weights_only=True)
    return torch.load(path, map_location=map_location, weights_only=False)


def event_start_ns(event) -> int:
    """Start time (ns) of a profiler event (kineto result)."""
    if hasattr(event, 'start_ns'):
        return event.start_ns()
    return int(event.start_us() * 1000)


def cuda_bf16_native() -> bool:
    """Whether the current CUDA device computes bfloat16 natively (compute
    capability 8.0 or newer; every ROCm device), on every supported torch:
    what ``torch.cuda.is_bf16_supported()`` answers on torch 2.1. False
    without CUDA."""
    if not torch.cuda.is_available():
        return False
    supported = torch.cuda.is_bf16_supported
    if 'including_emulation' in inspect.signature(supported).parameters:
        return bool(supported(including_emulation=False))
    if not supported():
        return False
    return torch.version.hip is not None or \
        torch.cuda.get_device_capability()[0] >= 8


__all__ = [
    'TORCH_VERSION', 'torch_version', 'is_autocast_enabled',
    'autocast_disabled', 'safe_globals', 'event_start_ns', 'cuda_bf16_native',
    'numpy_multiarray'
]


def is_compiling() -> bool:
    """Whether dynamo is tracing the caller (``torch.compile``)."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


def compiles_sites() -> bool:
    """Whether ``torch.compile`` traces RepL's sites and checkpointed
    blocks (see the table above)."""
    return torch_version() >= (2, 14)


def buffers_swapped(module: torch.nn.Module, buffers: dict):
    """Context manager: ``module``'s buffers named in ``buffers`` (dotted
    names, as ``named_buffers`` gives them) are the given tensors inside
    the ``with`` block, and the module's own again after it."""
    from torch.nn.utils.stateless import _reparametrize_module
    return _reparametrize_module(module, buffers)


def numpy_multiarray():
    """``numpy._core.multiarray`` (numpy 2) or ``numpy.core.multiarray``
    (numpy 1.x): where the numpy installed here pickles arrays from."""
    import numpy as np
    major = int(np.__version__.split('.')[0])
    name = 'numpy._core.multiarray' if major >= 2 else \
        'numpy.core.multiarray'
    return importlib.import_module(name)
