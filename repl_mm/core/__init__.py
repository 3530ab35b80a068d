"""Torch-only core of RepL: no OpenMMLab imports below this package."""
from .checkpoint import NonReentrantCheckpoint, use_non_reentrant_checkpoint
from .cnn_site import ConvSite
from .interpolate import InterpolatedBlock
from .plan import (MODES, NEIGHBORS, ON_INVALID, VIT_WEIGHTS,
                   ReplacementConfig, ReplacementPlan, SiteRecord,
                   nearest_kept, select_sites)
from .surgery import BlockSlot, pick_sources, replace_blocks
from .vit_site import TransformerSite

__all__ = [
    'MODES', 'NEIGHBORS', 'ON_INVALID', 'VIT_WEIGHTS', 'BlockSlot',
    'ConvSite', 'InterpolatedBlock', 'NonReentrantCheckpoint',
    'ReplacementConfig', 'ReplacementPlan', 'SiteRecord', 'TransformerSite',
    'nearest_kept', 'pick_sources', 'replace_blocks', 'select_sites',
    'use_non_reentrant_checkpoint'
]
