"""Fit a RepL site to the block it replaces: the torch-only math of
:mod:`repl_mm.converters.from_e2e`.

Given a record of the replaced block's input :math:`x_i` and output
:math:`y_i` (and, for ResNet blocks, its residual branch), :func:`fit_site`
chooses the site's mixing weights and its fresh norm so that
:math:`site(x_i) \\approx y_i`, with the neighbours frozen and the norm
statistics those of the recorded data:

- ``ConvSite``, :math:`act(s \\cdot BN(\\hat W^J \\cdots \\hat W^1 x) + x)`:
  a BN of the chain is a free per-channel affine map of it, so the residual
  branch :math:`r` of the E2E block (its last norm's output) is matched by
  :math:`\\hat W^J \\cdots \\hat W^1 x + d`. That is linear in the phi of
  any one position given the others, so alternating least squares over
  the positions solves it (:func:`fit_chain`; each step exact, the loss
  never increases). The BN then takes the chain's statistics and
  :math:`\\gamma = \\sqrt{\\sigma^2 + \\epsilon} / s`,
  :math:`\\beta = (\\mu + d) / s`. The activation after the sum makes the
  output non-linear in the weights, so a short L-BFGS run on the output
  MSE (phi, own weights, BN affine) refines the result; it is kept only
  if it lowers the error.
- ``TransformerSite``,
  :math:`x + s \\cdot LN(GELU(x \\hat M^T) + x \\hat A^T)`: given alpha and
  beta, the LN affine is a per-channel least-squares fit of
  :math:`(y - x) / s` (:func:`affine_least_squares`); that closed form is
  substituted into the loss (variable projection), leaving one or two
  scalars (and any operator the site owns) for L-BFGS.
- ``ConvNeXtSite``, :math:`x + s \\cdot LN(GELU(\\hat M (\\hat D \\odot
  x)))`: the same variable projection on pixels (the LN affine in closed
  form), leaving phi, alpha, beta (and any operator the site owns) for
  L-BFGS.
- ``InterpolatedBlock``: the block keeps the E2E block's own parameters
  (its norms; for ViT its MLP and attention biases); alpha and beta are
  fitted by L-BFGS on the output MSE, then its BN statistics are
  re-estimated for the interpolated weights.

L-BFGS runs (``steps`` iterations, default 30) see at most ``max_points``
random pixels or tokens of the record (:func:`sample_points`); the final
statistics and the reported errors use the whole record. A site whose fit
does not lower its error on the record is put back as it was
(:func:`fit_site`): a fitted site is never worse than a fresh one.

Imports torch and :mod:`repl_mm.core` only. It is longer than our other
modules (about 700 lines) because it holds one concept, fitting a site to
a record: the chain least squares, the L-BFGS refinement and the four
site kinds share the record's conventions (pixels or tokens as rows, BNs
normalising with the record's statistics) and are read together.
"""
from contextlib import contextmanager
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.cnn_site import ConvSite
from ..core.convnext_site import ConvNeXtSite
from ..core.interpolate import InterpolatedBlock
from ..core.synthesis import block_diagonal, collapse_kernel
from ..core.vit_site import TransformerSite

# -- chain least squares ---------------------------------------------------


def relative_error(pred: Tensor, target: Tensor) -> float:
    """:math:`\\|pred - target\\| / \\|target\\|` over all elements."""
    return ((pred - target).norm() / target.norm().clamp_min(1e-30)).item()


def to_pixels(x: Tensor) -> Tensor:
    """One row per pixel: (B, C, H, W) -> (B*H*W, C)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def chain_matrices(sources: Sequence[Sequence[Tensor]],
                   coefs: Sequence) -> List[Tensor]:
    """The pointwise matrices of a chain.

    Position j is :math:`\\sum_s \\mathrm{diag}(c_s) S_s` over its sources,
    or, when it has none, ``coefs[j]`` itself (a matrix the site owns).

    Args:
        sources (Sequence[Sequence[Tensor]]): Per position, the (Cout, Cin)
            source matrices (collapsed neighbour kernels).
        coefs (Sequence): Per position, a list of (Cout,) vectors (one per
            source) or, for a position without sources, a (Cout, Cin)
            matrix.

    Returns:
        list[Tensor]: (Cout_j, Cin_j) per position.
    """
    mats = []
    for srcs, c in zip(sources, coefs):
        if srcs:
            mats.append(sum(phi[:, None] * s for phi, s in zip(c, srcs)))
        else:
            mats.append(c)
    return mats


def _apply_rows(x: Tensor, mats: Sequence[Tensor]) -> Tensor:
    """x (P, Cin_1) through the chain, one row per pixel -> (P, Cout_J)."""
    for m in mats:
        x = x @ m.T
    return x


def _fold(mats: Sequence[Tensor], eye: int, dtype) -> Tensor:
    """M_k @ ... @ M_1 (the identity of size ``eye`` for no matrix)."""
    out = torch.eye(eye, dtype=dtype)
    for m in mats:
        out = m @ out
    return out


def _solve_position(sxx: Tensor, sxr: Tensor, sources: Sequence[Tensor],
                    before: Tensor, after: Tensor) -> List[Tensor]:
    """Least-squares phi of one position, the other positions fixed.

    With :math:`A` the product of the positions before, :math:`B` that of
    the positions after and centred data, the prediction
    :math:`\\sum_{s,k} \\phi_{s,k} (X A^T S_s^T)[:, k] B[:, k]^T` is linear
    in phi, with the normal equations

    .. math::
        G_{(s,k),(t,l)} = (S_s A \\Sigma_{xx} A^T S_t^T)_{kl} (B^T B)_{kl},
        \\quad b_{(s,k)} = \\sum_c (S_s A \\Sigma_{xr})_{kc} B_{ck}

    where :math:`\\Sigma_{xx} = X_c^T X_c`, :math:`\\Sigma_{xr} = X_c^T
    R_c` (centring absorbs the free per-channel offset).
    """
    cout = sources[0].shape[0]
    sa = [s @ before for s in sources]  # each (Cout_j, C_0)
    btb = after.T @ after  # (Cout_j, Cout_j)
    n = len(sa)
    gram = sxx.new_zeros(n * cout, n * cout)
    rhs = sxx.new_zeros(n * cout)
    for i in range(n):
        rhs[i * cout:(i + 1) * cout] = ((sa[i] @ sxr) * after.T).sum(1)
        for j in range(n):
            gram[i * cout:(i + 1) * cout,
                 j * cout:(j + 1) * cout] = (sa[i] @ sxx @ sa[j].T) * btb
    ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-30)
    theta = torch.linalg.solve(
        gram + ridge * torch.eye(n * cout, dtype=sxx.dtype), rhs)
    return list(theta.view(n, cout))


def fit_chain(x: Tensor,
              target: Tensor,
              sources: Sequence[Sequence[Tensor]],
              coefs: Sequence,
              sweeps: int = 100) -> Tuple[List, Tensor]:
    """Alternating least squares for a chain of mixed pointwise matrices.

    Minimises, over the per-channel coefficients of every position with
    sources and a per-channel offset d,

    .. math::
        \\| R - \\hat W^J \\cdots \\hat W^1 X - d \\|^2, \\quad
        \\hat W^j = \\sum_s \\mathrm{diag}(\\phi^j_s) S^j_s

    one position at a time (each step is an exact linear least-squares
    solve, so the loss never increases). Positions without sources keep
    their matrix. The data enter through their means and second moments
    only (one pass, float64), so each sweep costs a few small matrix
    products whatever the number of pixels.

    Args:
        x (Tensor): (P, Cin_1) inputs, one row per pixel.
        target (Tensor): (P, Cout_J) targets.
        sources (Sequence[Sequence[Tensor]]): As in :func:`chain_matrices`.
        coefs (Sequence): Initial coefficients, as in
            :func:`chain_matrices`.
        sweeps (int): Maximum passes over the positions. Defaults to 100.

    Returns:
        tuple: ``(coefs, d)``, the fitted coefficients (same layout) and
        the (Cout_J,) offset.
    """
    x, target = x.double(), target.double()
    mx, mr = x.mean(0), target.mean(0)
    xc, rc = x - mx, target - mr
    sxx, sxr, srr = xc.T @ xc, xc.T @ rc, rc.pow(2).sum()
    del x, target, xc, rc
    sources = [[s.double() for s in srcs] for srcs in sources]
    coefs = [[c.double() for c in cs] if srcs else cs.double()
             for srcs, cs in zip(sources, coefs)]
    c0, dt = sxx.shape[0], sxx.dtype

    def loss_of(cs):
        # ||Rc - Xc M^T||^2 = tr(Srr) - 2 tr(M Sxr) + tr(M Sxx M^T)
        m = _fold(chain_matrices(sources, cs), c0, dt)
        return (srr - 2 * (m * sxr.T).sum() + ((m @ sxx) * m).sum()).item()

    last = loss_of(coefs)
    for _ in range(sweeps):
        for j, srcs in enumerate(sources):
            if not srcs:
                continue
            mats = chain_matrices(sources, coefs)
            coefs[j] = _solve_position(
                sxx, sxr, srcs, _fold(mats[:j], c0, dt),
                _fold(mats[j + 1:], mats[j].shape[0], dt))
        loss = loss_of(coefs)
        if last - loss <= 1e-10 * max(abs(last), 1e-30):
            break
        last = loss
    m = _fold(chain_matrices(sources, coefs), c0, dt)
    return coefs, mr - m @ mx


def affine_least_squares(n: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-column least squares :math:`r_c \\approx \\gamma_c n_c + b_c`.

    Args:
        n (Tensor): (P, C) features.
        r (Tensor): (P, C) targets.

    Returns:
        tuple[Tensor, Tensor]: gamma and b, each (C,). Differentiable.
    """
    nm, rm = n.mean(0), r.mean(0)
    nc, rc = n - nm, r - rm
    gamma = (nc * rc).sum(0) / (nc * nc).sum(0).clamp_min(1e-30)
    return gamma, rm - gamma * nm


# -- fitting one site ------------------------------------------------------


@contextmanager
def data_statistics(site: nn.Module):
    """Run ``site`` as in eval mode, except that its BNs normalise with the
    statistics of the batch (the whole record) and it does not recompute
    in backward. Restores modes and flags on exit."""
    modes = [(m, m.training) for m in site.modules()]
    recompute = getattr(site, 'recompute', None)
    site.eval()
    for m in site.modules():
        if isinstance(m, _BatchNorm):
            m.train()
    if recompute is not None:
        site.recompute = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        if recompute is not None:
            site.recompute = recompute


@contextmanager
def _trainable(params: Sequence[Tensor]):
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def lbfgs(loss_fn, params: Sequence[Tensor], steps: int) -> float:
    """Minimise ``loss_fn()`` over ``params`` with full-batch L-BFGS
    (strong-Wolfe line search, at most ``steps`` iterations). Gradients go
    to ``params`` only (not to frozen neighbours). The parameters are put
    back if the loss did not decrease. Returns the final loss."""
    params = list(params)
    if not params or steps <= 0:
        with torch.no_grad():
            return float(loss_fn())
    with _trainable(params):
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            start = float(loss_fn())
        opt = torch.optim.LBFGS(
            params,
            lr=1,
            max_iter=steps,
            tolerance_grad=1e-12,
            tolerance_change=1e-14,
            history_size=20,
            line_search_fn='strong_wolfe')

        def closure():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            return loss

        opt.step(closure)
        for p in params:
            p.grad = None
        with torch.no_grad():
            end = float(loss_fn())
            if not end <= start:  # also catches NaN
                for p, s in zip(params, saved):
                    p.copy_(s)
                end = start
    return end


@torch.no_grad()
def calibrate_norms(site: nn.Module, x: Tensor, block_args: tuple = ()):
    """Set the running statistics of every BN in ``site`` to the (biased)
    mean and variance of its input over the record ``x``, so that eval
    mode computes exactly what :func:`data_statistics` mode does.
    ``block_args``: the block's further arguments (a Swin block's
    ``hw_shape``)."""
    bns = [m for m in site.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return
    stats = {}

    def capture(mod, inputs):
        t = inputs[0]
        dims = [0] + list(range(2, t.dim()))
        stats[mod] = (t.mean(dims), t.var(dims, unbiased=False))

    hooks = [m.register_forward_pre_hook(capture) for m in bns]
    try:
        with data_statistics(site):
            site.compute(x, *block_args)
    finally:
        for h in hooks:
            h.remove()
    for m, (mean, var) in stats.items():
        if m.running_mean is not None:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


@torch.no_grad()
def site_error(site: nn.Module, x: Tensor, y: Tensor,
               block_args: tuple = ()) -> float:
    """Relative error of ``site`` (eval mode) on the record; the site is
    called as its block was (``block_args``: a Swin block's
    ``hw_shape``)."""
    modes = [(m, m.training) for m in site.modules()]
    site.eval()
    try:
        return relative_error(site.compute(x, *block_args), y)
    finally:
        for m, mode in modes:
            m.training = mode


def sample_points(x: Tensor, y: Tensor, max_points: int,
                  pointwise: bool) -> Tuple[Tensor, Tensor]:
    """A random subset of the record, to keep the L-BFGS runs short.

    A pointwise site (``ConvSite``: 1x1 chain and a per-channel norm;
    ``TransformerSite``: per-token operators and LN) computes each pixel
    or token on its own given the norm statistics, so it can be fitted on
    up to ``max_points`` random pixels or tokens, as (P, C, 1, 1) maps or
    (P, 1, d) sequences. Other sites get whole samples, as many as hold
    about ``max_points`` pixels or tokens. Seeded: the same record gives
    the same subset.
    """
    g = torch.Generator().manual_seed(0)
    if pointwise:
        if x.dim() == 4:  # (B, C, H, W) -> (P, C, 1, 1)
            xs, ys = to_pixels(x)[..., None, None], to_pixels(y)[..., None,
                                                                 None]
        else:  # (B, N, d) -> (P, 1, d)
            xs, ys = x.reshape(-1, 1,
                               x.shape[-1]), y.reshape(-1, 1, y.shape[-1])
        keep = max_points
    else:
        xs, ys = x, y
        per_sample = x[0].numel() // (
            x.shape[1] if x.dim() == 4 else x.shape[-1])
        keep = max(1, max_points // max(per_sample, 1))
    if len(xs) <= keep:
        return xs, ys
    idx = torch.randperm(len(xs), generator=g)[:keep]
    return xs[idx], ys[idx]


def _output_loss(site: nn.Module, x: Tensor, y: Tensor,
                 block_args: tuple = ()):
    denom = y.pow(2).sum().clamp_min(1e-30)

    def loss_fn():
        return (site.compute(x, *block_args) - y).pow(2).sum() / denom

    return loss_fn


def check_max_points(max_points: int) -> None:
    """``max_points`` must leave at least two points: batch statistics of
    one pixel are undefined, and none would skip the fit."""
    if isinstance(max_points,
                  bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f'max_points must be an int >= 2, but got '
                         f'{max_points!r}')


def _check_scale(site: nn.Module):
    if float(site.scale) == 0:
        raise ValueError(
            'replacement option scale=0 turns the site update off (only the '
            'skip path runs): there is nothing to fit')


def _conv_chain(site: ConvSite) -> List[Tuple[list, object]]:
    """Per position of a ConvSite's chain: its ``(name, neighbour conv)``
    sources and its coefficients, the list of phi parameters (one per
    source) or, for a position without sources, the site's own weight
    (``ConvSite.source_convs``, ``phi``, ``own_weight``).
    """
    chain = []
    for j in range(1, len(site.shapes) + 1):
        srcs = site.source_convs(j)
        if srcs:
            chain.append((srcs, [site.phi(j, name) for name, _ in srcs]))
        else:
            chain.append((srcs, site.own_weight(j)))
    return chain


def _site_groups(site: ConvSite) -> Tuple[int, ...]:
    return tuple(getattr(site, 'conv_groups', (1, ) * len(site.shapes)))


def fit_conv_site(site: ConvSite,
                  x: Tensor,
                  y: Tensor,
                  branch: Optional[Tensor] = None,
                  steps: int = 30,
                  max_points: int = 32768):
    """Fit a :class:`ConvSite` to map ``x`` to ``y`` (module docstring).

    Args:
        site (ConvSite): The site; its neighbours stay fixed.
        x (Tensor): (B, C, H, W) inputs of the replaced block.
        y (Tensor): (B, C, H, W) outputs of the replaced block.
        branch (Tensor, optional): (B, C, H, W) residual branch of the
            replaced block (its last norm's output). With it and a BN
            site norm, alternating least squares gives the start.
        steps (int): L-BFGS iterations on the output MSE. Defaults to 30.
        max_points (int): Pixels the L-BFGS run sees
            (:func:`sample_points`): single pixels with a BN site norm
            (per channel, so each pixel is computed on its own), whole
            maps otherwise (a GN mixes the pixels of a map). Defaults to
            32768.

    A grouped position (spec §9.1) enters the least squares in its dense
    block-diagonal form (:func:`~repl_mm.core.synthesis.block_diagonal`),
    in which diag(phi) S keeps the block structure: the same problem,
    solved exactly.
    """
    check_max_points(max_points)
    _check_scale(site)
    norm = site.site_norm
    params = [p for p in site.parameters()]
    if branch is not None and isinstance(norm, _BatchNorm) and norm.affine:
        # The pre-activation the site must produce: the branch, plus the
        # skip when the site has none (residual=False, Eq. 7/12).
        target = branch if site.residual else branch + x
        chain = _conv_chain(site)
        groups = _site_groups(site)
        # (Cout, Cin / g) -> dense block-diagonal (Cout, Cin)
        sources = [[
            block_diagonal(collapse_kernel(conv.weight).detach(), g)
            for _, conv in s
        ] for (s, _), g in zip(chain, groups)]
        coefs = [[phi.detach()
                  for phi in c] if s else block_diagonal(c.detach(), g)
                 for (s, c), g in zip(chain, groups)]
        coefs, d = fit_chain(to_pixels(x), to_pixels(target), sources, coefs)
        with torch.no_grad():
            for (s, params), cs in zip(chain, coefs):
                if s:
                    for phi, c in zip(params, cs):
                        phi.copy_(c)
            mats = [m.float() for m in chain_matrices(sources, coefs)]
            x_hat = _apply_rows(to_pixels(x), mats)  # (P, C_J)
            mean, var = x_hat.mean(0), x_hat.var(0, unbiased=False)
            scale = float(site.scale)
            norm.weight.copy_((var + norm.eps).sqrt() / scale)
            norm.bias.copy_((mean + d.float()) / scale)
    elif getattr(norm, 'weight', None) is not None and \
            not norm.weight.detach().any():
        with torch.no_grad():  # zero gamma: no gradient would reach phi
            norm.weight.fill_(1.0)
    xs, ys = sample_points(
        x, y, max_points, pointwise=isinstance(norm, _BatchNorm))
    with data_statistics(site):
        lbfgs(_output_loss(site, xs, ys), params, steps)
    calibrate_norms(site, x)


def fit_transformer_site(site: TransformerSite,
                         x: Tensor,
                         y: Tensor,
                         steps: int = 30,
                         max_points: int = 32768):
    """Fit a :class:`TransformerSite` to map ``x`` to ``y``.

    The LN affine is eliminated in closed form (:func:`affine_least_squares`
    of :math:`(y - x) / s` on the normalised features), so L-BFGS runs over
    alpha, beta and any operator the site owns only (variable
    projection); the output error is then that of the projected loss.

    Args:
        site (TransformerSite): The site; its neighbours stay fixed.
        x (Tensor): (B, N, d) inputs of the replaced layer.
        y (Tensor): (B, N, d) outputs of the replaced layer.
        steps (int): L-BFGS iterations. Defaults to 30.
        max_points (int): Tokens the L-BFGS run sees
            (:func:`sample_points`). Defaults to 32768.
    """
    check_max_points(max_points)
    _check_scale(site)
    norm = site.site_norm
    xs, ys = sample_points(x, y, max_points, pointwise=True)
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
        with data_statistics(site):
            lbfgs(_output_loss(site, xs, ys), list(site.parameters()), steps)
        return
    d = site.dim
    params = [
        p for n, p in site.named_parameters() if not n.startswith('site_norm.')
    ]

    def project(x, y):
        r = ((y - x) / float(site.scale)).reshape(-1, d)  # (B*N, d)
        ops = site.synthesize()
        u = site.act(F.linear(x, ops['mlp'])) + F.linear(x, ops['attn'])
        n = F.layer_norm(u, (d, ), eps=norm.eps).reshape(-1, d)
        gamma, beta = affine_least_squares(n, r)
        return n, r, gamma, beta

    denom = (ys - xs).pow(2).sum().clamp_min(1e-30)

    def loss_fn():
        n, r, gamma, beta = project(xs, ys)
        return (n * gamma + beta - r).pow(2).sum() / denom

    lbfgs(loss_fn, params, steps)
    with torch.no_grad():
        _, _, gamma, beta = project(x, y)  # the affine from all tokens
        norm.weight.copy_(gamma)
        norm.bias.copy_(beta)


def fit_convnext_site(site: ConvNeXtSite,
                      x: Tensor,
                      y: Tensor,
                      steps: int = 30,
                      max_points: int = 32768):
    """Fit a :class:`ConvNeXtSite` to map ``x`` to ``y``.

    As :func:`fit_transformer_site`, on pixels: the LN affine is the
    closed-form least-squares fit of :math:`(y - x) / s` on the normalised
    features (variable projection), so L-BFGS runs over phi, alpha, beta
    and any operator the site owns only.

    Args:
        site (ConvNeXtSite): The site; its neighbours stay fixed.
        x (Tensor): (B, C, H, W) inputs of the replaced block.
        y (Tensor): (B, C, H, W) outputs of the replaced block.
        steps (int): L-BFGS iterations. Defaults to 30.
        max_points (int): Pixels the L-BFGS run sees
            (:func:`sample_points`). Defaults to 32768.
    """
    check_max_points(max_points)
    _check_scale(site)
    norm = site.site_norm
    xs, ys = sample_points(x, y, max_points, pointwise=True)
    if not norm.elementwise_affine:
        with data_statistics(site):
            lbfgs(_output_loss(site, xs, ys), list(site.parameters()), steps)
        return
    params = [
        p for n, p in site.named_parameters() if not n.startswith('site_norm.')
    ]

    def project(x, y):
        r = to_pixels((y - x) / float(site.scale))  # (P, C)
        u = site.act(F.linear(to_pixels(x), site.operator()))
        n = F.layer_norm(u, (site.dim, ), eps=norm.eps)
        gamma, beta = affine_least_squares(n, r)
        return n, r, gamma, beta

    denom = to_pixels(ys - xs).pow(2).sum().clamp_min(1e-30)

    def loss_fn():
        n, r, gamma, beta = project(xs, ys)
        return (n * gamma + beta - r).pow(2).sum() / denom

    lbfgs(loss_fn, params, steps)
    with torch.no_grad():
        _, _, gamma, beta = project(x, y)  # the affine from all pixels
        norm.weight.copy_(gamma)
        norm.bias.copy_(beta)


def fit_interpolated_block(site: InterpolatedBlock,
                           x: Tensor,
                           y: Tensor,
                           steps: int = 30,
                           max_points: int = 32768,
                           block_args: tuple = ()):
    """Fit alpha and beta of an :class:`InterpolatedBlock` by L-BFGS on the
    output MSE (BN statistics of the record), then re-estimate its BN
    statistics for the interpolated weights. Its own parameters (norms,
    ViT MLP) stay as they are (the E2E block's, after transfer). The
    block runs as ``block(x, *block_args)`` (a Swin block's ``hw_shape``;
    whole samples are sampled, so it holds for them)."""
    check_max_points(max_points)
    params = [getattr(site, n) for n in ('alpha', 'beta') if hasattr(site, n)]
    xs, ys = sample_points(x, y, max_points, pointwise=False)
    with data_statistics(site):
        lbfgs(_output_loss(site, xs, ys, block_args), params, steps)
    calibrate_norms(site, x, block_args)


def fit_site(site: nn.Module,
             x: Tensor,
             y: Tensor,
             branch: Optional[Tensor] = None,
             steps: int = 30,
             max_points: int = 32768,
             block_args=()) -> Tuple[float, float]:
    """Fit any site to the record of the block it replaces.

    The site (parameters and buffers) is put back as it was unless the fit
    lowers its relative error on the whole record, so the returned
    ``after`` is never above ``before``.

    Args:
        site (nn.Module): A :class:`ConvSite`, :class:`TransformerSite` or
            :class:`InterpolatedBlock`.
        x (Tensor): Inputs of the replaced block.
        y (Tensor): Its outputs.
        branch (Tensor, optional): Its residual branch (conv blocks).
        steps (int): L-BFGS iterations. Defaults to 30.
        max_points (int): Pixels or tokens the L-BFGS run sees
            (:func:`sample_points`). Defaults to 32768.
        block_args (tuple): The block's further positional arguments (a
            Swin block's ``hw_shape``), the same for every recorded
            sample. Defaults to ().

    Returns:
        tuple[float, float]: Relative error
        :math:`\\|site(x) - y\\| / \\|y\\|` before and after the fit.

    Raises:
        ValueError: If ``max_points`` is below 2.
    """
    check_max_points(max_points)
    tensors = [*site.parameters(), *site.buffers()]
    with torch.no_grad():
        fresh = [t.detach().clone() for t in tensors]
    before = site_error(site, x, y, block_args)
    if isinstance(site, ConvSite):
        fit_conv_site(site, x, y, branch, steps, max_points)
    elif isinstance(site, TransformerSite):
        fit_transformer_site(site, x, y, steps, max_points)
    elif isinstance(site, ConvNeXtSite):
        fit_convnext_site(site, x, y, steps, max_points)
    elif isinstance(site, InterpolatedBlock):
        fit_interpolated_block(site, x, y, steps, max_points, block_args)
    else:
        raise TypeError(f'cannot fit a site of type {type(site).__name__}; '
                        'expected ConvSite, TransformerSite, ConvNeXtSite '
                        'or InterpolatedBlock')
    after = site_error(site, x, y, block_args)
    if not after < before:  # also catches NaN
        with torch.no_grad():
            for t, v in zip(tensors, fresh):
                t.copy_(v)
        after = site_error(site, x, y, block_args)
    return before, after


__all__ = [
    'affine_least_squares', 'calibrate_norms', 'chain_matrices',
    'check_max_points', 'data_statistics', 'fit_chain', 'fit_conv_site',
    'fit_convnext_site', 'fit_interpolated_block', 'fit_site',
    'fit_transformer_site', 'lbfgs', 'relative_error', 'sample_points',
    'site_error', 'to_pixels'
]
