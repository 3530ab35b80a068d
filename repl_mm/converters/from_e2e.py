"""Start RepL from a trained end-to-end model (issue 8 §2).

An E2E model (``replacement=dict(mode='none')``) and its RepL twin share a
plan (spec §1), so every module of the RepL model except the sites has the
E2E model's parameter names and shapes. :func:`convert` copies those
unchanged and *fits* each site to the block it replaces: it records the
replaced block's input :math:`x_i` and output :math:`y_i` on a few batches
of the E2E model (eval mode) and chooses the site's mixing weights and its
fresh norm so that :math:`site(x_i) \\approx y_i`.

How each site is fitted (all on the recorded activations, neighbours
frozen; the norm statistics are those of the recorded data):

- ``ConvSite``, :math:`act(s \\cdot BN(\\hat W^J \\cdots \\hat W^1 x) + x)`:
  a BN of the chain is a free per-channel affine map of it, so the residual
  branch :math:`r` of the E2E block (its last norm's output) is matched by
  :math:`\\hat W^J \\cdots \\hat W^1 x + d`. That is linear in the phi of
  any one position given the others, so alternating least squares over
  the positions solves it (each step exact, the loss never increases).
  The BN then takes the chain's statistics and
  :math:`\\gamma = \\sqrt{\\sigma^2 + \\epsilon} / s`,
  :math:`\\beta = (\\mu + d) / s`. The activation after the sum makes the
  output non-linear in the weights, so a short L-BFGS run on the output
  MSE (phi, own weights, BN affine) refines the result; it is kept only
  if it lowers the error.
- ``TransformerSite``,
  :math:`x + s \\cdot LN(GELU(x \\hat M^T) + x \\hat A^T)`: given alpha and
  beta, the LN affine is a per-channel least-squares fit of
  :math:`(y - x) / s`; that closed form is substituted into the loss
  (variable projection), leaving one or two scalars (and any operator
  the site owns) for L-BFGS.
- ``InterpolatedBlock``: the block keeps the E2E block's own parameters
  (its norms; for ViT its MLP and attention biases); alpha and beta are
  fitted by L-BFGS on the output MSE, then its BN statistics are
  re-estimated for the interpolated weights.

L-BFGS runs (``steps`` iterations, default 30) see at most ``max_points``
random pixels or tokens of the record (:func:`sample_points`); the final
statistics and the reported errors use the whole record. A site whose fit
does not lower its error on the record is put back as it was
(:func:`fit_site`): a fitted site is never worse than a fresh one.

The tensor math is in plain torch functions (:func:`fit_chain`,
:func:`affine_least_squares`, :func:`fit_site`); :func:`convert` adds the
mmengine side: configs, checkpoints, data and evaluation.
"""
import copy
import os
import os.path as osp
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repl_mm.core.cnn_site import ConvSite
from repl_mm.core.interpolate import InterpolatedBlock
from repl_mm.core.synthesis import collapse_kernel
from repl_mm.core.vit_site import TransformerSite

FITTABLE_MODES = ('synthesize', 'interpolate')

# --------------------------------------------------------------------------
# Tensor math (torch only)
# --------------------------------------------------------------------------


def relative_error(pred: Tensor, target: Tensor) -> float:
    """:math:`\\|pred - target\\| / \\|target\\|` over all elements."""
    return ((pred - target).norm() /
            target.norm().clamp_min(1e-30)).item()


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
        return (srr - 2 * (m * sxr.T).sum() +
                ((m @ sxx) * m).sum()).item()

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


# --------------------------------------------------------------------------
# Fitting one site (torch only)
# --------------------------------------------------------------------------


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
def calibrate_norms(site: nn.Module, x: Tensor):
    """Set the running statistics of every BN in ``site`` to the (biased)
    mean and variance of its input over the record ``x``, so that eval
    mode computes exactly what :func:`data_statistics` mode does."""
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
            site.compute(x)
    finally:
        for h in hooks:
            h.remove()
    for m, (mean, var) in stats.items():
        if m.running_mean is not None:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


@torch.no_grad()
def site_error(site: nn.Module, x: Tensor, y: Tensor) -> float:
    """Relative error of ``site`` (eval mode) on the record."""
    modes = [(m, m.training) for m in site.modules()]
    site.eval()
    try:
        return relative_error(site.compute(x), y)
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
            xs, ys = x.reshape(-1, 1, x.shape[-1]), y.reshape(
                -1, 1, y.shape[-1])
        keep = max_points
    else:
        xs, ys = x, y
        per_sample = x[0].numel() // (x.shape[1] if x.dim() == 4 else
                                       x.shape[-1])
        keep = max(1, max_points // max(per_sample, 1))
    if len(xs) <= keep:
        return xs, ys
    idx = torch.randperm(len(xs), generator=g)[:keep]
    return xs[idx], ys[idx]


def _output_loss(site: nn.Module, x: Tensor, y: Tensor):
    denom = y.pow(2).sum().clamp_min(1e-30)

    def loss_fn():
        return (site.compute(x) - y).pow(2).sum() / denom

    return loss_fn


def _check_max_points(max_points: int):
    """``max_points`` must leave at least two points: batch statistics of
    one pixel are undefined, and none would skip the fit."""
    if isinstance(max_points, bool) or not isinstance(
            max_points, int) or max_points < 2:
        raise ValueError(f'max_points must be an int >= 2, but got '
                         f'{max_points!r}')


def _check_scale(site: nn.Module):
    if float(site.scale) == 0:
        raise ValueError(
            'replacement option scale=0 turns the site update off (only the '
            'skip path runs): there is nothing to fit')


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
    """
    _check_max_points(max_points)
    _check_scale(site)
    norm = site.site_norm
    params = [p for p in site.parameters()]
    if branch is not None and isinstance(norm, _BatchNorm) and norm.affine:
        # The pre-activation the site must produce: the branch, plus the
        # skip when the site has none (residual=False, Eq. 7/12).
        target = branch if site.residual else branch + x
        sources = [[collapse_kernel(conv.weight).detach() for _, conv in s]
                   for s in site._sources]
        coefs = [[getattr(site, f'phi{j}_{n}').detach() for n, _ in s]
                 if s else getattr(site, f'weight{j}').detach()
                 for j, s in enumerate(site._sources, 1)]
        coefs, d = fit_chain(to_pixels(x), to_pixels(target), sources,
                             coefs)
        with torch.no_grad():
            for j, (s, cs) in enumerate(zip(site._sources, coefs), 1):
                for (name, _), c in zip(s, cs):
                    getattr(site, f'phi{j}_{name}').copy_(c)
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
    _check_max_points(max_points)
    _check_scale(site)
    norm = site.site_norm
    xs, ys = sample_points(x, y, max_points, pointwise=True)
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
        with data_statistics(site):
            lbfgs(_output_loss(site, xs, ys), list(site.parameters()), steps)
        return
    d = site.dim
    params = [p for n, p in site.named_parameters()
              if not n.startswith('site_norm.')]

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


def fit_interpolated_block(site: InterpolatedBlock,
                           x: Tensor,
                           y: Tensor,
                           steps: int = 30,
                           max_points: int = 32768):
    """Fit alpha and beta of an :class:`InterpolatedBlock` by L-BFGS on the
    output MSE (BN statistics of the record), then re-estimate its BN
    statistics for the interpolated weights. Its own parameters (norms,
    ViT MLP) stay as they are (the E2E block's, after transfer)."""
    _check_max_points(max_points)
    params = [getattr(site, n) for n in ('alpha', 'beta') if hasattr(site, n)]
    xs, ys = sample_points(x, y, max_points, pointwise=False)
    with data_statistics(site):
        lbfgs(_output_loss(site, xs, ys), params, steps)
    calibrate_norms(site, x)


def fit_site(site: nn.Module,
             x: Tensor,
             y: Tensor,
             branch: Optional[Tensor] = None,
             steps: int = 30,
             max_points: int = 32768) -> Tuple[float, float]:
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

    Returns:
        tuple[float, float]: Relative error
        :math:`\\|site(x) - y\\| / \\|y\\|` before and after the fit.

    Raises:
        ValueError: If ``max_points`` is below 2.
    """
    _check_max_points(max_points)
    tensors = [*site.parameters(), *site.buffers()]
    with torch.no_grad():
        fresh = [t.detach().clone() for t in tensors]
    before = site_error(site, x, y)
    if isinstance(site, ConvSite):
        fit_conv_site(site, x, y, branch, steps, max_points)
    elif isinstance(site, TransformerSite):
        fit_transformer_site(site, x, y, steps, max_points)
    elif isinstance(site, InterpolatedBlock):
        fit_interpolated_block(site, x, y, steps, max_points)
    else:
        raise TypeError(f'cannot fit a site of type {type(site).__name__}; '
                        'expected ConvSite, TransformerSite or '
                        'InterpolatedBlock')
    after = site_error(site, x, y)
    if not after < before:  # also catches NaN
        with torch.no_grad():
            for t, v in zip(tensors, fresh):
                t.copy_(v)
        after = site_error(site, x, y)
    return before, after


# --------------------------------------------------------------------------
# Models, checkpoints and data (mmengine)
# --------------------------------------------------------------------------


@dataclass
class SiteFit:
    """The fit of one site: ``backbone`` is the backbone's module name."""

    backbone: str
    index: int
    kind: str
    fresh_error: float
    fitted_error: float


@dataclass
class ConversionReport:
    """What :func:`convert` did: per-site errors and, unless skipped, the
    test metrics of the E2E model, of RepL with fresh sites and of RepL
    with fitted sites (before any training)."""

    out_file: str
    sites: List[SiteFit] = field(default_factory=list)
    metrics: Dict[str, dict] = field(default_factory=dict)

    def __str__(self):
        rows = [('backbone', 'site', 'kind', 'fresh err', 'fitted err')]
        rows += [(s.backbone, str(s.index), s.kind, f'{s.fresh_error:.4f}',
                  f'{s.fitted_error:.4f}') for s in self.sites]
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = ['relative fit error ||site(x) - y|| / ||y|| per site:']
        lines += ['  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                  for r in rows]
        names = {'e2e': 'E2E', 'repl_fresh': 'RepL, fresh sites',
                 'repl_fitted': 'RepL, fitted sites'}
        for key, metrics in self.metrics.items():
            vals = ', '.join(f'{k}={v:.2f}' if isinstance(v, float) else
                             f'{k}={v}' for k, v in metrics.items())
            lines.append(f'{names.get(key, key)}: {vals}')
        lines.append(f'saved {self.out_file}')
        return '\n'.join(lines)


def _config(cfg, cfg_options: Optional[dict] = None):
    from mmengine.config import Config
    if isinstance(cfg, str):
        if not osp.isfile(cfg):
            raise FileNotFoundError(f'no config at {cfg!r}')
        cfg = Config.fromfile(cfg)
    else:
        cfg = copy.deepcopy(cfg)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_model(cfg) -> nn.Module:
    """The config's model (with the top-level ``data_preprocessor`` merged
    in, as mmengine's ``Runner`` does), in eval mode on CPU."""
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor', None) is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    return MODELS.build(model_cfg).eval()


def repl_backbones(model: nn.Module) -> Dict[str, nn.Module]:
    """Module name -> RepL backbone, for every one in ``model``."""
    from repl_mm.models.base import RepLBackboneMixin
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, RepLBackboneMixin)
    }


def load_state(path: str) -> Dict[str, Tensor]:
    """The ``state_dict`` of an mmengine (or plain) checkpoint file."""
    from repl_mm.engine import load_mmengine_checkpoint
    if not osp.isfile(path):
        raise FileNotFoundError(f'no checkpoint at {path!r}')
    ckpt = load_mmengine_checkpoint(path)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'{path}: no state_dict in the checkpoint')
    return state


def _listed(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def check_e2e(model: nn.Module, state: Dict[str, Tensor], path: str,
              config_name: str):
    """Raise a ``ValueError`` unless ``state`` is an E2E checkpoint of
    exactly ``model`` (same keys and shapes, no RepL plan)."""
    from repl_mm.models.base import PLAN_KEY, decode_plan
    plans = [k for k in state if k.endswith(PLAN_KEY)]
    if plans:
        plan = decode_plan(state[plans[0]])
        raise ValueError(
            f'{path} is a RepL checkpoint (key {plans[0]}: mode '
            f"{plan.get('config', {}).get('mode')!r}, indices "
            f"{plan.get('indices')}), not an end-to-end one")
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    if missing or unexpected:
        raise ValueError(
            f'checkpoint {path} does not match the E2E config '
            f'{config_name}: missing keys [{_listed(missing)}]; unexpected '
            f'keys [{_listed(unexpected)}]')
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}'
              for k, v in own.items() if state[k].shape != v.shape]
    if shapes:
        raise ValueError(f'checkpoint {path} does not match the E2E config '
                         f'{config_name}: shapes differ (checkpoint vs '
                         f'model): {_listed(shapes)}')


def check_plans(e2e_bbs: Dict[str, nn.Module],
                repl_bbs: Dict[str, nn.Module]):
    """Raise a ``ValueError`` unless the E2E model is the ``mode='none'``
    twin of the RepL one: same RepL backbones, same plans, and a RepL
    mode whose sites can be fitted."""
    if not e2e_bbs:
        raise ValueError('the E2E config has no RepL backbone: use the RepL '
                         "backbone with replacement=dict(mode='none') (the "
                         'E2E twin of the RepL config)')
    if set(e2e_bbs) != set(repl_bbs):
        raise ValueError(f'RepL backbones differ: E2E config has '
                         f'{sorted(e2e_bbs)}, RepL config has '
                         f'{sorted(repl_bbs)}')
    for name, e2e in e2e_bbs.items():
        ep, rp = e2e.replacement_plan, repl_bbs[name].replacement_plan
        if ep.mode != 'none':
            raise ValueError(
                f"E2E config: {name} has replacement mode={ep.mode!r}; the "
                "E2E model must be the mode='none' twin")
        if rp.mode == 'drop':
            raise ValueError(
                f"RepL config: {name} has replacement mode='drop', which "
                'removes the replaced blocks: there is nothing to fit')
        if rp.mode not in FITTABLE_MODES:
            raise ValueError(
                f'RepL config: {name} has replacement mode={rp.mode!r}; '
                f'only modes {FITTABLE_MODES} have sites to fit')
        if (ep.num_blocks, ep.indices) != (rp.num_blocks, rp.indices):
            raise ValueError(
                f'replacement plans differ for {name}: the E2E config '
                f'plans sites {list(ep.indices)} of {ep.num_blocks} blocks, '
                f'the RepL config sites {list(rp.indices)} of '
                f'{rp.num_blocks} blocks (set the same interval/offset/'
                'indices in both)')


def _site_prefixes(model: nn.Module) -> Dict[str, nn.Module]:
    """'backbone.layer1.3.' -> site module, for every site of ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    return {
        names[id(site)] + '.': site
        for bb in repl_backbones(model).values()
        for site in bb.site_modules().values()
    }


@torch.no_grad()
def transfer_state(e2e_state: Dict[str, Tensor],
                   repl_model: nn.Module) -> List[str]:
    """Copy every E2E tensor that the RepL model has under the same name.

    A RepL key missing from the E2E state must belong to a site (a mixing
    weight or fresh norm); an ``InterpolatedBlock``'s own parameters
    (``<site>.block.<name>``) come from the replaced block
    (``<site>.<name>``). An E2E key the RepL model does not use must
    belong to a replaced block.

    Returns:
        list[str]: The RepL keys that kept their fresh values.
    """
    from repl_mm.models.base import PLAN_KEY
    sites = _site_prefixes(repl_model)
    state = repl_model.state_dict()
    fresh, foreign, used, shapes = [], [], set(), []
    for key, value in state.items():
        if key.endswith(PLAN_KEY):
            continue
        prefix = next((p for p in sites if key.startswith(p)), None)
        src = key
        if prefix is not None and isinstance(sites[prefix],
                                             InterpolatedBlock) and \
                key.startswith(prefix + 'block.'):
            src = prefix + key[len(prefix) + len('block.'):]
        if src not in e2e_state:
            (fresh if prefix is not None else foreign).append(key)
            continue
        if e2e_state[src].shape != value.shape:
            shapes.append(f'{key} {tuple(value.shape)} <- {src} '
                          f'{tuple(e2e_state[src].shape)}')
            continue
        value.copy_(e2e_state[src])
        used.add(src)
    unused = [k for k in e2e_state if k not in used and not any(
        k.startswith(p) for p in sites)]
    if foreign or unused or shapes:
        raise ValueError(
            'the E2E and RepL configs differ beyond the replacement: RepL '
            f'keys not in the E2E checkpoint [{_listed(foreign)}]; E2E keys '
            f'the RepL model does not use [{_listed(unused)}]; shape '
            f'mismatches [{_listed(shapes)}]')
    return fresh


def _last_norm(block: nn.Module) -> Optional[nn.Module]:
    """The norm whose output is a ResNet block's residual branch."""
    for name in ('norm3', 'norm2'):
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    return None


@torch.no_grad()
def record_blocks(model: nn.Module, blocks: Dict[str, nn.Module],
                  batches: Iterable[dict]) -> Dict[str, dict]:
    """Run ``batches`` through ``model`` (eval mode, its data
    preprocessor, then ``extract_feat``) and record, per named block, its
    input ``x``, output ``y`` and, for ResNet blocks, residual branch
    ``branch`` (concatenated over the batches)."""
    records = {k: dict(x=[], y=[], branch=[]) for k in blocks}
    hooks = []
    for key, block in blocks.items():

        def on_block(mod, inputs, output, key=key):
            # clone: upstream blocks add and ReLU in place
            records[key]['x'].append(inputs[0].detach().clone())
            records[key]['y'].append(output.detach().clone())

        def on_norm(mod, inputs, output, key=key):
            records[key]['branch'].append(output.detach().clone())

        hooks.append(block.register_forward_hook(on_block))
        norm = _last_norm(block)
        if norm is not None:
            hooks.append(norm.register_forward_hook(on_norm))
    model.eval()
    try:
        for data in batches:
            data = model.data_preprocessor(data, False)
            model.extract_feat(data['inputs'])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for key, rec in records.items():
        if not rec['x']:
            raise ValueError('no batch was recorded (empty dataloader?)')
        out[key] = {
            k: torch.cat(v) if v else None
            for k, v in rec.items()
        }
    return out


def _batches(cfg, split: str, num_batches: int, seed: int):
    from mmengine.runner import Runner
    key = f'{split}_dataloader'
    if cfg.get(key, None) is None:
        raise ValueError(f'the E2E config has no {key}')
    loader = Runner.build_dataloader(copy.deepcopy(cfg[key]), seed=seed)
    for i, data in enumerate(loader):
        if i >= num_batches:
            break
        yield data


def evaluate(cfg, checkpoint: str, work_dir: str, tag: str) -> dict:
    """Test metrics of ``checkpoint`` with ``cfg`` (its test dataloader and
    evaluator), through a ``RepLRunner`` as ``tools/test.py`` runs it."""
    import repl_mm.engine  # noqa: F401  (registers RepLRunner)
    from mmengine.registry import RUNNERS
    cfg = copy.deepcopy(cfg)
    cfg.load_from = checkpoint
    cfg.resume = False
    cfg.launcher = 'none'
    cfg.work_dir = osp.join(work_dir, tag)
    cfg.experiment_name = f'e2e_to_repl_{tag}_{time.time_ns()}'
    cfg.setdefault('runner_type', 'RepLRunner')
    return dict(RUNNERS.build(cfg).test())


def same_file(a: str, b: str) -> bool:
    """Whether the paths ``a`` and ``b`` name one file (links followed;
    a path that does not exist is compared by its real path)."""
    try:
        return osp.samefile(a, b)
    except OSError:
        return osp.realpath(a) == osp.realpath(b)


def check_output(option: str, path: str, inputs: Dict[str, str],
                 force: bool = False):
    """Refuse to write ``path`` over an input or, unless ``force``, over
    any existing file. Run before any work, so a refused run costs
    nothing.

    Args:
        option (str): The option that names ``path`` (for the message).
        path (str): The file to be written.
        inputs (dict[str, str]): Option name -> input path (configs,
            checkpoints) that must never be overwritten.
        force (bool): Allow overwriting an existing file that is not an
            input. Defaults to False.

    Raises:
        ValueError: If ``path`` is an input or a directory.
        FileExistsError: If ``path`` exists and ``force`` is False.
    """
    for name, src in inputs.items():
        if isinstance(src, str) and same_file(path, src):
            raise ValueError(f'{option} {path!r} is the input {name} '
                             f'{src!r}: refusing to overwrite it (choose '
                             'another output path)')
    if osp.isdir(path):
        raise ValueError(f'{option} {path!r} is a directory, expected a '
                         'file path')
    if osp.exists(path) and not force:
        raise FileExistsError(f'{option} {path!r} already exists: pass '
                              'force=True (--force) to overwrite it')


def _plain(value):
    if hasattr(value, 'item') and getattr(value, 'ndim', None) == 0:
        value = value.item()  # numpy / torch scalar
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def convert(e2e_config,
            e2e_checkpoint: str,
            repl_config,
            out_file: str,
            num_batches: int = 4,
            split: str = 'train',
            steps: int = 30,
            max_points: int = 32768,
            evaluate_metrics: bool = True,
            work_dir: Optional[str] = None,
            seed: int = 0,
            cfg_options: Optional[dict] = None,
            force: bool = False) -> ConversionReport:
    """Build a RepL checkpoint from a trained E2E one (module docstring).

    Args:
        e2e_config (str | Config): The E2E config (RepL backbone with
            ``mode='none'``).
        e2e_checkpoint (str): A checkpoint of that model.
        repl_config (str | Config): The RepL config (same backbone and
            plan, ``mode='synthesize'`` or ``'interpolate'``).
        out_file (str): Where to save the RepL checkpoint (mmengine format,
            ``{'state_dict', 'meta'}``).
        num_batches (int): Batches to record. Defaults to 4.
        split (str): ``'train'`` or ``'test'``: the E2E config's dataloader
            to record from. Defaults to ``'train'``.
        steps (int): L-BFGS iterations per site. Defaults to 30.
        max_points (int): Pixels or tokens per site the L-BFGS runs see.
            Defaults to 32768.
        evaluate_metrics (bool): Test the E2E model, RepL with fresh sites
            and RepL with fitted sites. Defaults to True.
        work_dir (str, optional): For the evaluation runners' logs; a
            temporary folder (removed) if None.
        seed (int): Seed of the recording dataloader. Defaults to 0.
        cfg_options (dict, optional): Overrides applied to both configs.
        force (bool): Overwrite ``out_file`` if it exists (never when it
            is one of the inputs). Defaults to False.

    Returns:
        ConversionReport: Per-site errors and the metrics.

    Raises:
        ValueError: If ``out_file`` is an input (checkpoint or config) or
            an option is out of range.
        FileExistsError: If ``out_file`` exists and ``force`` is False.
    """
    check_output(
        'out_file', out_file,
        dict(e2e_checkpoint=e2e_checkpoint, e2e_config=e2e_config,
             repl_config=repl_config), force)
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', but got "
                         f'{split!r}')
    if isinstance(num_batches, bool) or not isinstance(
            num_batches, int) or num_batches < 1:
        raise ValueError(f'num_batches must be an int >= 1, but got '
                         f'{num_batches!r}')
    _check_max_points(max_points)
    from mmengine.logging import print_log

    e2e_name = e2e_config if isinstance(e2e_config, str) else 'E2E config'
    e2e_cfg = _config(e2e_config, cfg_options)
    repl_cfg = _config(repl_config, cfg_options)
    from mmengine.runner import set_random_seed
    set_random_seed(seed)  # the recorded batches (shuffle, augmentation)
    e2e_model, repl_model = build_model(e2e_cfg), build_model(repl_cfg)
    e2e_bbs, repl_bbs = repl_backbones(e2e_model), repl_backbones(repl_model)
    check_plans(e2e_bbs, repl_bbs)
    state = load_state(e2e_checkpoint)
    check_e2e(e2e_model, state, e2e_checkpoint, e2e_name)
    e2e_model.load_state_dict(state, strict=True)
    transfer_state(state, repl_model)

    tmp = tempfile.mkdtemp(prefix='e2e_to_repl_')
    runs = work_dir or tmp
    report = ConversionReport(out_file=out_file)
    meta = dict(
        converted_from=osp.abspath(e2e_checkpoint),
        e2e_config=e2e_name,
        cfg=repl_cfg.pretty_text)
    try:
        if evaluate_metrics:
            fresh = osp.join(tmp, 'repl_fresh.pth')
            torch.save(dict(state_dict=repl_model.state_dict(), meta={}),
                       fresh)
        blocks, sites = {}, {}
        for name, bb in e2e_bbs.items():
            for i, block in bb.site_modules().items():
                blocks[f'{name}/{i}'] = block
                sites[f'{name}/{i}'] = repl_bbs[name].site_modules()[i]
        records = record_blocks(
            e2e_model, blocks,
            _batches(e2e_cfg, split, num_batches, seed))
        for key, site in sites.items():
            name, i = key.rsplit('/', 1)
            rec = records[key]
            before, after = fit_site(site, rec['x'], rec['y'],
                                     rec['branch'], steps, max_points)
            report.sites.append(
                SiteFit(name, int(i), type(site).__name__, before, after))
            print_log(
                f'{name} site {i} ({type(site).__name__}, '
                f"{len(rec['x'])} samples): relative error {before:.4f} "
                f'(fresh) -> {after:.4f} (fitted)',
                logger='current')
        meta['site_fit'] = [vars(s) for s in report.sites]
        out_dir = osp.dirname(osp.abspath(out_file))
        os.makedirs(out_dir, exist_ok=True)
        sd = {k: v.detach().cpu() for k, v in repl_model.state_dict().items()}
        torch.save(dict(state_dict=sd, meta=meta), out_file)
        if evaluate_metrics:
            report.metrics['e2e'] = evaluate(e2e_cfg, e2e_checkpoint, runs,
                                             'e2e')
            report.metrics['repl_fresh'] = evaluate(repl_cfg, fresh, runs,
                                                    'repl_fresh')
            report.metrics['repl_fitted'] = evaluate(repl_cfg, out_file,
                                                     runs, 'repl_fitted')
            report.metrics = {
                k: {m: _plain(v) for m, v in d.items()}
                for k, d in report.metrics.items()
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


__all__ = [
    'ConversionReport', 'SiteFit', 'affine_least_squares', 'build_model',
    'calibrate_norms', 'check_e2e', 'check_output', 'check_plans',
    'chain_matrices', 'convert', 'evaluate', 'fit_chain', 'fit_conv_site',
    'fit_interpolated_block', 'fit_site', 'fit_transformer_site',
    'load_state', 'record_blocks', 'relative_error', 'repl_backbones',
    'same_file', 'transfer_state'
]
