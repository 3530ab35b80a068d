"""Pointwise operators, dense and grouped: applying one to a feature map,
folding a chain of them, and (spec §9.1, ResNeXt) grouped positions. A
position with ``g`` conv groups is a (Cout, Cin/g) matrix applied as
``F.conv2d(..., groups=g)``, i.e. the block-diagonal (Cout, Cin) matrix
:func:`block_diagonal` expands it to; here are products of such
matrices, their hand-written backward, their multiply-add counts and the
groups of a folded chain. Plain functions, torch only; :mod:`.synthesis`
re-exports them.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def fold_chain(mats: Sequence[Tensor]) -> Tensor:
    """One matrix for the chain x -> W_J(...(W_1 x)): W_J @ ... @ W_1."""
    out = mats[0]
    for w in mats[1:]:
        out = w @ out
    return out


def pointwise(x: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
    """Apply a (Cout, Cin/g) matrix as a 1x1, stride-1 conv with ``groups``
    groups."""
    # (Cout, Cin/g) -> (Cout, Cin/g, 1, 1)
    if groups == 1:
        return F.conv2d(x, weight[:, :, None, None])
    return F.conv2d(x, weight[:, :, None, None], groups=groups)


def _dense(conv_groups: Optional[Sequence[int]]) -> bool:
    return conv_groups is None or all(g == 1 for g in conv_groups)


def full_shape(mat: Tensor, groups: int = 1) -> Tuple[int, int]:
    """(Cout, Cin) of a (Cout, Cin/g) matrix with ``groups`` groups."""
    return int(mat.shape[0]), int(mat.shape[1]) * groups


def block_diagonal(mat: Tensor, groups: int) -> Tensor:
    """The dense (Cout, Cin) form of a grouped (Cout, Cin/g) matrix: block
    k (output channels k Cout/g .. (k+1) Cout/g - 1) reads input channels
    k Cin/g .. (k+1) Cin/g - 1, as ``F.conv2d(..., groups=g)`` does; zero
    elsewhere. Differentiable; ``mat`` itself for ``groups=1``.

    Example:
        >>> block_diagonal(torch.ones(4, 1), 2).tolist()
        [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    """
    if groups == 1:
        return mat
    cout, cin_g = mat.shape
    # (Cout, Cin/g) -> (g, Cout/g, Cin/g) -> (g, Cout/g, g, Cin/g)
    blocks = mat.reshape(groups, cout // groups, cin_g)
    eye = torch.eye(groups, dtype=mat.dtype, device=mat.device)
    dense = blocks[:, :, None, :] * eye[:, None, :, None]
    return dense.reshape(cout, groups * cin_g)


def diagonal_blocks(dense: Tensor, groups: int) -> Tensor:
    """The (Cout, Cin/g) diagonal blocks of a dense (Cout, Cin) matrix: the
    inverse of :func:`block_diagonal` on block-diagonal matrices, and its
    adjoint (the gradient of a grouped matrix from its dense form's)."""
    if groups == 1:
        return dense
    cout, cin = dense.shape
    # (Cout, Cin) -> (g, Cout/g, g, Cin/g) -> (Cout/g, Cin/g, g)
    blocks = torch.diagonal(
        dense.reshape(groups, cout // groups, groups, cin // groups),
        dim1=0,
        dim2=2)
    return blocks.permute(2, 0, 1).reshape(cout, cin // groups)


def product_groups(gb: int, ga: int) -> int:
    """Groups of :func:`grouped_product` ``B @ A``: g when both have g
    groups (block-diagonal times block-diagonal), else 1 (dense)."""
    return ga if ga == gb else 1


def product_macs(shape_b: Tuple[int, int], gb: int, shape_a: Tuple[int, int],
                 ga: int) -> int:
    """Multiply-adds of :func:`grouped_product` as it computes ``B @ A``
    for full shapes (C3, C2) and (C2, C1): C3 C2 C1 / g^2 for two g-group
    matrices, / g when one is dense, / gb when the groups differ (A is
    expanded to its dense form first)."""
    macs = shape_b[0] * shape_b[1] * shape_a[1]
    if ga == gb:
        return macs // (ga * ga)
    if ga == 1 or gb == 1:
        return macs // (ga * gb)
    return macs // gb


def grouped_product(b: Tensor, gb: int, a: Tensor,
                    ga: int) -> Tuple[Tensor, int]:
    """``B @ A`` of two grouped pointwise matrices, exactly, in grouped
    form: (C3, C2/gb) with gb groups times (C2, C1/ga) with ga groups.

    Both with g groups: per group (a batched matmul), the product has g
    groups. One dense: per group of the grouped one (a batched matmul),
    the product is dense. Different groups (both above 1): A is expanded
    to its block-diagonal form first, the product is dense. Costs
    :func:`product_macs`; plain ``b @ a`` for two dense matrices.

    Returns:
        tuple[Tensor, int]: The product, (C3, C1/g), and its groups g
        (:func:`product_groups`).
    """
    if ga == 1 and gb == 1:
        return b @ a, 1
    if ga != gb and ga > 1 and gb > 1:
        a, ga = block_diagonal(a, ga), 1
    c3, c2 = b.shape[0], a.shape[0]
    if ga == gb:
        g = ga
        # (C3, C2/g) @ (C2, C1/g) per group: (g, C3/g, C2/g) @
        # (g, C2/g, C1/g) -> (g, C3/g, C1/g) -> (C3, C1/g)
        out = torch.bmm(b.reshape(g, c3 // g, -1), a.reshape(g, c2 // g, -1))
        return out.reshape(c3, -1), g
    if ga == 1:  # grouped B, dense A: row block k of B @ A is B_k A_k.
        g = gb
        # (g, C3/g, C2/g) @ (g, C2/g, C1) -> (g, C3/g, C1) -> (C3, C1)
        out = torch.bmm(
            b.reshape(g, c3 // g, -1), a.reshape(g, c2 // g, a.shape[1]))
        return out.reshape(c3, a.shape[1]), 1
    g = ga  # dense B, grouped A: column block k of B @ A is B_k A_k.
    # (C3, C2) -> (g, C3, C2/g); @ (g, C2/g, C1/g) -> (g, C3, C1/g)
    bg = b.reshape(c3, g, c2 // g).transpose(0, 1)
    out = torch.bmm(bg, a.reshape(g, c2 // g, -1))
    return out.transpose(0, 1).reshape(c3, -1), 1  # -> (C3, C1)


def fold_grouped(mats: Sequence[Tensor],
                 conv_groups: Sequence[int]) -> Tuple[Tensor, int]:
    """:func:`fold_chain` of grouped matrices: W_J @ ... @ W_1 through
    :func:`grouped_product`, and the groups of the result."""
    out, g = mats[0], conv_groups[0]
    for w, gw in zip(mats[1:], conv_groups[1:]):
        out, g = grouped_product(w, gw, out, g)
    return out, g


def grouped_product_backward(b: Tensor, gb: int, a: Tensor, ga: int,
                             grad: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients (dB, dA) of :func:`grouped_product` ``B @ A`` given the
    gradient of its (grouped) result: per group, dB_k = dP_k A_k^T and
    dA_k = B_k^T dP_k, in the layout :func:`grouped_product` computed
    (an A expanded to its dense form gets the diagonal blocks of its
    dense gradient, :func:`diagonal_blocks`). Plain tensor ops, so a
    hand-written backward can call it (and a compiler trace it)."""
    if ga == 1 and gb == 1:
        return grad @ a.t(), b.t() @ grad
    expanded = ga != gb and ga > 1 and gb > 1
    ga_in = ga
    if expanded:
        a, ga = block_diagonal(a, ga), 1
    c3, c2 = b.shape[0], a.shape[0]
    if ga == gb:
        g = ga
        bg = b.reshape(g, c3 // g, -1)  # (g, C3/g, C2/g)
        ag = a.reshape(g, c2 // g, -1)  # (g, C2/g, C1/g)
        dp = grad.reshape(g, c3 // g, -1)  # (g, C3/g, C1/g)
        db = torch.bmm(dp, ag.transpose(1, 2)).reshape(b.shape)
        da = torch.bmm(bg.transpose(1, 2), dp).reshape(a.shape)
    elif ga == 1:  # grouped B, dense A
        g = gb
        bg = b.reshape(g, c3 // g, -1)  # (g, C3/g, C2/g)
        ag = a.reshape(g, c2 // g, a.shape[1])  # (g, C2/g, C1)
        dp = grad.reshape(g, c3 // g, a.shape[1])  # (g, C3/g, C1)
        db = torch.bmm(dp, ag.transpose(1, 2)).reshape(b.shape)
        da = torch.bmm(bg.transpose(1, 2), dp).reshape(a.shape)
    else:  # dense B, grouped A
        g = ga
        bg = b.reshape(c3, g, c2 // g).transpose(0, 1)  # (g, C3, C2/g)
        ag = a.reshape(g, c2 // g, -1)  # (g, C2/g, C1/g)
        # (C3, C1) -> (C3, g, C1/g) -> (g, C3, C1/g)
        dp = grad.reshape(c3, g, -1).transpose(0, 1)
        db = torch.bmm(dp, ag.transpose(1, 2)).transpose(0, 1).reshape(b.shape)
        da = torch.bmm(bg.transpose(1, 2), dp).reshape(a.shape)
    if expanded:
        da = diagonal_blocks(da, ga_in)
    return db, da


def fold_grouped_backward(mats: Sequence[Tensor], conv_groups: Sequence[int],
                          grad: Tensor) -> list:
    """Gradients of :func:`fold_grouped` (P = W_J ... W_1 folded left to
    right) given dP: the products are formed again, then
    :func:`grouped_product_backward` from the last one to the first."""
    accs, gs = [mats[0]], [conv_groups[0]]
    for w, gw in zip(mats[1:-1], conv_groups[1:-1]):
        acc, g = grouped_product(w, gw, accs[-1], gs[-1])
        accs.append(acc)
        gs.append(g)
    grads = [None] * len(mats)
    for j in range(len(mats) - 1, 0, -1):
        grads[j], grad = grouped_product_backward(mats[j], conv_groups[j],
                                                  accs[j - 1], gs[j - 1], grad)
    grads[0] = grad
    return grads


def chain_product_groups(conv_groups: Sequence[int]) -> int:
    """Groups of the folded chain with these positions' groups
    (:func:`fold_grouped`)."""
    g = conv_groups[0]
    for gw in conv_groups[1:]:
        g = product_groups(gw, g)
    return g
