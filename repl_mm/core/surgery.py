"""Apply a replacement plan to a backbone's blocks: the one place that edits
a model (spec §1-§3). Backbones (and, later, the hook) call
:func:`replace_blocks`; it never learns which codebase a block came from:
the adapter hands it block slots and a ``describe`` function.

Every tensor a site creates is created on the device and in the dtype of
the block it replaces (its first conv or qkv weight), whenever surgery
runs (spec §8): the hook route edits a model mmengine has already moved.
"""
import copy
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .cnn_site import ConvSite
from .device import weight_factory
from .interpolate import InterpolatedBlock
from .plan import (ReplacementConfig, ReplacementPlan, SiteRecord,
                   nearest_kept, select_sites)
from .recompute import fuse_into_segment, use_non_reentrant_checkpoint
from .static import StaticConvSite, StaticTransformerSite
from .vit_site import TransformerSite


@dataclass
class BlockSlot:
    """Where block ``stage``.``block`` (1-based) lives: ``parent[key]``.

    ``tap`` marks a block whose output is read outside its container's
    sequence (a ViT ``out_indices`` layer); the last block of a container
    needs no mark.
    """

    parent: Any
    key: int
    stage: int
    block: int
    replaceable: bool
    tap: bool = False


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


def _conv_sources(mode, site_desc, nbrs, cfg):
    """Per conv position: [(name, neighbour conv)] that can serve it."""
    out = []
    for j, conv in enumerate(site_desc['convs']):
        shape = tuple(conv.weight.shape)

        def serves(desc):
            if desc is None or j >= len(desc['convs']):
                return False
            w = desc['convs'][j].weight.shape
            # synthesize needs (Cout, Cin); interpolate the whole kernel.
            return tuple(w) == shape if mode == 'interpolate' else \
                tuple(w[:2]) == shape[:2]

        names = pick_sources(
            serves(nbrs['prev']), serves(nbrs['next']), cfg.neighbors)
        out.append([(n, nbrs[n]['convs'][j]) for n in names])
    return out


def _vit_sources(nbrs, cfg, ops):
    names = pick_sources(nbrs['prev'] is not None, nbrs['next'] is not None,
                         cfg.neighbors)
    return {op: [(n, nbrs[n][op]) for n in names] for op in ops}


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


def block_factory(kind: str, desc: dict) -> dict:
    """``dict(device=..., dtype=...)`` of the block ``desc`` describes: of
    its first conv weight (``'conv'``) or its qkv weight
    (``'transformer'``). Every tensor its site creates takes them."""
    lin = desc['convs'][0] if kind == 'conv' else desc['attn'][0]
    return weight_factory(lin.weight)


def _build_static(kind, old, desc, nbrs, cfg):
    """The static stand-in of block ``old`` (``mode='static'``) and the
    sources its weights were computed from (as the ``static_from`` site
    records them). Built empty: a static checkpoint fills it."""
    if cfg.static_from == 'interpolate':
        # The original block: the interpolated weights are loaded into it.
        if kind == 'conv':
            srcs = _conv_sources('interpolate', desc, nbrs, cfg)
            return old, {f'conv{j}': _named(s) for j, s in enumerate(srcs, 1)}
        names = _named(_vit_sources(nbrs, cfg, ('attn', ))['attn'])
        return old, {'qkv': names, 'proj': names}
    if kind == 'conv':
        srcs = _conv_sources('synthesize', desc, nbrs, cfg)
        site = StaticConvSite(
            [tuple(c.weight.shape[:2]) for c in desc['convs']],
            fresh_norm(desc['norm']),
            copy.deepcopy(desc['act']),
            residual=cfg.residual,
            **block_factory(kind, desc))
        return site, {f'conv{j}': _named(s) for j, s in enumerate(srcs, 1)}
    srcs = _vit_sources(nbrs, cfg, _VIT_OPS[cfg.vit_weights])
    site = StaticTransformerSite(desc['dim'], fresh_norm(desc['norm']),
                                 copy.deepcopy(desc['act']),
                                 **block_factory(kind, desc))
    return site, {op: _named(srcs.get(op, ())) for op in ('attn', 'mlp')}


def _build_site(kind, old, desc, nbrs, cfg, with_cp):
    """The module that takes block ``old``'s place, and its sources."""
    drop_path = copy.deepcopy(desc.get('drop_path'))
    if isinstance(getattr(drop_path, 'drop_prob', None), numbers.Real):
        # Upstream rates come from np.linspace: a numpy float, on which
        # torch.compile breaks the graph (mmcv's drop_path branches on it).
        # The same rate as a Python float keeps the site in one graph.
        drop_path.drop_prob = float(drop_path.drop_prob)
    if cfg.mode == 'drop':
        return nn.Identity(), {}
    if cfg.mode == 'static':
        return _build_static(kind, old, desc, nbrs, cfg)
    # before InterpolatedBlock deletes the block's weights
    factory = block_factory(kind, desc)
    if cfg.mode == 'interpolate':
        if kind == 'conv':
            srcs = _conv_sources('interpolate', desc, nbrs, cfg)
            targets = list(zip(desc['convs'], srcs))
            names = [f'conv{j}' for j in range(1, len(srcs) + 1)]
        else:
            per_op = _vit_sources(nbrs, cfg, ('attn', ))['attn']
            targets = [(m, [(n, t[i]) for n, t in per_op])
                       for i, m in enumerate(desc['attn'])]
            names = ['qkv', 'proj']
        site = InterpolatedBlock(old, targets, with_cp=with_cp, **factory)
        return site, {
            k: tuple(n for n, _ in s) or ('own', )
            for k, (_, s) in zip(names, targets)
        }
    if kind == 'conv':
        srcs = _conv_sources('synthesize', desc, nbrs, cfg)
        shapes = [tuple(c.weight.shape[:2]) for c in desc['convs']]
        site = ConvSite(
            shapes,
            srcs,
            fresh_norm(desc['norm']),
            copy.deepcopy(desc['act']),
            residual=cfg.residual,
            zero_init=cfg.zero_init,
            scale=cfg.scale,
            drop_path=drop_path,
            with_cp=with_cp,
            recompute=cfg.recompute,
            **factory)
        return site, {f'conv{j}': s for j, s in enumerate(site.sources, 1)}
    site = TransformerSite(
        desc['dim'],
        _vit_sources(nbrs, cfg, _VIT_OPS[cfg.vit_weights]),
        fresh_norm(desc['norm']),
        copy.deepcopy(desc['act']),
        num_scalars=cfg.num_scalars,
        zero_init=cfg.zero_init,
        scale=cfg.scale,
        drop_path=drop_path,
        with_cp=with_cp,
        recompute=cfg.recompute,
        **factory)
    return site, site.sources


def _params_by_id(module: nn.Module) -> Dict[int, nn.Parameter]:
    """id -> parameter. Holding the parameters keeps their ids from being
    reused by new ones while the site is built."""
    return {id(p): p for p in module.parameters()}


def replace_blocks(slots: Sequence[BlockSlot],
                   options: Optional[dict],
                   kind: str,
                   describe: Callable[[nn.Module], dict],
                   with_cp: bool = False) -> ReplacementPlan:
    """Plan the sites of ``slots`` and put computing layers in their place.

    Args:
        slots (Sequence[BlockSlot]): Every residual block, forward order.
        options (dict | ReplacementConfig | None): ``replacement=dict(...)``.
        kind (str): ``'conv'`` (BasicBlock/Bottleneck) or ``'transformer'``.
        describe (Callable): Block -> dict. For ``'conv'``: ``convs`` (the
            block's convs in order), ``norm`` (its last norm, cloned fresh
            for the site), ``act``, optional ``drop_path``. For
            ``'transformer'``: ``dim``, ``attn`` ((qkv, proj) linears),
            ``mlp`` ((fc1, fc2) linears), ``norm`` (a LayerNorm of width
            d, cloned fresh), ``act``, optional ``drop_path``.
        with_cp (bool): Checkpoint every block non-reentrantly (spec §8):
            sites and, when they checkpoint, kept blocks.

    Returns:
        ReplacementPlan: The record of what was done.
    """
    if kind not in ('conv', 'transformer'):
        raise ValueError(f"kind must be 'conv' or 'transformer', got {kind!r}")
    cfg = ReplacementConfig.from_dict(options)
    n = len(slots)
    indices, notes = select_sites([s.replaceable for s in slots], cfg)
    blocks = [s.parent[s.key] for s in slots]
    descs = [describe(b) for b in blocks]
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
        if cfg.mode == 'none':
            new, sources = old, {}
        else:
            new, sources = _build_site(kind, old, descs[i - 1], nbrs, cfg,
                                       with_cp)
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
            if not isinstance(block, _SITES + (nn.Identity, )):
                block.with_cp = True
                use_non_reentrant_checkpoint(block)
        if cfg.mode in ('synthesize', 'interpolate'):
            _fuse_sites(slots, indices)
    return ReplacementPlan(cfg, n, records, notes)


_SITES = (ConvSite, TransformerSite, InterpolatedBlock, StaticConvSite,
          StaticTransformerSite)


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
