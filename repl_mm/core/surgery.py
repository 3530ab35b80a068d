"""Apply a replacement plan to a backbone's blocks: the one place that edits
a model (spec §1-§3). Backbones (on the registry and the hook routes
alike) call :func:`replace_blocks`; it never learns which codebase a block
came from: the adapter hands it block slots and a ``describe`` function
returning typed descriptions (:mod:`.contract`). What stands in a block's
place is built by ``BUILDERS[mode][kind]``.

Every tensor a site creates is created on the device and in the dtype of
the block it replaces (its first conv or qkv weight), whenever surgery
runs (spec §8): the hook route edits a model mmengine has already moved.
"""
import copy
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .cnn_site import ConvSite
from .contract import (BlockDescription, BlockKind, BlockSlot, ConvBlock,
                       ConvNeXtBlock, TransformerBlock)
from .convnext_site import ConvNeXtSite, StaticConvNeXtSite, channel_layer_norm
from .device import weight_factory
from .interpolate import InterpolatedBlock
from .plan import (ReplacementConfig, ReplacementPlan, SiteRecord,
                   nearest_kept, select_sites)
from .recompute import fuse_into_segment, use_non_reentrant_checkpoint
from .static import StaticConvSite, StaticTransformerSite
from .vit_site import TransformerSite
from .walk import SITE_TYPES


def pick_sources(prev_ok: bool, next_ok: bool,
                 neighbors: str) -> Tuple[str, ...]:
    """Neighbours that serve one weight position under ``neighbors``.

    ``'prev'``/``'next'`` fall back to the other neighbour when the chosen
    one cannot serve the position (spec §3); empty when neither can.
    """
    ok = {'prev': prev_ok, 'next': next_ok}
    if neighbors == 'both':
        return tuple(n for n in ('prev', 'next') if ok[n])
    other = 'next' if neighbors == 'prev' else 'prev'
    for n in (neighbors, other):
        if ok[n]:
            return (n, )
    return ()


def conv_groups(conv: nn.Module) -> int:
    """A conv's groups (1 for a module without the attribute)."""
    return int(getattr(conv, 'groups', 1))


def conv_shape(conv: nn.Module) -> Tuple[int, int]:
    """(Cout, Cin) of a conv, full channel counts: its weight is (Cout,
    Cin / groups, kh, kw)."""
    w = conv.weight.shape
    return int(w[0]), int(w[1]) * conv_groups(conv)


def _conv_sources(mode: str, desc: ConvBlock, nbrs: dict,
                  cfg: ReplacementConfig) -> list:
    """Per conv position: [(name, neighbour conv)] that can serve it: the
    same (Cout, Cin / g) (synthesize) or the same whole kernel shape
    (interpolate), and the same groups g (spec §9.1)."""
    out = []
    for j, conv in enumerate(desc.convs):
        shape = tuple(conv.weight.shape)

        def serves(nbr: Optional[ConvBlock]) -> bool:
            if nbr is None or j >= len(nbr.convs):
                return False
            w = nbr.convs[j].weight.shape
            if conv_groups(nbr.convs[j]) != conv_groups(conv):
                return False
            # synthesize needs (Cout, Cin); interpolate the whole kernel.
            return tuple(w) == shape if mode == 'interpolate' else \
                tuple(w[:2]) == shape[:2]

        names = pick_sources(
            serves(nbrs['prev']), serves(nbrs['next']), cfg.neighbors)
        out.append([(n, nbrs[n].convs[j]) for n in names])
    return out


def _vit_sources(desc: TransformerBlock, nbrs: dict, cfg: ReplacementConfig,
                 ops: Sequence[str]) -> dict:
    """Per operator (``'attn'``, ``'mlp'``): [(name, neighbour's linear
    pair)] that serve it.

    A neighbour serves only if its width equals the block's (spec §9.2:
    across a Swin patch merging it does not); with none serving, the site
    owns its operators.
    """

    def serves(nbr: Optional[TransformerBlock]) -> bool:
        return nbr is not None and nbr.dim == desc.dim

    names = pick_sources(
        serves(nbrs['prev']), serves(nbrs['next']), cfg.neighbors)
    return {op: [(n, getattr(nbrs[n], op)) for n in names] for op in ops}


# Attributes of the SyncBN types that hold their process group: torch's
# ``nn.SyncBatchNorm.process_group`` and mmcv's ``SyncBatchNorm.group``.
_GROUP_ATTRS = ('process_group', 'group')


def _process_group_types() -> tuple:
    dist = torch.distributed
    group = getattr(dist, 'ProcessGroup', None) if dist.is_available() \
        else None
    return (group, ) if isinstance(group, type) else ()


def _shared_groups(module: nn.Module) -> Dict[int, Any]:
    """A ``copy.deepcopy`` memo that maps every process group ``module``
    (or a submodule) holds to itself."""
    types = _process_group_types()
    memo = {}
    for m in module.modules():
        for name, value in vars(m).items():
            if value is not None and (name in _GROUP_ATTRS
                                      or isinstance(value, types)):
                memo[id(value)] = value
    return memo


def fresh_norm(norm: nn.Module) -> nn.Module:
    """A new norm of the same type and width as ``norm``: reset
    parameters and statistics, trainable (spec §3: never shared).

    A copy of ``norm`` (so of any norm type, with its options, on its
    device and in its dtype), reset. A SyncBN's process group is shared
    with ``norm``, not copied: a process group cannot be copied (torch's
    ``SyncBatchNorm`` once DDP converted it, mmcv's ``MMSyncBN``), and the
    site's norm synchronises over the same processes as the block's.
    """
    new = copy.deepcopy(norm, _shared_groups(norm))
    if hasattr(new, 'reset_parameters'):
        new.reset_parameters()  # BN: also resets running statistics
    for p in new.parameters():
        p.requires_grad_(True)
    return new


_VIT_OPS = {
    'attn+mlp': ('attn', 'mlp'),
    'attn': ('attn', ),
    'mlp': ('mlp', ),
    'none': ()
}


def _named(sources) -> Tuple[str, ...]:
    return tuple(n for n, _ in sources) or ('own', )


def block_factory(desc: BlockDescription) -> dict:
    """``dict(device=..., dtype=...)`` of the block ``desc`` describes: of
    its first conv weight (:class:`ConvBlock`) or its qkv weight
    (:class:`TransformerBlock`) or its depthwise conv weight
    (:class:`ConvNeXtBlock`). Every tensor its site creates takes them."""
    lin = {
        BlockKind.CONV: lambda: desc.convs[0],
        BlockKind.TRANSFORMER: lambda: desc.attn[0],
        BlockKind.CONVNEXT: lambda: desc.dw
    }[desc.kind]()
    return weight_factory(lin.weight)


def python_float_rates(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """Make every stochastic-depth rate in ``module`` a Python float.

    Upstream rates come from ``np.linspace``: numpy floats, on which
    ``torch.compile`` breaks the graph (mmcv's ``drop_path`` branches on
    the rate). The same rate as a Python float keeps the module in one
    graph. Applied to what RepL builds or wraps: sites, interpolated
    blocks and the blocks it checkpoints.
    """
    if module is None:
        return None
    for m in module.modules():
        rate = getattr(m, 'drop_prob', None)
        if isinstance(rate, numbers.Real) and not isinstance(rate, bool):
            m.drop_prob = float(rate)
    return module


def _site_drop_path(desc: BlockDescription) -> Optional[nn.Module]:
    """A copy of the block's stochastic depth for its site."""
    return python_float_rates(copy.deepcopy(desc.drop_path))


# -- the builders: (block, its description, the kept neighbours'
# descriptions, config, with_cp) -> (module in its place, its sources) --


def _keep(old, desc, nbrs, cfg, with_cp):
    """``mode='none'``: the block stays (the E2E twin of a plan)."""
    return old, {}


class DroppedBlock(nn.Identity):
    """What stands in a dropped block's place (``mode='drop'``): the
    identity, called as the block was (a Swin block's ``block(x,
    hw_shape)`` too), its further arguments ignored."""

    def forward(self, x, *block_args):
        return x


def _drop(old, desc, nbrs, cfg, with_cp):
    """``mode='drop'``: nothing in the block's place."""
    return DroppedBlock(), {}


def _conv_targets(desc: ConvBlock, nbrs, cfg):
    """Each conv with the neighbour convs of its kernel shape."""
    srcs = _conv_sources('interpolate', desc, nbrs, cfg)
    names = [f'conv{j}' for j in range(1, len(srcs) + 1)]
    return list(zip(desc.convs, srcs)), names


def _attn_targets(desc: TransformerBlock, nbrs, cfg):
    """qkv and proj with the neighbours' qkv and proj."""
    per_op = _vit_sources(desc, nbrs, cfg, ('attn', ))['attn']
    return ([(m, [(n, t[i]) for n, t in per_op])
             for i, m in enumerate(desc.attn)], ['qkv', 'proj'])


def _convnext_serves(desc: ConvNeXtBlock, nbr: Optional[ConvNeXtBlock],
                     mode: str) -> bool:
    """Whether neighbour ``nbr`` serves ``desc``'s site: the same width C
    (``synthesize``: the site's operators are C-sized; a neighbour across
    a down-sampling layer has another width and does not serve, spec
    §9.2/§9.3), and for ``interpolate`` equal dw, pw1 and pw2 weight
    shapes."""
    if nbr is None or nbr.dim != desc.dim:
        return False
    if mode != 'interpolate':
        return True
    return all(a.weight.shape == b.weight.shape
               for a, b in zip((desc.dw, desc.pw1, desc.pw2), (nbr.dw, nbr.pw1,
                                                               nbr.pw2)))


def _convnext_sources(mode: str, desc: ConvNeXtBlock, nbrs: dict,
                      cfg: ReplacementConfig, ops: Sequence[str]) -> dict:
    """Per operator of ``ops`` (``'dw'``, ``'pw'``): [(name, neighbour's
    depthwise conv or (pw1, pw2))] that serve it."""
    names = pick_sources(
        _convnext_serves(desc, nbrs['prev'], mode),
        _convnext_serves(desc, nbrs['next'], mode), cfg.neighbors)
    parts = {
        'dw': lambda d: d.dw,
        'pw': lambda d: (d.pw1, d.pw2),
    }
    return {op: [(n, parts[op](nbrs[n])) for n in names] for op in ops}


def _convnext_targets(desc: ConvNeXtBlock, nbrs, cfg):
    """dw, pw1 and pw2 with the neighbours' of equal shapes."""
    names = pick_sources(
        _convnext_serves(desc, nbrs['prev'], 'interpolate'),
        _convnext_serves(desc, nbrs['next'], 'interpolate'), cfg.neighbors)
    return ([(getattr(desc, part), [(n, getattr(nbrs[n], part))
                                    for n in names])
             for part in ('dw', 'pw1', 'pw2')], ['dw', 'pw1', 'pw2'])


_INTERPOLATION_TARGETS = {
    BlockKind.CONV: _conv_targets,
    BlockKind.TRANSFORMER: _attn_targets,
    BlockKind.CONVNEXT: _convnext_targets
}


def _interpolation(desc: BlockDescription, nbrs, cfg):
    """The weights an interpolated block interpolates, as [(own module,
    [(name, neighbour module)])], and its sources by position."""
    targets, names = _INTERPOLATION_TARGETS[desc.kind](desc, nbrs, cfg)
    return targets, {k: _named(s) for k, (_, s) in zip(names, targets)}


def _interpolated(old, desc, nbrs, cfg, with_cp):
    """``mode='interpolate'``: the block, some weights interpolated."""
    # before InterpolatedBlock deletes the block's weights
    factory = block_factory(desc)
    targets, sources = _interpolation(desc, nbrs, cfg)
    return InterpolatedBlock(
        python_float_rates(old), targets, with_cp=with_cp, **factory), sources


def _static_conv_site(desc: ConvBlock, nbrs, cfg):
    srcs = _conv_sources('synthesize', desc, nbrs, cfg)
    site = StaticConvSite([conv_shape(c) for c in desc.convs],
                          fresh_norm(desc.norm),
                          copy.deepcopy(desc.act),
                          residual=cfg.residual,
                          conv_groups=[conv_groups(c) for c in desc.convs],
                          **block_factory(desc))
    return site, {f'conv{j}': _named(s) for j, s in enumerate(srcs, 1)}


def _static_transformer_site(desc: TransformerBlock, nbrs, cfg):
    srcs = _vit_sources(desc, nbrs, cfg, _VIT_OPS[cfg.vit_weights])
    site = StaticTransformerSite(desc.dim, fresh_norm(desc.norm),
                                 copy.deepcopy(desc.act),
                                 **block_factory(desc))
    return site, {op: _named(srcs.get(op, ())) for op in ('attn', 'mlp')}


# vit_weights of a ConvNeXt site: 'attn' reads as D, 'mlp' as M (§9.3)
_CONVNEXT_OPS = {
    'attn+mlp': ('dw', 'pw'),
    'attn': ('dw', ),
    'mlp': ('pw', ),
    'none': ()
}


def _static_convnext_site(desc: ConvNeXtBlock, nbrs, cfg):
    srcs = _convnext_sources('synthesize', desc, nbrs, cfg,
                             _CONVNEXT_OPS[cfg.vit_weights])
    factory = block_factory(desc)
    site = StaticConvNeXtSite(
        desc.dim, channel_layer_norm(desc.norm, desc.dim, **factory),
        copy.deepcopy(desc.act), **factory)
    return site, {op: _named(srcs.get(op, ())) for op in ('dw', 'pw')}


_STATIC_SITES = {
    BlockKind.CONV: _static_conv_site,
    BlockKind.TRANSFORMER: _static_transformer_site,
    BlockKind.CONVNEXT: _static_convnext_site
}


def _static(old, desc, nbrs, cfg, with_cp):
    """``mode='static'``: the static stand-in, built empty (a static
    checkpoint fills it), and the sources its weights were computed from
    (as the ``static_from`` site records them). Of ``static_from=
    'interpolate'``: the original block, into which the interpolated
    weights are loaded."""
    if cfg.static_from == 'interpolate':
        return old, _interpolation(desc, nbrs, cfg)[1]
    return _STATIC_SITES[desc.kind](desc, nbrs, cfg)


def _conv_site(old, desc: ConvBlock, nbrs, cfg, with_cp):
    """``mode='synthesize'`` of a conv block: a :class:`ConvSite`."""
    site = ConvSite([conv_shape(c) for c in desc.convs],
                    _conv_sources('synthesize', desc, nbrs, cfg),
                    fresh_norm(desc.norm),
                    copy.deepcopy(desc.act),
                    residual=cfg.residual,
                    zero_init=cfg.zero_init,
                    scale=cfg.scale,
                    drop_path=_site_drop_path(desc),
                    with_cp=with_cp,
                    recompute=cfg.recompute,
                    conv_groups=[conv_groups(c) for c in desc.convs],
                    **block_factory(desc))
    return site, {f'conv{j}': s for j, s in enumerate(site.sources, 1)}


def _transformer_site(old, desc: TransformerBlock, nbrs, cfg, with_cp):
    """``mode='synthesize'`` of an encoder layer: a
    :class:`TransformerSite`."""
    site = TransformerSite(
        desc.dim,
        _vit_sources(desc, nbrs, cfg, _VIT_OPS[cfg.vit_weights]),
        fresh_norm(desc.norm),
        copy.deepcopy(desc.act),
        num_scalars=cfg.num_scalars,
        zero_init=cfg.zero_init,
        scale=cfg.scale,
        drop_path=_site_drop_path(desc),
        with_cp=with_cp,
        recompute=cfg.recompute,
        **block_factory(desc))
    return site, site.sources


def _convnext_site(old, desc: ConvNeXtBlock, nbrs, cfg, with_cp):
    """``mode='synthesize'`` of a ConvNeXt block: a
    :class:`ConvNeXtSite`."""
    factory = block_factory(desc)
    site = ConvNeXtSite(
        desc.dim,
        _convnext_sources('synthesize', desc, nbrs, cfg,
                          _CONVNEXT_OPS[cfg.vit_weights]),
        channel_layer_norm(desc.norm, desc.dim, **factory),
        copy.deepcopy(desc.act),
        num_scalars=cfg.num_scalars,
        zero_init=cfg.zero_init,
        scale=cfg.scale,
        drop_path=_site_drop_path(desc),
        with_cp=with_cp,
        recompute=cfg.recompute,
        **factory)
    return site, site.sources


#: mode -> block kind -> builder (see above). What differs by kind below
#: the mode is in ``_INTERPOLATION_TARGETS`` and ``_STATIC_SITES``.
BUILDERS: Dict[str, Dict[BlockKind, Callable]] = {
    'none': dict.fromkeys(BlockKind, _keep),
    'drop': dict.fromkeys(BlockKind, _drop),
    'static': dict.fromkeys(BlockKind, _static),
    'interpolate': dict.fromkeys(BlockKind, _interpolated),
    'synthesize': {
        BlockKind.CONV: _conv_site,
        BlockKind.TRANSFORMER: _transformer_site,
        BlockKind.CONVNEXT: _convnext_site
    },
}

_DESCRIPTIONS = {
    BlockKind.CONV: ConvBlock,
    BlockKind.TRANSFORMER: TransformerBlock,
    BlockKind.CONVNEXT: ConvNeXtBlock
}


def _params_by_id(module: nn.Module) -> Dict[int, nn.Parameter]:
    """id -> parameter. Holding the parameters keeps their ids from being
    reused by new ones while the site is built."""
    return {id(p): p for p in module.parameters()}


def replace_blocks(slots: Sequence[BlockSlot],
                   options: Optional[dict],
                   kind: str,
                   describe: Callable[[nn.Module], BlockDescription],
                   with_cp: bool = False) -> ReplacementPlan:
    """Plan the sites of ``slots`` and put computing layers in their place.

    Args:
        slots (Sequence[BlockSlot]): Every residual block, forward order.
        options (dict | ReplacementConfig | None): ``replacement=dict(...)``.
        kind (str | BlockKind): ``'conv'`` (BasicBlock/Bottleneck),
            ``'transformer'`` or ``'convnext'``.
        describe (Callable): Block -> its description: a
            :class:`ConvBlock` for ``'conv'``, a :class:`TransformerBlock`
            for ``'transformer'``, a :class:`ConvNeXtBlock` for
            ``'convnext'``.
        with_cp (bool): Checkpoint every block non-reentrantly (spec §8):
            sites and, when they checkpoint, kept blocks.

    Returns:
        ReplacementPlan: The record of what was done.
    """
    try:
        kind = BlockKind(kind)
    except ValueError:
        raise ValueError(f'kind must be one of '
                         f'{[k.value for k in BlockKind]}, got '
                         f'{kind!r}') from None
    cfg = ReplacementConfig.from_dict(options)
    n = len(slots)
    indices, notes = select_sites([s.replaceable for s in slots], cfg)
    blocks = [s.parent[s.key] for s in slots]
    descs = [describe(b) for b in blocks]
    for i, desc in enumerate(descs, 1):
        if not isinstance(desc, _DESCRIPTIONS[kind]):
            raise TypeError(f'describe returned a {type(desc).__name__} for '
                            f'block {i}; kind={kind.value!r} needs a '
                            f'{_DESCRIPTIONS[kind].__name__}')
    build = BUILDERS[cfg.mode][kind]
    built: List[Tuple[BlockSlot, nn.Module]] = []
    records = []
    for i in indices:
        slot, old = slots[i - 1], blocks[i - 1]
        prev, nxt = nearest_kept(i, n, indices)
        nbrs = {
            'prev': descs[prev - 1] if prev else None,
            'next': descs[nxt - 1] if nxt else None
        }
        before = _params_by_id(old)
        new, sources = build(old, descs[i - 1], nbrs, cfg, with_cp)
        after = _params_by_id(new)
        records.append(
            SiteRecord(
                index=i,
                stage=slot.stage,
                block=slot.block,
                prev=prev,
                next=nxt,
                sources=sources,
                removed_params=sum(p.numel() for k, p in before.items()
                                   if k not in after),
                added_params=sum(p.numel() for k, p in after.items()
                                 if k not in before)))
        built.append((slot, new))
    # Edit only after every site is built: builders read original blocks.
    for slot, new in built:
        slot.parent[slot.key] = new
    if with_cp:
        for slot in slots:
            block = slot.parent[slot.key]
            if not isinstance(block, SITE_TYPES + (nn.Identity, )):
                block.with_cp = True
                use_non_reentrant_checkpoint(python_float_rates(block))
        if cfg.mode in ('synthesize', 'interpolate'):
            _fuse_sites(slots, indices)
    return ReplacementPlan(cfg, n, records, notes)


def _fuse_sites(slots: Sequence[BlockSlot], indices: Sequence[int]):
    """Under ``with_cp``, run each site inside the checkpoint segment of
    the kept block before it (with any sites in between), so the segment
    keeps only its input: a site checkpointed on its own would keep its
    input too and save nothing over the block it replaced. A site with no
    kept block before it in its container, or whose chain passes a tapped
    output, keeps its own checkpoint."""
    for i in indices:
        site = slots[i - 1]
        j = i - 1  # walk back over adjacent sites to the kept block
        while j in indices:
            j -= 1
        chain = slots[j - 1:i - 1] if j >= 1 else []
        if chain and all(
                s.parent is site.parent and not s.tap for s in chain) and \
                chain[0].key == site.key - len(chain):
            fuse_into_segment(chain[0].parent[chain[0].key],
                              site.parent[site.key])
