"""Lean, exact backward for the sites' feature-map update (spec §3, §4).

A site's update is light (a chain of 1x1 convs or two (d, d) matmuls, a
fresh norm, a scale, drop path), so autograd's default of keeping every
intermediate for backward costs more memory than the site saves; the
generic alternative (a non-reentrant checkpoint) runs the whole forward of
the update again in backward, then autograd's backward of it, with one
elementwise pass per op. The :class:`torch.autograd.Function` s here keep
only the update's input, its (small) weights and a few per-channel or
per-token vectors, recompute in backward the matmul part alone (the cheap
part: the products the backward needs anyway) and differentiate the norm,
the activation and the matmuls with the same aten kernels autograd uses
(``native_batch_norm_backward``, ``native_layer_norm_backward``,
``gelu_backward``, ``convolution_backward``). Forward values, gradients and
the norm's running statistics equal the plain computation's up to float
rounding (the running statistics to the bit on CPU: they come from the
same aten kernel, :func:`torch.batch_norm_update_stats`).

Drop path is folded into a per-sample factor: the mask is the drop-path
module applied to a ``(B, 1, ..., 1)`` tensor of ones in the input's dtype
(mmcv's, mmpretrain's and timm's ``DropPath`` draw ``torch.rand`` /
``bernoulli_`` of exactly that shape and dtype), so a seeded run draws the
same mask as the plain computation, and no map-sized mask is kept.

The backward functions are first-order only: a backward asked to build a
graph of its own (``create_graph=True``: double backward, e.g. a gradient
penalty through the backbone) raises a ``RuntimeError`` that names the
option to turn off (``recompute=False``: autograd through the plain
update, twice differentiable) instead of silently missing second-order
terms.

The Functions run in eager mode only (:func:`lean_allowed`): compiled,
the sites recompute through a checkpoint region, whose recomputation the
compiler keeps. Torch only.
"""
import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.compat import is_compiling
from .synthesis import (at_least_fp32, fold_chain, fold_grouped,
                        fold_grouped_backward, folded_conv_groups)

_aten = torch.ops.aten
Groups = Tuple[Tuple[int, int], ...]


def _first_order_only():
    """Refuse a backward that would record a graph (``create_graph=True``):
    the hand-written backward is first-order only."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            'a RepL site with recompute=True has a first-order backward '
            'only: double backward (create_graph=True, e.g. a gradient '
            'penalty) through it is not supported; build the backbone '
            'with replacement=dict(recompute=False) for that')


def lean_allowed() -> bool:
    """Whether the lean Functions run where the caller is: in eager only.

    Under ``torch.compile`` a traced ``autograd.Function``'s forward and
    backward end up in one joint graph, and AOTAutograd's partitioner
    decides anew what the backward graph keeps: the chain that the
    Function's backward recomputes from ``h`` is the forward's chain
    again, so the compiled graph keeps the chain's intermediates instead of
    recomputing them. Measured on a RepL ResNet-50 (docs/benchmark.md), a
    compiled default site kept what a ``recompute=False`` site keeps, with
    ``aot_eager`` and with inductor. A checkpoint region's ops carry
    recompute tags that both partitioners follow, so compiled sites
    recompute through :func:`~repl_mm.core.recompute.recompute_in_backward`
    instead (``tests/test_core/test_compile.py`` checks the saved bytes).
    """
    return not is_compiling()


def per_sample_drop_path(module: nn.Module) -> bool:
    """Whether ``module`` is ``nn.Identity`` or a per-sample stochastic
    depth module (a class named ``DropPath`` with a numeric ``drop_prob``:
    mmcv's, mmpretrain's, timm's), i.e. ``module(x) == x * module(ones)``
    for a ``(B, 1, ..., 1)`` tensor of ones drawn with the same RNG."""
    if type(module) is nn.Identity:
        return True
    return type(module).__name__ == 'DropPath' and isinstance(
        getattr(module, 'drop_prob', None), numbers.Real)


def sample_factor(h: Tensor, scale: Tensor, drop_path: nn.Module) -> Tensor:
    """``scale`` times the drop-path mask, in ``h``'s dtype: a 0-dim
    tensor without a mask (eval, rate 0, ``nn.Identity``), else of shape
    ``(B, 1, ..., 1)``.

    The mask is ``drop_path(ones)``: the same RNG draw as ``drop_path(x)``
    (a drop path that returns its input, as mmcv's does in eval or at rate
    0, draws nothing and gives no mask).
    """
    scale = scale.to(h.dtype)
    if type(drop_path) is nn.Identity:
        return scale
    ones = h.new_ones((h.shape[0], ) + (1, ) * (h.dim() - 1))
    mask = drop_path(ones)
    if mask is ones:
        return scale
    return scale * mask


def _fold(mats: Sequence[Tensor],
          groups: Groups,
          dtype,
          conv_groups: Optional[Sequence[int]] = None) -> list:
    """One matrix per group (:func:`~repl_mm.core.synthesis.fold_chain` in
    at least fp32, as the site's synthesis runs; of grouped positions
    :func:`~repl_mm.core.synthesis.fold_grouped`), in ``dtype``."""
    out = []
    for start, stop in groups:
        if stop - start == 1:
            out.append(mats[start].to(dtype))
        elif conv_groups is None:
            out.append(
                fold_chain([at_least_fp32(m)
                            for m in mats[start:stop]]).to(dtype))
        else:
            out.append(
                fold_grouped([at_least_fp32(m) for m in mats[start:stop]],
                             conv_groups[start:stop])[0].to(dtype))
    return out


def _fold_backward(mats: Sequence[Tensor], grad: Tensor) -> list:
    """Gradients of P = W_n ... W_1 (``fold_chain(mats)``) given dP:
    dW_j = (W_n ... W_{j+1})^T dP (W_{j-1} ... W_1)^T, in at least fp32."""
    ws = [at_least_fp32(m) for m in mats]
    grad = at_least_fp32(grad)
    right, acc = [], None
    for w in ws:  # right[j] = W_{j-1} ... W_1 (None for j = 1)
        right.append(acc)
        acc = w if acc is None else w @ acc
    grads, left = [None] * len(ws), None  # left = W_n ... W_{j+1}
    for j in range(len(ws) - 1, -1, -1):
        g = grad if left is None else left.t() @ grad
        if right[j] is not None:
            g = g @ right[j].t()
        grads[j] = g
        left = ws[j] if left is None else left @ ws[j]
    return grads


def _fold_factor(grad: Tensor, k: Tensor, weight: Optional[Tensor],
                 width: int):
    """The output gradient and weight to hand a norm's backward kernel
    for out = k * norm(x), and the factor its gamma and beta gradients
    still need: a 0-dim k goes into the (per-channel) weight, which the
    input gradient is linear in (no map-sized pass for grad * k); a
    per-sample k must multiply the gradient."""
    if k.dim() == 0:
        w = k.expand(width).contiguous() if weight is None else weight * k
        return grad, w, k
    return grad * k, weight, None


def _times(t: Optional[Tensor], factor: Optional[Tensor]):
    return t if t is None or factor is None else t * factor


def _invstd(var: Tensor, eps: float) -> Tensor:
    """1 / sqrt(var + eps), in float64 for a narrower var and rounded
    back (as the CPU kernels compute it, in their accumulation type)."""
    return (var.double() + eps).rsqrt().to(var.dtype)


def _pointwise(x: Tensor, w: Tensor, groups: int = 1) -> Tensor:
    # (Cout, Cin/g) -> (Cout, Cin/g, 1, 1): a 1x1, stride-1 conv
    if groups == 1:
        return F.conv2d(x, w[:, :, None, None])
    return F.conv2d(x, w[:, :, None, None], groups=groups)


class ConvUpdate(torch.autograd.Function):
    """k * BN(G_K ... G_1 h) for a (B, C, H, W) map h: a CNN site's update
    (:class:`~repl_mm.core.cnn_site.ConvSite`), with k = scale * mask.

    The chain W_J ... W_1 is cut into ``groups``; each group is folded in
    weight space (in at least fp32) into one G, cast to ``h``'s dtype, and
    applied as a 1x1 conv: x_hat = G_K(... G_1 h). A chain with grouped
    positions (spec §9.1) runs through :class:`GroupedConvUpdate`.

    Forward, per channel c over the N = B*H*W values of x_hat:

    - training (batch statistics): mean_c and the biased var_c from
      :func:`torch.batch_norm_update_stats`, invstd_c = 1 / sqrt(var_c +
      eps); the kernel also updates ``running_mean`` / ``running_var`` in
      place as ``F.batch_norm`` does (``momentum`` is the factor,
      running_var gets the unbiased var); no update when they are None;
    - eval: the running mean and var (copies: the buffers may change
      before backward), invstd_c = 1 / sqrt(var_c + eps);
    - out = x_hat * (k * a_c) + k * b_c with a_c = gamma_c * invstd_c,
      b_c = beta_c - mean_c * a_c (the CPU kernel's own form).

    Saved: ``h`` (kept anyway: the residual reads it), the J matrices
    (they are the synthesis' outputs), mean and invstd (training) or the
    running mean and var (eval): 2C values, k (0-dim, or B values with drop
    path), gamma (a parameter). No map-sized tensor besides ``h``.

    Backward, with g = grad * k, xn = (x_hat - mean) * invstd (training;
    the aten kernel ``native_batch_norm_backward`` autograd uses for
    ``F.batch_norm``):

    - dbeta_c = sum g, dgamma_c = sum g * xn;
    - dx_hat = gamma_c * invstd_c * (g - mean(g) - xn * mean(g * xn))
      (training), gamma_c * invstd_c * g (eval); a 0-dim k is handed to
      the kernel as gamma * k with the unscaled grad (dx_hat is linear in
      both), and scales dgamma, dbeta after: no map-sized pass for g;
    - the chain: x_hat and the intermediates G_k ... G_1 h are recomputed
      from h (the convs of forward; the groups are folded again), then
      dG_k = sum over pixels dz_k z_{k-1}^T and dz_{k-1} = G_k^T dz_k
      (``convolution_backward``, as autograd's), and each folded group
      P = W_b ... W_a gives dW_j = (W_b ... W_{j+1})^T dP (W_{j-1} ...
      W_a)^T (a group with grouped positions: per group of each product,
      :func:`~repl_mm.core.synthesis.fold_grouped_backward`).

    Args (of ``apply``): h, k, gamma, beta (None without affine),
    running_mean, running_var (None: no update / none tracked),
    batch_stats (bool), momentum (float factor), eps (float), groups
    (tuple of (start, stop)), then the J matrices (dense; grouped ones go
    through :class:`GroupedConvUpdate`).
    """

    @staticmethod
    def forward(ctx, h: Tensor, k: Tensor, gamma: Optional[Tensor],
                beta: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], batch_stats: bool,
                momentum: float, eps: float, groups: Groups, *mats):
        return _update_forward(ctx, h, k, gamma, beta, running_mean,
                               running_var, batch_stats, momentum, eps, groups,
                               None, mats)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _update_backward(ctx, grad, 10)


class GroupedConvUpdate(torch.autograd.Function):
    """:class:`ConvUpdate` of a chain with grouped positions (spec §9.1):
    the same arguments with ``conv_groups`` (one int per matrix) after
    ``groups``; a grouped W_j is a (Cout_j, Cin_j / g_j) matrix, folded
    groups are :func:`~repl_mm.core.synthesis.fold_grouped`'s products,
    every G is applied (and differentiated) as a grouped 1x1 conv, and a
    folded group with grouped positions is differentiated per group
    (:func:`~repl_mm.core.synthesis.fold_grouped_backward`). Everything
    else as
    :class:`ConvUpdate` (a separate Function, so the dense one keeps its
    signature)."""

    @staticmethod
    def forward(ctx, h: Tensor, k: Tensor, gamma: Optional[Tensor],
                beta: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], batch_stats: bool,
                momentum: float, eps: float, groups: Groups,
                conv_groups: Tuple[int, ...], *mats):
        return _update_forward(ctx, h, k, gamma, beta, running_mean,
                               running_var, batch_stats, momentum, eps, groups,
                               conv_groups, mats)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _update_backward(ctx, grad, 11)


def _update_forward(ctx, h, k, gamma, beta, running_mean, running_var,
                    batch_stats, momentum, eps, groups, conv_groups, mats):
    """The forward of :class:`ConvUpdate` (``conv_groups`` None) and
    :class:`GroupedConvUpdate`."""
    x = h
    for g, cg in zip(
            _fold(mats, groups, h.dtype, conv_groups),
            folded_conv_groups(conv_groups, groups)):
        x = _pointwise(x, g, cg)
    if batch_stats:
        # the batch mean and biased var (and the running update)
        mean, var = torch.batch_norm_update_stats(x, running_mean, running_var,
                                                  momentum)
        second = invstd = _invstd(var, eps)
    else:
        mean, second = running_mean.clone(), running_var.clone()
        invstd = _invstd(second, eps)
    a = invstd if gamma is None else gamma * invstd
    b = -mean * a if beta is None else beta - mean * a
    shape = (1, -1) + (1, ) * (x.dim() - 2)  # (C,) -> (1, C, 1, 1)
    out = torch.addcmul(k * b.view(shape).to(x.dtype), x,
                        k * a.view(shape).to(x.dtype))
    ctx.save_for_backward(h, k, gamma, mean, second, *mats)
    ctx.batch_stats, ctx.eps, ctx.groups = batch_stats, eps, groups
    ctx.conv_groups = conv_groups
    return out


def _update_backward(ctx, grad: Tensor, n_args: int):
    """The backward of :class:`ConvUpdate` and :class:`GroupedConvUpdate`,
    whose ``apply`` takes ``n_args`` arguments before the matrices."""
    _first_order_only()
    h, k, gamma, mean, second, *mats = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_h, need_mats = need[0], need[n_args:]
    conv_groups = ctx.conv_groups
    folded = _fold(mats, ctx.groups, h.dtype, conv_groups)
    fgroups = folded_conv_groups(conv_groups, ctx.groups)
    zs = [h]  # zs[k] is the input of folded[k]
    for g, cg in zip(folded, fgroups):
        zs.append(_pointwise(zs[-1], g, cg))
    x = zs.pop()
    g, w, factor = _fold_factor(grad, k, gamma, x.shape[1])
    if ctx.batch_stats:
        dx, dgamma, dbeta = _aten.native_batch_norm_backward(
            g, x, w, None, None, mean, second, True, ctx.eps,
            [True, need[2], need[3]])
    else:
        dx, dgamma, dbeta = _aten.native_batch_norm_backward(
            g, x, w, mean, second, None, None, False, ctx.eps,
            [True, need[2], need[3]])
    dgamma, dbeta = _times(dgamma, factor), _times(dbeta, factor)
    del g, x
    # which groups' matrices need a gradient
    need_group = [any(need_mats[start:stop]) for start, stop in ctx.groups]
    dfolded = [None] * len(folded)
    dz = dx
    for i in range(len(folded) - 1, -1, -1):
        need_in = need_h or any(need_group[:i])
        if not (need_in or need_group[i]):
            break
        w = folded[i]
        dz, dw, _ = _aten.convolution_backward(dz, zs[i], w[:, :, None, None],
                                               None, [1, 1], [0, 0], [1, 1],
                                               False, [0, 0], fgroups[i],
                                               [need_in, need_group[i], False])
        if dw is not None:
            dfolded[i] = dw.view(w.shape)
        zs[i] = None
    dmats = [None] * len(mats)
    for (start, stop), dp in zip(ctx.groups, dfolded):
        if dp is None:
            continue
        if stop - start == 1:
            parts = [dp]
        elif conv_groups is None:
            parts = _fold_backward(mats[start:stop], dp)
        else:
            parts = fold_grouped_backward(
                [at_least_fp32(m) for m in mats[start:stop]],
                conv_groups[start:stop], at_least_fp32(dp))
        for j, dw in zip(range(start, stop), parts):
            if need_mats[j]:
                dmats[j] = dw.to(mats[j].dtype)
    return (dz if need_h else None, None, dgamma, dbeta,
            *(None, ) * (n_args - 4), *dmats)


def conv_update(h: Tensor,
                mats: Sequence[Tensor],
                groups: Groups,
                norm: nn.BatchNorm2d,
                scale: Tensor,
                drop_path: nn.Module,
                conv_groups: Optional[Sequence[int]] = None) -> Tensor:
    """``drop_path(scale * norm(W_J ... W_1 h))`` through
    :class:`ConvUpdate`, ``norm`` an ``nn.BatchNorm2d`` used as its own
    forward would: ``num_batches_tracked`` incremented here in training,
    the factor ``momentum`` (or 1 / num_batches_tracked for
    ``momentum=None``), batch statistics in training or without running
    statistics, the running ones otherwise.

    Args:
        h (Tensor): (B, C, H, W).
        mats (Sequence[Tensor]): The (Cout_j, Cin_j) matrices.
        groups (tuple): How the chain is folded
            (:func:`~repl_mm.core.synthesis.best_grouping`).
        norm (nn.BatchNorm2d): The site's norm.
        scale (Tensor): The update's 0-dim multiplier.
        drop_path (nn.Module): ``nn.Identity`` or a per-sample drop path
            (:func:`per_sample_drop_path`).
        conv_groups (Sequence[int], optional): Conv groups per matrix
            (spec §9.1); None: every matrix dense.
    """
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and \
            norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            factor = 1.0 / float(norm.num_batches_tracked)
    batch_stats = norm.training or (norm.running_mean is None
                                    and norm.running_var is None)
    track = not norm.training or norm.track_running_stats
    if batch_stats and h.shape[0] * h.shape[2] * h.shape[3] == 1:
        raise ValueError('Expected more than 1 value per channel when '
                         f'training, got input size {tuple(h.shape)}')
    k = sample_factor(h, scale, drop_path)
    args = (h, k, norm.weight, norm.bias, norm.running_mean if track else None,
            norm.running_var if track else None, batch_stats, factor, norm.eps,
            tuple(groups))
    if conv_groups is None or all(g == 1 for g in conv_groups):
        return ConvUpdate.apply(*args, *mats)
    return GroupedConvUpdate.apply(*args, tuple(conv_groups), *mats)


class TokenUpdate(torch.autograd.Function):
    """k * LN(GELU(h M^T) + h A^T) for (B, N, d) tokens h: a ViT site's
    update (:class:`~repl_mm.core.vit_site.TransformerSite`), with k =
    scale * mask and LN over the last dim (affine).

    Forward: u = h M^T, y = GELU(u) + h A^T (erf GELU, or its tanh
    approximation; the second GEMM accumulates into GELU's output), LN
    per token: mean_t, rstd_t = 1 / sqrt(var_t + eps) (biased var over d),
    out = k * (gamma * (y - mean_t) * rstd_t + beta) (``native_layer_norm``,
    what ``F.layer_norm`` runs; a 0-dim k is folded into gamma and beta,
    a per-sample one multiplies the output in place).

    Saved: ``h`` (kept anyway: the residual reads it), A and M (the
    synthesis' outputs), mean and rstd (two values per token), k (0-dim,
    or B values with drop path), gamma and beta (parameters).

    Backward, with g = grad * k and yn = (y - mean_t) * rstd_t:
    u and h A^T are recomputed from h (two matmuls), then

    - dbeta = sum_t g, dgamma = sum_t g * yn;
    - dy = rstd_t * (gamma g - mean_d(gamma g) - yn * mean_d(gamma g * yn))
      (``native_layer_norm_backward``; a 0-dim k goes in as gamma * k, as
      in :class:`ConvUpdate`);
    - du = dy * GELU'(u) (``gelu_backward``: erf: Phi(u) + u phi(u); tanh:
      the derivative of the approximation);
    - dh = du M + dy A, dM = du^T h, dA = dy^T h (sums over tokens).

    Args (of ``apply``): h, k, attn (A), mlp (M), gamma, beta, eps
    (float), approximate (``'none'`` or ``'tanh'``).
    """

    @staticmethod
    def forward(ctx, h: Tensor, k: Tensor, attn: Tensor, mlp: Tensor,
                gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                approximate: str) -> Tensor:
        d = h.shape[-1]
        _, y = _mix(h.reshape(-1, d), attn, mlp, approximate)
        w, b = gamma, beta
        if k.dim() == 0:  # k folded into the affine: no pass for out * k
            w = k.expand(d).contiguous() if gamma is None else gamma * k
            b = None if beta is None else beta * k
        out, mean, rstd = torch.native_layer_norm(y, (d, ), w, b, eps)
        out = out.view(h.shape)
        if k.dim() > 0:
            out.mul_(k)
        ctx.save_for_backward(h, k, attn, mlp, gamma, beta, mean, rstd)
        ctx.approximate = approximate
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        _first_order_only()
        h, k, attn, mlp, gamma, beta, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        d = h.shape[-1]
        h2 = h.reshape(-1, d)
        u, y = _mix(h2, attn, mlp, ctx.approximate)
        g, w, factor = _fold_factor(grad, k, gamma, d)
        dy, dgamma, dbeta = _aten.native_layer_norm_backward(
            g.reshape(-1, d), y, [d], mean, rstd, w, beta,
            [True, need[4], need[5]])
        dgamma, dbeta = _times(dgamma, factor), _times(dbeta, factor)
        del y, g
        du = _aten.gelu_backward(dy, u, approximate=ctx.approximate)
        del u
        dh = dattn = dmlp = None
        if need[0]:
            dh = torch.addmm(du @ mlp, dy, attn).view(h.shape)
        if need[2]:
            dattn = dy.t() @ h2
        if need[3]:
            dmlp = du.t() @ h2
        return dh, None, dattn, dmlp, dgamma, dbeta, None, None


def _mix(h2: Tensor, attn: Tensor, mlp: Tensor, approximate: str):
    """u = h M^T and y = GELU(u) + h A^T for (T, d) tokens, the sum
    accumulated into the GELU output by the second GEMM."""
    u = h2 @ mlp.t()
    return u, torch.addmm(F.gelu(u, approximate=approximate), h2, attn.t())


def token_update(h: Tensor, attn: Tensor, mlp: Tensor, norm: nn.LayerNorm,
                 act: nn.GELU, scale: Tensor, drop_path: nn.Module) -> Tensor:
    """``drop_path(scale * norm(act(h M^T) + h A^T))`` through
    :class:`TokenUpdate` (``norm`` an affine ``nn.LayerNorm`` over the last
    dim, ``act`` an ``nn.GELU``, ``drop_path`` as for
    :func:`conv_update`)."""
    k = sample_factor(h, scale, drop_path)
    return TokenUpdate.apply(h, k, attn, mlp, norm.weight, norm.bias, norm.eps,
                             act.approximate)
