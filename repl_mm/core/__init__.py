"""Torch-only core of RepL: no OpenMMLab imports below this package."""
from .cnn_site import ConvSite
from .contract import (BlockDescription, BlockKind, BlockSlot, ConvBlock,
                       ConvNeXtBlock, TransformerBlock)
from .convnext_site import ConvNeXtSite, StaticConvNeXtSite
from .interpolate import InterpolatedBlock
from .plan import (MODES, NEIGHBORS, ON_INVALID, STATIC_FROM, VIT_WEIGHTS,
                   ReplacementConfig, ReplacementPlan, SiteRecord,
                   nearest_kept, select_sites)
from .recompute import NonReentrantCheckpoint, use_non_reentrant_checkpoint
from .static import (StaticConvSite, StaticTransformerSite,
                     interpolated_block_state, load_static_site)
from .surgery import DroppedBlock, pick_sources, replace_blocks
from .vit_site import TransformerSite
from .walk import (SITE_TYPES, SYNTHESIZING_SITES, SiteRef, is_repl_backbone,
                   iter_repl_backbones, iter_sites)

# Substrings of the names of the parameters that get no weight decay (spec
# §8): mixing weights and the sites' fresh norms. configs/_base_/
# repl_paramwise.py writes them as ``paramwise_cfg.custom_keys``.
NO_DECAY_KEYS = ('.phi', '.alpha', '.beta', '.site_norm.')

__all__ = [
    'MODES', 'NEIGHBORS', 'NO_DECAY_KEYS', 'ON_INVALID', 'SITE_TYPES',
    'STATIC_FROM', 'SYNTHESIZING_SITES', 'VIT_WEIGHTS', 'BlockDescription',
    'BlockKind', 'BlockSlot', 'ConvBlock', 'ConvNeXtBlock', 'ConvNeXtSite',
    'ConvSite', 'DroppedBlock', 'InterpolatedBlock', 'NonReentrantCheckpoint',
    'ReplacementConfig', 'ReplacementPlan', 'SiteRecord', 'SiteRef',
    'StaticConvNeXtSite', 'StaticConvSite', 'StaticTransformerSite',
    'TransformerBlock', 'TransformerSite', 'interpolated_block_state',
    'is_repl_backbone', 'iter_repl_backbones', 'iter_sites',
    'load_static_site', 'nearest_kept', 'pick_sources', 'replace_blocks',
    'select_sites', 'use_non_reentrant_checkpoint'
]
