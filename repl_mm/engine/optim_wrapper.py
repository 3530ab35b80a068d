"""Mixed precision on the CPU: bf16 autocast without a loss scaler."""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from mmengine.runner.amp import autocast


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under autocast, with no gradient
    scaling: what ``--amp`` uses where mmengine's ``AmpOptimWrapper``
    refuses to run (it asserts a GPU/NPU/MLU). bfloat16 has float32's
    range, so no loss scale is needed. On a GPU, ``tools/train.py --amp``
    picks ``AmpOptimWrapper`` (float16 with a dynamic loss scale) instead.

    Args:
        dtype (str): Autocast dtype; the CPU supports only ``'bfloat16'``.
            Defaults to ``'bfloat16'``.
        **kwargs: Passed to ``OptimWrapper``.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs):
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError("AutocastOptimWrapper dtype must be 'bfloat16' "
                             f"or 'float16', but got {dtype!r}")
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), autocast(dtype=self.cast_dtype):
            yield
