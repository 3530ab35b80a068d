"""Load mmengine 0.10.7 training checkpoints under torch >= 2.6.

torch 2.6 made ``torch.load(weights_only=True)`` the default; mmengine
0.10.7 pickles a ``HistoryBuffer`` (message hub) and numpy scalars and
arrays (log values) in its own checkpoints and cannot load them back (fixed
upstream after 0.10.7, unreleased). We allow-list exactly those globals,
only around our own load paths (:class:`RepLRunner`), never globally; a
published checkpoint (``publish_model.py``) holds plain types and tensors
only and needs none of this.

Python pickles a ``HistoryBuffer`` with references to its statistics
methods, which unpickle through ``builtins.getattr``: allow-listing
``getattr`` would let a checkpoint call any attribute of any allowed class
(e.g. ``numpy.ndarray.tofile``). Instead, importing this module registers a
``copyreg`` reducer that pickles a ``HistoryBuffer`` as its constructor
call with plain lists, so checkpoints written by our tools need only the
class itself. Checkpoints written by plain mmengine still hold ``getattr``
and are refused (load them once with ``weights_only=False`` if you trust
them, and save again).
"""
import copyreg
from contextlib import contextmanager

import numpy as np
from mmengine.logging.history_buffer import HistoryBuffer

from ..utils.compat import load_allowing, numpy_multiarray, safe_globals


def _reduce_history_buffer(buf: HistoryBuffer):
    return HistoryBuffer, (buf._log_history.tolist(),
                           buf._count_history.tolist(), buf.max_length)


copyreg.pickle(HistoryBuffer, _reduce_history_buffer)


def _numpy_globals():
    multiarray = numpy_multiarray()
    _reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    dtypes = [
        type(np.dtype(t)) for t in (np.float64, np.float32, np.float16,
                                    np.int64, np.int32, np.uint8, np.bool_)
    ]
    return [_reconstruct, scalar, np.ndarray, np.dtype] + dtypes


def checkpoint_globals() -> list:
    """The globals an mmengine training checkpoint needs."""
    return [HistoryBuffer] + _numpy_globals()


@contextmanager
def allow_mmengine_checkpoints():
    """``torch.load`` inside accepts mmengine's training checkpoints with
    ``weights_only=True`` (the torch >= 2.6 default); a no-op before torch
    2.5, whose ``torch.load`` defaults to ``weights_only=False``."""
    with safe_globals(checkpoint_globals()):
        yield


def load_mmengine_checkpoint(path: str, map_location='cpu'):
    """``torch.load`` of an mmengine training checkpoint (or any plainer
    one) with exactly :func:`checkpoint_globals` allowed; see
    :func:`repl_mm.utils.compat.load_allowing` for torch < 2.5."""
    return load_allowing(path, checkpoint_globals(), map_location)
