"""What an adapter hands the core: where each block lives
(:class:`BlockSlot`) and what the surgery reads off a block
(:class:`ConvBlock`, :class:`TransformerBlock`, :class:`ConvNeXtBlock`),
typed.

An adapter (``repl_mm/models/``) enumerates its blocks as slots and
describes each block by one of the two description types; the surgery
(:func:`repl_mm.core.replace_blocks`) never sees an upstream class.
Torch-free (torch types in annotations only), so the torch-free plan can
name the kinds.
"""
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from torch import nn


class BlockKind(enum.StrEnum):
    """The kinds of residual block RepL replaces. The values are the
    strings ``replace_blocks`` has always taken (``kind='conv'``): a kind
    is its string (``BlockKind.CONV == 'conv'``, ``str``, JSON)."""

    CONV = 'conv'  # BasicBlock / Bottleneck
    TRANSFORMER = 'transformer'  # ViT encoder layer
    CONVNEXT = 'convnext'  # ConvNeXt block (depthwise conv + pointwise MLP)


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


@dataclass(kw_only=True)
class BlockDescription:
    """The parts of a block that every site kind reads.

    Args:
        norm (nn.Module): The norm a site clones fresh (never shared).
        act (nn.Module): The block's activation (copied).
        drop_path (nn.Module, optional): The block's stochastic depth,
            copied into the site. Defaults to None.
    """

    kind: ClassVar[BlockKind]
    norm: 'nn.Module'
    act: 'nn.Module'
    drop_path: Optional['nn.Module'] = None


@dataclass(kw_only=True)
class ConvBlock(BlockDescription):
    """A BasicBlock / Bottleneck (also with a grouped conv: ResNeXt).

    Args:
        convs (Sequence[nn.Conv2d]): The block's convs, forward order; the
            surgery reads each one's ``groups`` (spec §9.1).
        norm (nn.Module): Its last norm (cloned fresh for the site).
    """

    kind: ClassVar[BlockKind] = BlockKind.CONV
    convs: Sequence['nn.Module']


@dataclass(kw_only=True)
class TransformerBlock(BlockDescription):
    """A ViT encoder layer.

    Args:
        dim (int): The embedding width d.
        attn (tuple[nn.Linear, nn.Linear]): (qkv, proj).
        mlp (tuple[nn.Linear, nn.Linear]): (fc1, fc2).
        norm (nn.Module): A LayerNorm of width d (cloned fresh).
    """

    kind: ClassVar[BlockKind] = BlockKind.TRANSFORMER
    dim: int
    attn: Tuple['nn.Module', 'nn.Module']
    mlp: Tuple['nn.Module', 'nn.Module']


@dataclass(kw_only=True)
class ConvNeXtBlock(BlockDescription):
    """A ConvNeXt block: h + drop_path(gamma * pw2(act(pw1(LN(dw(h)))))),
    channel-first (B, C, H, W) in and out (spec §9.3).

    Args:
        dim (int): The channel width C.
        dw (nn.Conv2d): The depthwise conv, weight (C, 1, k, k).
        pw1 (nn.Module): C -> rC, an ``nn.Linear`` or a 1x1 ``nn.Conv2d``
            (mmpretrain's ``linear_pw_conv``).
        pw2 (nn.Module): rC -> C, of the same type as ``pw1``.
        norm (nn.Module): The block's channel LayerNorm of width C; the
            site gets a fresh one with its ``eps`` (never shared).
        act (nn.Module): The activation between the pointwise layers.
    """

    kind: ClassVar[BlockKind] = BlockKind.CONVNEXT
    dim: int
    dw: 'nn.Module'
    pw1: 'nn.Module'
    pw2: 'nn.Module'


__all__ = [
    'BlockDescription', 'BlockKind', 'BlockSlot', 'ConvBlock', 'ConvNeXtBlock',
    'TransformerBlock'
]
