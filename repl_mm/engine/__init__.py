"""mmengine extensions: runner, hooks, optimizer wrapper and constructor
(registered in mmengine's root registries, so every codebase's scope finds
them), and the layer-decay constructor registered in mmdet's and mmseg's
own registries (:mod:`.layer_decay`)."""
from .checkpoint_globals import (allow_mmengine_checkpoints,
                                 checkpoint_globals, load_mmengine_checkpoint)
from .hooks import ReplacementHook, RepLLoggerHook, RNGStateHook
from .layer_decay import CONSTRUCTORS as LAYER_DECAY_CONSTRUCTORS
from .optim_wrapper import AutocastOptimWrapper
from .optim_wrapper_constructor import RepLOptimWrapperConstructor
from .runner import RepLRunner, build_runner, init_cpu_distributed

__all__ = [
    'LAYER_DECAY_CONSTRUCTORS', 'AutocastOptimWrapper', 'RepLLoggerHook',
    'ReplacementHook', 'RNGStateHook', 'RepLOptimWrapperConstructor',
    'RepLRunner', 'allow_mmengine_checkpoints', 'build_runner',
    'checkpoint_globals', 'init_cpu_distributed', 'load_mmengine_checkpoint'
]
