"""What every RepL backbone shares: surgery at build time, the plan in the
checkpoint, and train-mode rules for the sites' fresh norms (spec §3, §6).

Imports mmengine only (for logging), never a task codebase.
"""
import json
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.logging import print_log
from torch import nn

from ..core import (SITE_TYPES, BlockKind, BlockSlot, ConvBlock, ConvNeXtSite,
                    ConvSite, InterpolatedBlock, ReplacementPlan,
                    TransformerBlock, TransformerSite, replace_blocks)

PLAN_KEY = 'replacement_plan'


def encode_plan(plan: ReplacementPlan) -> torch.Tensor:
    """The plan as a uint8 tensor of JSON, so checkpoint writers that expect
    tensors (``weights_to_cpu``, EMA) handle it like any buffer."""
    data = json.dumps(plan.to_dict(), sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_plan(tensor) -> dict:
    if isinstance(tensor, dict):
        return tensor
    return json.loads(bytes(tensor.tolist()).decode())


class RepLBackboneMixin:
    """Mixin placed before the upstream backbone class.

    Subclasses define :meth:`block_slots` (every residual block, forward
    order: the one enumeration of a backbone's blocks) and
    :meth:`setup_replacement`, which calls :meth:`_replace` with those
    slots, a kind and a ``describe`` function (see
    :func:`repl_mm.core.replace_blocks`); they call it at the end of
    ``__init__``, and define :meth:`_block_frozen`. Because everything RepL
    adds happens in ``setup_replacement``, an already built upstream
    backbone becomes the RepL one by changing its class and calling it
    (:func:`to_repl_backbone`, used by ``ReplacementHook``): one surgery
    for both routes.
    """

    replacement_plan: ReplacementPlan

    @classmethod
    def upstream_class(cls) -> type:
        """The upstream backbone class this one extends."""
        return cls.__bases__[-1]

    def block_slots(self) -> List[BlockSlot]:
        """Every residual block of this backbone, forward order, numbered
        as its plan numbers them. Also valid after the surgery (a site
        stands in its block's slot) and on an instance of the upstream
        class (``cls.block_slots(upstream_backbone)``: see
        :func:`block_slots`)."""
        raise NotImplementedError

    def setup_replacement(self, replacement) -> ReplacementPlan:
        """Plan and replace the sites of this (built) backbone."""
        raise NotImplementedError

    def _replace(self, slots: Sequence[BlockSlot], replacement,
                 kind: BlockKind, describe, with_cp: bool) -> ReplacementPlan:
        names = {id(m): n for n, m in self.named_modules()}
        prefixes = [names[id(s.parent[s.key])] + '.' for s in slots]
        plan = replace_blocks(slots, replacement, kind, describe, with_cp)
        self.replacement_plan = plan
        self._site_prefixes: Dict[int, str] = {
            s.index: prefixes[s.index - 1]
            for s in plan.sites
        }
        print_log(f'{type(self).__name__}:\n{plan}', logger='current')
        self._check_frozen_sites()
        return plan

    def _block_frozen(self, index: int) -> bool:
        """Whether block ``index`` (1-based, forward order) lies in the
        frozen part (``frozen_stages``). Defined by subclasses."""
        raise NotImplementedError

    def _site_frozen(self, index: int) -> bool:
        """Whether site ``index`` lies in a frozen stage."""
        return self._block_frozen(index)

    def _check_frozen_sites(self):
        """Refuse a site in the frozen part that draws from a block that
        trains (spec §3).

        Such a site would compute from weights that change as they train,
        and pass gradient to them: the frozen part would not be frozen.
        A site whose neighbours are frozen too is frozen with them.
        """
        plan = self.replacement_plan
        if plan.mode not in ('synthesize', 'interpolate'):
            return  # no site reads a neighbour
        for site in plan.sites:
            if not self._block_frozen(site.index):
                continue
            used = {n for names in site.sources.values() for n in names}
            for side in ('prev', 'next'):
                block = getattr(site, side)
                if side in used and not self._block_frozen(block):
                    raise ValueError(
                        f'{type(self).__name__}: site {site.index} lies in '
                        f'the frozen part (frozen_stages='
                        f'{self.frozen_stages}) but is drawn from block '
                        f'{block}, its {side} neighbour, which trains: the '
                        'frozen site would change as that block trains and '
                        'pass it gradient. Freeze that block too, leave '
                        f'site {site.index} out of frozen_stages, or draw it '
                        'from frozen neighbours only (e.g. replacement='
                        "dict(neighbors='prev'))")

    def site_modules(self) -> Dict[int, nn.Module]:
        """Site index -> the module that stands in for the block."""
        mods = dict(self.named_modules())
        return {
            i: mods[p[:-1]]
            for i, p in self._site_prefixes.items() if p[:-1] in mods
        }

    def init_weights(self):
        """Upstream ``init_weights``, then each site's own initialisation.

        The backbone's generic initialisers (e.g. mmpretrain's
        ``Constant(1)`` on every ``_BatchNorm``) also reach a site's fresh
        norm, and upstream's recursion never reaches sites held in a plain
        ``nn.Sequential``: so the sites (phi = alpha = beta = 0.5, norm gamma
        0 with ``zero_init``; a static site's zero weights) are initialised
        after upstream's. Only modules RepL built are
        (:data:`repl_mm.core.SITE_TYPES`), never an original block: in
        ``mode='none'`` the model is upstream's, draw for draw (a site is
        the block itself, and a static site of ``static_from=
        'interpolate'`` is a plain block). An ``InterpolatedBlock``
        initialises its block as upstream's recursion would have (when it
        reaches it): here only its alpha and beta are reset. With a
        ``Pretrained`` init_cfg (an upstream E2E or a RepL checkpoint) the
        generic initialisers do not run and the sites keep what they were built
        with or what the checkpoint holds. Runs once, like upstream's.
        """
        first = not getattr(self, '_is_init', False)
        super().init_weights()
        cfgs = self.init_cfg if isinstance(self.init_cfg,
                                           list) else [self.init_cfg]
        pretrained = any(c and c.get('type') == 'Pretrained' for c in cfgs)
        if first and not pretrained:
            for m in self.site_modules().values():
                if isinstance(m, InterpolatedBlock):
                    m.reset_scalars()
                elif isinstance(m, SITE_TYPES):
                    m.init_weights()

    def train(self, mode: bool = True):
        """Upstream ``train`` (frozen stages, ``norm_eval``), then the
        sites' fresh norms train anyway unless their stage is frozen: a
        site norm held at its initial statistics would never learn."""
        super().train(mode)
        if mode:
            for i, m in self.site_modules().items():
                if isinstance(m, (ConvSite, TransformerSite,
                                  ConvNeXtSite)) and \
                        not self._site_frozen(i):
                    m.site_norm.train(True)
        return self

    # -- checkpoints (spec §6) -------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.replacement_plan.mode != 'none':  # E2E keys stay upstream's
            destination[prefix + PLAN_KEY] = encode_plan(self.replacement_plan)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        """Compare the checkpoint's recorded plan with this model's
        (:meth:`ReplacementPlan.compare`): a difference raises a
        ``ValueError`` listing them all; an option that loads but differs
        (``scale``) is logged as a warning. A checkpoint without a plan is
        an end-to-end one (spec §6)."""
        import logging  # local: only this method is edited here

        key = prefix + PLAN_KEY
        mode = self.replacement_plan.mode
        if key in state_dict:
            theirs = decode_plan(state_dict.pop(key))
            diff, warnings = self.replacement_plan.compare(theirs)
            if diff:
                their_mode = theirs.get('config', {}).get('mode')
                hint = ''
                if 'static' in (mode, their_mode) and mode != their_mode:
                    hint = ("\n  a mode='static' checkpoint loads only into "
                            "a mode='static' model (the config that "
                            'tools/model_converters/repl_to_static.py '
                            'writes beside it), and a static model only '
                            'from such a checkpoint')
                raise ValueError(
                    'checkpoint was saved with another RepL plan (indices '
                    f"{theirs.get('indices')}, mode {their_mode!r}) than "
                    'this model (indices '
                    f'{list(self.replacement_plan.indices)}, mode '
                    f'{mode!r}):\n  ' + '\n  '.join(diff) + hint)
            for warning in warnings:
                print_log(
                    f'{type(self).__name__}: the checkpoint was saved with '
                    f'another RepL option, {warning}',
                    logger='current',
                    level=logging.WARNING)
        elif mode == 'static':
            raise ValueError(
                "a mode='static' model loads only a static checkpoint "
                '(written by tools/model_converters/repl_to_static.py), but '
                f'this one has no RepL plan under {key!r}: it is an '
                'end-to-end checkpoint, whose replaced blocks hold no '
                'static weights')
        elif mode != 'none':
            self._report_e2e_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _report_e2e_keys(self, state_dict, prefix: str) -> List[str]:
        """An E2E checkpoint (no plan): kept blocks load as usual; log the
        keys of the replaced blocks, which the RepL model does not use.

        An ``interpolate`` site is the replaced block with some weights
        interpolated: its other parameters (norms, a conv no neighbour
        serves, the ViT MLP and LNs) load from the replaced block's keys
        (:meth:`InterpolatedBlock.adopt_block_state`), and the keys of the
        interpolated weights are consumed unused, so an E2E checkpoint
        loads into an ``interpolate`` model strictly."""
        sites = self.site_modules()
        unused = []
        for i, p in self._site_prefixes.items():
            if isinstance(sites.get(i), InterpolatedBlock):
                unused += sites[i].adopt_block_state(state_dict, prefix + p)
        own = set(self.state_dict().keys())
        unused += [
            k for k in state_dict if k.startswith(prefix) and any(
                k[len(prefix):].startswith(p)
                for p in self._site_prefixes.values())
            and k[len(prefix):] not in own
        ]
        if unused:
            print_log(
                'loading a checkpoint without a RepL plan (an end-to-end '
                'one): kept blocks load; the replaced blocks '
                f'{list(self.replacement_plan.indices)} leave '
                f'{len(unused)} keys unused: {unused}',
                logger='current')
        return unused


def describe_resnet_block(block: nn.Module) -> ConvBlock:
    """BasicBlock / Bottleneck of mmdet, mmseg and mmpretrain alike
    (ResNet, ResNetV1c/V1d, ResNeXt, CIFAR ResNets).

    A site's chain stands for the block's convs alone: a DCN's offsets
    (``dcn=...``) and the modules ``plugins=[...]`` insert between the
    convs (mmdet, mmseg) have no pointwise counterpart, so such a block
    is refused with a ``ValueError`` naming the option, in every mode
    (the plan is mode-independent, spec §1). A grouped conv (ResNeXt's
    3x3, or a grouped 1x1) is supported (spec §9.1).
    """
    for option, flag in (('dcn', 'with_dcn'), ('plugins', 'with_plugins')):
        if getattr(block, flag, False):
            raise ValueError(
                f'RepL does not support {type(block).__name__} blocks with '
                f'{option}={getattr(block, option, None)!r}: a site has no '
                f'counterpart of them; build the backbone with '
                f'{option}=None')
    convs = [block.conv1, block.conv2]
    last_norm = block.norm2
    if hasattr(block, 'conv3'):
        convs.append(block.conv3)
        last_norm = block.norm3
    return ConvBlock(
        convs=convs,
        norm=last_norm,
        act=block.relu,
        drop_path=getattr(block, 'drop_path', None))


class RepLResNetMixin(RepLBackboneMixin):
    """The ResNet families of all three codebases: ``res_layers`` of
    ``ResLayer`` sequences; a block is replaceable iff it has no
    ``downsample`` (identity shortcut: stride 1, same channels); blocks
    are described by :func:`describe_resnet_block`."""

    def block_slots(self) -> List[BlockSlot]:
        slots = []
        for stage, name in enumerate(self.res_layers, 1):
            layer = getattr(self, name)
            for b in range(len(layer)):
                # a site (after the surgery) has no shortcut: replaceable
                shortcut = getattr(layer[b], 'downsample', None)
                slots.append(
                    BlockSlot(layer, b, stage, b + 1, shortcut is None))
        return slots

    def setup_replacement(self, replacement) -> ReplacementPlan:
        plan = self._replace(self.block_slots(), replacement, BlockKind.CONV,
                             describe_resnet_block, self.with_cp)
        self._freeze_stages()  # sites in frozen stages freeze with them
        return plan

    def _block_frozen(self, index: int) -> bool:
        end = 0
        for stage, name in enumerate(self.res_layers, 1):
            end += len(getattr(self, name))
            if index <= end:
                return stage <= self.frozen_stages
        raise IndexError(f'block {index} of {end}')


def describe_swin_block(block: nn.Module) -> TransformerBlock:
    """A ``SwinBlock`` of mmdet, mmseg or mmpretrain (spec §9.2).

    qkv and proj are the window attention's (``attn.w_msa``), fc1 and fc2
    the FFN's; the site's norm is a fresh copy of ``norm1`` (a LayerNorm of
    the block's width), its activation the FFN's (GELU upstream), its drop
    path the block's. Windows, shifts, the relative position bias and
    masks have no weight-space analogue and are not read. A layer scale
    of the FFN (mmpretrain's ``ffn_cfgs=dict(layer_scale_init_value=...)``)
    is not synthesized either: the site's own norm sets its scale, as for
    ViT layers.

    Raises:
        ValueError: If the FFN is not the 2-fc one (``num_fcs=2``: fc1,
            act, fc2) or the attention's linears are not (C -> 3C) and
            (C -> C).
    """
    ffn, msa = block.ffn, block.attn.w_msa
    if getattr(ffn, 'num_fcs', None) != 2 or not hasattr(ffn, 'layers'):
        raise ValueError("RepL's Swin computing layer needs the FFN with "
                         'num_fcs=2 (fc1, act, fc2); got '
                         f"{type(ffn).__name__} with num_fcs="
                         f"{getattr(ffn, 'num_fcs', None)}")
    qkv, proj = msa.qkv, msa.proj
    dim = qkv.weight.shape[1]
    if tuple(qkv.weight.shape) != (3 * dim, dim) or \
            tuple(proj.weight.shape) != (dim, dim):
        raise ValueError(
            "RepL's Swin computing layer needs qkv (C -> 3C) and proj "
            f'(C -> C); got qkv {tuple(qkv.weight.shape)} and proj '
            f'{tuple(proj.weight.shape)}')
    fc1, act = ffn.layers[0][0], ffn.layers[0][1]
    return TransformerBlock(
        dim=dim,
        attn=(qkv, proj),
        mlp=(fc1, ffn.layers[1]),
        norm=block.norm1,
        act=act,
        drop_path=ffn.dropout_layer)


class RepLSwinMixin(RepLBackboneMixin):
    """The Swin Transformers of all three codebases: ``stages`` of
    ``SwinBlockSequence``, each with ``blocks`` called as ``block(x,
    hw_shape)`` (spec §9.2).

    Blocks are numbered over all stages (Swin-T: 12); every block
    preserves shape (patch merging sits between stages, outside the
    blocks), so every one is replaceable. A site's neighbour across a
    patch merging has another width and does not serve it (the site draws
    from the other side only, or owns its operators). ``with_cp`` is read
    off the built blocks (upstream passes one value to all of them), so
    the hook route sees it too; under RepL every checkpointed block
    checkpoints non-reentrantly (spec §8).

    Subclasses set :attr:`frozen_offset`: the number of stages
    ``frozen_stages=0`` freezes upstream (mmdet and mmseg: none, only the
    patch embedding; mmpretrain: the first stage as well).
    """

    #: stages frozen by ``frozen_stages=0``: block ``i`` is frozen iff its
    #: stage is ``<= frozen_stages + frozen_offset``.
    frozen_offset = 0

    def block_slots(self) -> List[BlockSlot]:
        return [
            BlockSlot(stage.blocks, b, s, b + 1, True)
            for s, stage in enumerate(self.stages, 1)
            for b in range(len(stage.blocks))
        ]

    def setup_replacement(self, replacement) -> ReplacementPlan:
        """Plan and replace; upstream freezes ``frozen_stages`` in
        ``train()`` (not at build time), and sites in a frozen stage freeze
        with it there."""
        slots = self.block_slots()
        with_cp = any(
            getattr(s.parent[s.key], 'with_cp', False) for s in slots)
        return self._replace(slots, replacement, BlockKind.TRANSFORMER,
                             describe_swin_block, with_cp)

    def _block_frozen(self, index: int) -> bool:
        end = 0
        for stage, seq in enumerate(self.stages, 1):
            end += len(seq.blocks)
            if index <= end:
                return stage <= self.frozen_stages + self.frozen_offset
        raise IndexError(f'block {index} of {end}')


def repl_classes() -> List[type]:
    """Every RepL backbone class defined so far (registered adapters)."""
    out, todo = [], [RepLBackboneMixin]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if issubclass(sub, nn.Module):
                out.append(sub)
    return out


def adapter_class(backbone: nn.Module) -> Optional[type]:
    """The RepL class of ``backbone``: its own class if it is a RepL
    backbone, else the RepL class that extends exactly its upstream class,
    else None."""
    if isinstance(backbone, RepLBackboneMixin):
        return type(backbone)
    return {c.upstream_class(): c for c in repl_classes()}.get(type(backbone))


def sequential_slots(layers: nn.ModuleList, taps=()) -> List[BlockSlot]:
    """One stage of blocks ``layers[0], layers[1], ...``, every one
    replaceable (shape-preserving: a ViT's encoder layers); ``taps``: the
    0-based positions whose output is read outside ``layers``."""
    return [
        BlockSlot(layers, i, 1, i + 1, True, tap=i in taps)
        for i in range(len(layers))
    ]


def block_slots(backbone: nn.Module) -> List[BlockSlot]:
    """Every residual block of ``backbone`` as the surgery numbers them:
    forward order, 1-based like the plan.

    A RepL backbone, or an upstream one a RepL backbone extends, is
    enumerated by its adapter (:meth:`RepLBackboneMixin.block_slots`). Any
    other module by the same enumerations, chosen by structure:
    ``res_layers`` (:class:`RepLResNetMixin`'s), else a ``layers``
    ``ModuleList`` (:func:`sequential_slots`).

    Raises:
        ValueError: If ``backbone`` has neither.

    Example:
        >>> from repl_mm.models.cls_resnet import RepLResNet_CIFAR
        >>> slots = block_slots(RepLResNet_CIFAR(depth=20))
        >>> len(slots), [s.block for s in slots if not s.replaceable]
        (9, [1, 1])
    """
    cls = adapter_class(backbone)
    if cls is not None:
        return cls.block_slots(backbone)
    if hasattr(backbone, 'res_layers'):
        return RepLResNetMixin.block_slots(backbone)
    if isinstance(getattr(backbone, 'layers', None), nn.ModuleList):
        return sequential_slots(backbone.layers)
    raise ValueError(f'{type(backbone).__name__} has neither res_layers '
                     '(ResNet) nor layers (ViT): no residual blocks known')


def to_repl_backbone(backbone: nn.Module, replacement) -> ReplacementPlan:
    """Turn a built upstream backbone into its RepL twin, in place.

    The result equals building the RepL class with the same keyword
    arguments: same parameter names and shapes, same plan.

    Args:
        backbone (nn.Module): An instance of exactly an upstream class that
            a RepL backbone extends (mmdet ``ResNet``, mmseg ``ResNetV1c``,
            mmpretrain ``ResNet``, ``ResNet_CIFAR``, ``VisionTransformer``,
            the three codebases' ``SwinTransformer``).
        replacement (dict): The ``replacement=dict(...)`` options.

    Returns:
        ReplacementPlan: The backbone's plan.
    """
    if isinstance(backbone, RepLBackboneMixin):
        raise ValueError(f'{type(backbone).__name__} is already a RepL '
                         'backbone: use either the RepL backbone in the '
                         'config or ReplacementHook, not both')
    cls = adapter_class(backbone)
    if cls is None:
        known = sorted({
            f'{c.upstream_class().__module__}.{c.upstream_class().__name__}'
            for c in repl_classes()
        })
        raise ValueError(
            f'no RepL backbone extends {type(backbone).__module__}.'
            f'{type(backbone).__name__}; supported upstream backbones: '
            f'{known}')
    backbone.__class__ = cls
    return backbone.setup_replacement(replacement)


__all__ = [
    'SITE_TYPES', 'RepLBackboneMixin', 'RepLResNetMixin', 'RepLSwinMixin',
    'adapter_class', 'block_slots', 'describe_resnet_block',
    'describe_swin_block', 'encode_plan', 'decode_plan', 'repl_classes',
    'sequential_slots', 'to_repl_backbone'
]
