"""The one walk over a model's RepL backbones and their sites.

A *RepL backbone* is a module that holds a :class:`~repl_mm.core.
ReplacementPlan` as ``replacement_plan`` and maps each planned site index
to the module standing in its block's place with ``site_modules()``
(:class:`repl_mm.models.base.RepLBackboneMixin` implements both). Every
consumer (analysis, converters, the logger hook) finds backbones and sites
here, so none keeps a walk of its own.

The module at a site index is what the plan's mode put there: a
:data:`SITE_TYPES` module, a :class:`~repl_mm.core.DroppedBlock` (an
``nn.Identity``, ``mode='drop'``), or the
original block (``mode='none'``; a static site of ``static_from=
'interpolate'``). Filter by type where only some kinds count.
"""
from typing import Iterator, NamedTuple

from torch import nn

from .cnn_site import ConvSite
from .convnext_site import ConvNeXtSite, StaticConvNeXtSite
from .interpolate import InterpolatedBlock
from .plan import ReplacementPlan
from .static import StaticConvSite, StaticTransformerSite
from .vit_site import TransformerSite

#: Sites that synthesize their weights every forward (``synthesize()``).
SYNTHESIZING_SITES = (ConvSite, TransformerSite, ConvNeXtSite)

#: Every module type RepL builds in a block's place.
SITE_TYPES = SYNTHESIZING_SITES + (InterpolatedBlock, StaticConvSite,
                                   StaticTransformerSite, StaticConvNeXtSite)


class SiteRef(NamedTuple):
    """One planned site of a model.

    Attributes:
        name (str): The module's qualified name in the walked model.
        module (nn.Module): What stands at the site (see the module
            docstring).
        backbone (str): The qualified name of its RepL backbone (``''``
            for the walked model itself).
        index (int): The site's 1-based block index in that backbone's
            plan.
    """

    name: str
    module: nn.Module
    backbone: str
    index: int


def is_repl_backbone(module: nn.Module) -> bool:
    """Whether ``module`` is a RepL backbone (see the module docstring)."""
    plan = getattr(module, 'replacement_plan', None)
    return isinstance(plan, ReplacementPlan) and callable(
        getattr(module, 'site_modules', None))


def iter_repl_backbones(model: nn.Module) -> Iterator[tuple]:
    """``(qualified name, backbone)`` for every RepL backbone in
    ``model``, in ``named_modules`` order (``model`` itself is ``''``)."""
    for name, module in model.named_modules():
        if is_repl_backbone(module):
            yield name, module


def iter_sites(model: nn.Module) -> Iterator[SiteRef]:
    """Every planned site of every RepL backbone in ``model``: backbones
    in ``named_modules`` order, a backbone's sites by index (forward
    order).

    Example:
        >>> from torch import nn
        >>> list(iter_sites(nn.Linear(2, 2)))
        []
    """
    for bb_name, backbone in iter_repl_backbones(model):
        names = {id(m): n for n, m in backbone.named_modules()}
        for index, module in sorted(backbone.site_modules().items()):
            name = names[id(module)]
            yield SiteRef(f'{bb_name}.{name}' if bb_name else name, module,
                          bb_name, index)


__all__ = [
    'SITE_TYPES', 'SYNTHESIZING_SITES', 'SiteRef', 'is_repl_backbone',
    'iter_repl_backbones', 'iter_sites'
]
