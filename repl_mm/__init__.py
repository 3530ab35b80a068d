"""repl_mm: Replacement Learning (RepL) for MMDetection, MMSegmentation and
MMPretrain.

``import repl_mm`` (or ``custom_imports=dict(imports=['repl_mm'])``)
registers the RepL backbones into whichever of the three codebases is
installed; see :mod:`repl_mm.models`.
"""
from . import datasets  # noqa: F401  (CIFARFormat when mmpretrain is there)
from . import engine  # noqa: F401  (runner, hooks, optim wrapper)
from . import models  # noqa: F401  (registers the backbones)
from .core import ReplacementConfig, ReplacementPlan, replace_blocks

__version__ = '0.1.0'
__all__ = [
    'ReplacementConfig', 'ReplacementPlan', 'replace_blocks', '__version__'
]
