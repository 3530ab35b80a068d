"""Mixed precision on the CPU: bf16 autocast without a loss scaler."""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from mmengine.runner.amp import autocast

from ..utils.compat import cuda_bf16_native


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under bfloat16 autocast, with no
    gradient scaling: what ``--amp`` uses where mmengine's
    ``AmpOptimWrapper`` refuses to run (it asserts a GPU/NPU/MLU).
    bfloat16 has float32's range, so no loss scale is needed.

    float16 is refused: without a loss scale its small gradients underflow
    to zero. On a GPU, ``tools/train.py --amp`` picks mmengine's
    ``AmpOptimWrapper`` (float16 with a dynamic loss scale) instead. Where
    CUDA is available (autocast then runs on the GPU), the device must
    compute bfloat16 natively (compute capability 8.0 or newer): older GPUs
    only emulate it, without bfloat16 convolutions.

    Args:
        dtype (str): Autocast dtype; only ``'bfloat16'``. Defaults to
            ``'bfloat16'``.
        **kwargs: Passed to ``OptimWrapper``.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs):
        if dtype == 'float16':
            raise ValueError(
                "AutocastOptimWrapper dtype='float16' would train in float16 "
                'without a loss scale (small gradients underflow to zero): '
                "use mmengine's AmpOptimWrapper (loss_scale='dynamic'; "
                'tools/train.py --amp picks it on a GPU), or '
                "dtype='bfloat16'")
        if dtype != 'bfloat16':
            raise ValueError("AutocastOptimWrapper dtype must be 'bfloat16', "
                             f'but got {dtype!r}')
        if torch.cuda.is_available() and not cuda_bf16_native():
            raise RuntimeError(
                "AutocastOptimWrapper dtype='bfloat16': the current CUDA "
                'device does not support bfloat16 (compute capability < '
                "8.0; emulation only): use mmengine's "
                "AmpOptimWrapper (float16 with loss_scale='dynamic'; "
                'tools/train.py --amp picks it on a GPU)')
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), autocast(dtype=self.cast_dtype):
            yield
