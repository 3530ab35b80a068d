"""Weight-space math of RepL as plain functions (spec §3, §4).

No module state and no registry imports: each function is testable on tiny
tensors against values worked out by hand.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in the dtype synthesis runs in: float32 for a narrower float
    (fp16, bf16), ``t`` itself (no copy) for float32 and float64.

    Synthesis is weight-space math (sums over taps, products of weight
    matrices): it runs in at least fp32 whatever the model's dtype, and a
    float64 model is not rounded to fp32 on the way.
    """
    if t.is_floating_point() and torch.finfo(t.dtype).bits < 32:
        return t.float()
    return t


def collapse_kernel(weight: Tensor) -> Tensor:
    """Sum a conv kernel over its taps: S(W) of spec §3.

    Args:
        weight (Tensor): (Cout, Cin, kh, kw) conv weight, or an already
            pointwise (Cout, Cin) matrix (returned unchanged).

    Returns:
        Tensor: (Cout, Cin).
    """
    if weight.dim() == 4:
        return weight.sum(dim=(2, 3))  # (Cout, Cin, kh, kw) -> (Cout, Cin)
    if weight.dim() == 2:
        return weight
    raise ValueError(f'expected a 2-D or 4-D weight, got shape '
                     f'{tuple(weight.shape)}')


def mix_channels(terms: Sequence) -> Tensor:
    """Per-output-channel mix of neighbour matrices.

    .. math::
        \\hat W = \\sum_s \\mathrm{diag}(\\phi_s) W_s

    Args:
        terms (Sequence[tuple[Tensor, Tensor]]): Pairs ``(phi, W)`` with
            phi of shape (Cout,) (or a scalar) and W of shape (Cout, Cin).
    """
    out = None
    for phi, w in terms:
        if phi.dim() == 1:
            phi = phi[:, None]  # (Cout,) -> (Cout, 1)
        t = phi * w
        out = t if out is None else out + t
    if out is None:
        raise ValueError('mix_channels needs at least one term')
    return out


def fold_chain(mats: Sequence[Tensor]) -> Tensor:
    """One matrix for the chain x -> W_J(...(W_1 x)): W_J @ ... @ W_1."""
    out = mats[0]
    for w in mats[1:]:
        out = w @ out
    return out


def chain_macs(mats: Sequence[Tensor]) -> int:
    """Multiply-adds per pixel of applying the chain one matrix at a time."""
    return sum(w.shape[0] * w.shape[1] for w in mats)


def folded_macs(mats: Sequence[Tensor]) -> int:
    """Multiply-adds per pixel of the folded chain."""
    return mats[-1].shape[0] * mats[0].shape[1]


def should_fold(mats: Sequence[Tensor], pixels: int) -> bool:
    """Whether folding the chain in weight space costs fewer multiply-adds.

    Folding (:func:`fold_chain`: W_1, then W_j @ (W_{j-1} ... W_1) for
    j = 2..J) costs ``sum_{j=2..J} Cout_j * Cin_j * Cin_1`` once (it does
    not grow with the batch; W_1 itself costs nothing) and then
    ``Cout_J * Cin_1`` per pixel; the chain costs ``sum_{j=1..J} Cout_j *
    Cin_j`` per pixel. A single matrix is never "folded".

    Args:
        mats (Sequence[Tensor]): The (Cout_j, Cin_j) matrices, j = 1..J.
        pixels (int): Pixels the chain is applied to (B x H x W).
    """
    if len(mats) == 1:
        return False
    fold_once = 0
    cin = mats[0].shape[1]
    for w in mats[1:]:
        fold_once += w.shape[0] * w.shape[1] * cin
    return fold_once + pixels * folded_macs(mats) < pixels * chain_macs(mats)


def pointwise(x: Tensor, weight: Tensor) -> Tensor:
    """Apply a (Cout, Cin) matrix as a 1x1, stride-1 conv."""
    # (Cout, Cin) -> (Cout, Cin, 1, 1)
    return F.conv2d(x, weight[:, :, None, None])


def apply_chain(x: Tensor, mats: Sequence[Tensor],
                fold: Optional[bool] = None) -> Tensor:
    """x_hat = W_J(...(W_1 x)) on a (B, C, H, W) map, in the cheaper order.

    Args:
        x (Tensor): (B, Cin_1, H, W).
        mats (Sequence[Tensor]): (Cout_j, Cin_j) matrices, Cin_{j+1} =
            Cout_j.
        fold (bool, optional): Force folding (True) or the chain (False);
            None picks the cheaper by multiply-adds. Same function either
            way (up to float rounding).
    """
    if fold is None:
        fold = should_fold(mats, x.shape[0] * x.shape[2] * x.shape[3])
    if fold:
        return pointwise(x, fold_chain(mats))
    for w in mats:
        x = pointwise(x, w)
    return x


def value_weight(qkv_weight: Tensor) -> Tensor:
    """W_v: rows 2d..3d of a fused (3d, d) qkv weight (q, k, v order)."""
    d = qkv_weight.shape[1]
    if qkv_weight.shape[0] != 3 * d:
        raise ValueError('expected a fused qkv weight of shape (3d, d), got '
                         f'{tuple(qkv_weight.shape)}')
    return qkv_weight[2 * d:]


def attention_operator(qkv_weight: Tensor, proj_weight: Tensor) -> Tensor:
    """A = W_proj @ W_v (spec §4): (d, d)."""
    return proj_weight @ value_weight(qkv_weight)


def mlp_operator(fc1_weight: Tensor, fc2_weight: Tensor) -> Tensor:
    """M = W_fc2 @ W_fc1 (spec §4): (d, 4d) @ (4d, d) -> (d, d)."""
    return fc2_weight @ fc1_weight


def batch_norm_affine(running_mean: Tensor,
                      running_var: Tensor,
                      weight: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None,
                      eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Eval-mode batch norm as a per-channel affine map y = a * x + b.

    .. math::
        a = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}, \\quad
        b = \\beta - a \\mu

    Args:
        running_mean (Tensor): (C,) running mean mu.
        running_var (Tensor): (C,) running variance sigma^2.
        weight (Tensor, optional): (C,) gamma; None means 1.
        bias (Tensor, optional): (C,) beta; None means 0.
        eps (float): The norm's epsilon. Defaults to 1e-5.

    Returns:
        tuple[Tensor, Tensor]: a and b, each (C,).
    """
    a = (running_var + eps).rsqrt()
    if weight is not None:
        a = a * weight
    b = -a * running_mean
    if bias is not None:
        b = b + bias
    return a, b


def fold_affine(weight: Tensor, a: Tensor,
                b: Tensor) -> Tuple[Tensor, Tensor]:
    """Fold y = a * (W x) + b into one matrix and bias: (diag(a) W, b).

    Args:
        weight (Tensor): (Cout, Cin).
        a (Tensor): (Cout,) or a scalar.
        b (Tensor): (Cout,) or a scalar.

    Returns:
        tuple[Tensor, Tensor]: (Cout, Cin) weight and (Cout,) bias.
    """
    cout = weight.shape[0]
    a = a.expand(cout) if a.dim() == 0 else a
    b = b.expand(cout) if b.dim() == 0 else b
    return a[:, None] * weight, b.clone()  # (Cout,) -> (Cout, 1)
