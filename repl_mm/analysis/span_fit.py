"""The tensor math of the span diagnostic (paper A.10) and of the choice
of sites under a budget (beyond the paper): plain torch functions on
features and numbers, no model, no config, no OpenMMLab import.
:mod:`.span` runs them on a model's block outputs.

**Fit (A.10).** Let :math:`h_k(x)` be the output of residual block ``k``
for image ``x``, flattened. At every *would-be site* ``i`` (a
shape-preserving block with a block before and after it; the last block
is never one) the features are fitted by the span of the neighbours'
features, with coefficients shared over the data set:

.. math::
    (\\tilde a_i, \\tilde b_i) = \\arg\\min_{a, b} \\sum_x
        \\| h_i(x) - a h_{i-1}(x) - b h_{i+1}(x) \\|^2

and reported as the relative reconstruction error and the principal angle
between :math:`H_i` (all images' :math:`h_i` stacked) and its projection
:math:`\\Pi H_i = \\tilde a_i H_{i-1} + \\tilde b_i H_{i+1}`:

.. math::
    r_i = \\frac{\\| H_i - \\Pi H_i \\|}{\\| H_i \\|}, \\qquad
    \\theta_i = \\arccos \\frac{\\langle H_i, \\Pi H_i \\rangle}
        {\\| H_i \\| \\, \\| \\Pi H_i \\|}

(aggregated over the data set; for a least-squares fit
:math:`\\sin \\theta_i = r_i`). The paper's wording also admits the
per-image reading, so the per-image means of
:math:`\\| h_i(x) - \\Pi h_i(x) \\| / \\| h_i(x) \\|` and of the angle
between :math:`h_i(x)` and :math:`\\Pi h_i(x)` (same shared coefficients)
are reported beside them (:func:`fit_span`). Everything follows from the
normal equations, accumulated image by image (:func:`span_moments`,
:class:`SpanAccumulator`): a 2x2 Gram matrix, a 2-vector and
:math:`\\|h_i\\|^2` per image (a few numbers per image and site, kept for
the per-image means; the features themselves are not kept). Where
:math:`h_{i+1}` has another shape than :math:`h_i` (``i`` ends a stage
whose next block down-samples) the span is :math:`h_{i-1}`'s alone (``b``
is None): the RepL site there draws from its previous neighbour only too.

**Choice under a budget (beyond the paper; A.11 models the cost of
interval k, not which blocks).** Given per-block errors and savings, the
chosen sites are the set of would-be sites, no two adjacent (so each
site's neighbours are the diagnosed ``i +- 1``), whose savings meet the
budget with the lowest total error (exact, :func:`choose_sites`). When
non-adjacency does not bind and the savings are equal, these are simply
the blocks with the lowest errors.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

# -- the fit ---------------------------------------------------------------


def span_moments(
        h: Tensor,
        prev: Tensor,
        nxt: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-image moments of the least-squares fit ``h ~ a prev + b nxt``.

    Args:
        h (Tensor): (B, D) features of the block, one row per image.
        prev (Tensor): (B, D) features of the block before.
        nxt (Tensor, optional): (B, D) features of the block after; None
            fits the span of ``prev`` alone.

    Returns:
        tuple[Tensor, Tensor, Tensor]: Gram matrices (B, k, k) of the
        basis (prev[, nxt]), cross products (B, k) of the basis with ``h``
        and squared norms (B, ) of ``h``, in float64; k = 2 (1 without
        ``nxt``).

    Example:
        >>> h = torch.tensor([[1., 2.]])
        >>> g, c, s = span_moments(h, torch.tensor([[1., 0.]]),
        ...                        torch.tensor([[0., 1.]]))
        >>> g.tolist(), c.tolist(), s.tolist()
        ([[[1.0, 0.0], [0.0, 1.0]]], [[1.0, 2.0]], [5.0])
    """
    rows = [prev] if nxt is None else [prev, nxt]
    for name, t in (('prev', prev), ('nxt', nxt)):
        if t is not None and t.shape != h.shape:
            raise ValueError(f'{name} has shape {tuple(t.shape)}, h has '
                             f'{tuple(h.shape)}: both must be (B, D)')
    basis = torch.stack(rows, 1).double()  # k x (B, D) -> (B, k, D)
    h = h.double()
    gram = basis @ basis.transpose(1, 2)  # (B, k, k)
    cross = (basis @ h.unsqueeze(-1)).squeeze(-1)  # (B, k, D)(B, D, 1)->(B, k)
    return gram, cross, (h * h).sum(1)


def _cosine(coef: Tensor, gram: Tensor, cross: Tensor, sq: Tensor) -> Tensor:
    """cos of the angle between h and coef . basis, from moments
    (batched over leading dims); nan where either vector is zero."""
    fit_sq = torch.einsum('...i,...ij,...j->...', coef, gram, coef)
    den = (sq * fit_sq).sqrt()
    dot = (coef * cross).sum(-1)
    return torch.where(den > 0, dot / den.clamp_min(1e-300),
                       torch.full_like(den, math.nan))


def fit_span(gram: Tensor, cross: Tensor, sq: Tensor) -> dict:
    """Least-squares coefficients, relative error and angle from moments.

    .. math::
        w = G^{+} c, \\qquad
        r = \\sqrt{(s - 2 w^T c + w^T G w) / s}, \\qquad
        \\cos\\theta = \\frac{w^T c}{\\sqrt{s \\, w^T G w}}

    Args:
        gram (Tensor): (k, k) Gram matrix summed over the data set, or
            (N, k, k) per image (summed here).
        cross (Tensor): (k, ) or (N, k) cross products.
        sq (Tensor): () or (N, ) squared norms of h.

    Returns:
        dict: ``coef`` (list of k floats; the minimum-norm solution when
        the Gram matrix is singular), ``error`` (r), ``angle`` (degrees),
        and, given per-image moments, ``error_mean`` and ``angle_mean``
        (means over images of the same quantities per image, with the
        shared coefficients; images with h = 0 are left out). ``error``
        and ``angle`` are nan when h is zero on the whole data set.
    """
    per_image = gram.dim() == 3
    g, c, s = (gram.sum(0), cross.sum(0),
               sq.sum(0)) if per_image else (gram, cross, sq)
    g, c, s = g.double(), c.double(), s.double()
    coef = torch.linalg.pinv(g) @ c
    res = (s - 2 * coef @ c + coef @ g @ coef).clamp_min(0)
    out = dict(
        coef=coef.tolist(),
        error=float((res / s).sqrt()) if s > 0 else math.nan,
        angle=float(
            torch.rad2deg(torch.arccos(_cosine(coef, g, c, s).clamp(-1, 1)))))
    if per_image:
        gram, cross, sq = gram.double(), cross.double(), sq.double()
        res_i = (sq - 2 * cross @ coef +
                 torch.einsum('i,nij,j->n', coef, gram, coef)).clamp_min(0)
        ok = sq > 0
        err_i = (res_i[ok] / sq[ok]).sqrt()
        ang_i = torch.rad2deg(
            torch.arccos(
                _cosine(coef, gram[ok], cross[ok], sq[ok]).clamp(-1, 1)))
        out['error_mean'] = float(err_i.mean()) if ok.any() else math.nan
        out['angle_mean'] = float(ang_i.nanmean()) if ok.any() else math.nan
    return out


class SpanAccumulator:
    """Streams :func:`span_moments` of one site over batches.

    Keeps (k*k + k + 1) float64 numbers per image, never the features.

    Example:
        >>> acc = SpanAccumulator()
        >>> prev, nxt = torch.randn(4, 10), torch.randn(4, 10)
        >>> acc.update(0.3 * prev + 0.6 * nxt, prev, nxt)
        >>> [round(v, 4) for v in acc.result()['coef']]
        [0.3, 0.6]
    """

    def __init__(self):
        self._moments: List[Tuple[Tensor, Tensor, Tensor]] = []

    @property
    def num_images(self) -> int:
        return sum(len(m[2]) for m in self._moments)

    def update(self, h: Tensor, prev: Tensor, nxt: Optional[Tensor] = None):
        """Add a batch: (B, ...) features, flattened per image here."""
        self._moments.append(
            span_moments(
                h.flatten(1), prev.flatten(1),
                None if nxt is None else nxt.flatten(1)))

    def result(self) -> dict:
        """:func:`fit_span` over every image added so far."""
        if not self._moments:
            raise ValueError('SpanAccumulator has no images')
        gram, cross, sq = (torch.cat(t) for t in zip(*self._moments))
        return fit_span(gram, cross, sq)


# -- the choice under a budget ---------------------------------------------


def choose_sites(errors: Dict[int, float],
                 savings: Optional[Dict[int, float]],
                 budget: float,
                 option: str = 'num_sites') -> List[int]:
    """Non-adjacent sites meeting a budget with the lowest total error.

    Minimises :math:`\\sum_{i \\in S} r_i` over sets S of candidate blocks
    with no two consecutive indices and :math:`\\sum_{i \\in S} s_i \\ge B`
    (ties: fewer sites, then lower indices), exactly, by dynamic
    programming along the blocks over the Pareto front of (saving, error,
    size); savings above the budget count as the budget. With unit
    savings (``savings=None``) and ``budget=N`` it chooses exactly N
    sites.

    Args:
        errors (dict[int, float]): Candidate block index -> error r_i.
        savings (dict[int, float], optional): Index -> saving s_i (same
            keys). None: every site saves 1 (count sites).
        budget (float): B, > 0.
        option (str): The option the budget came from, for messages.
            Defaults to 'num_sites'.

    Returns:
        list[int]: The chosen indices, ascending.

    Raises:
        ValueError: If no such set reaches the budget (the message gives
            the most any non-adjacent set saves).

    Example:
        >>> choose_sites({2: 0.1, 3: 0.05, 4: 0.2, 6: 0.3}, None, 2)
        [2, 4]
    """
    if savings is None:
        savings = {i: 1.0 for i in errors}
    if set(savings) != set(errors):
        raise ValueError(f'errors and savings must have the same blocks, '
                         f'got {sorted(errors)} and {sorted(savings)}')
    if not budget > 0:
        raise ValueError(f'{option} must be > 0, got {budget}')
    tol = 1e-9 * max(1.0, abs(budget))
    # entries: (capped saving, total error, sites); pruned per step to the
    # Pareto front within two groups: last candidate taken or not.
    front = [(0.0, 0.0, ())]
    for i in sorted(errors):
        taken = [(min(budget, s + savings[i]), e + errors[i], sites + (i, ))
                 for s, e, sites in front if not sites or sites[-1] != i - 1]
        front = _pareto(front) + _pareto(taken)
    done = [f for f in front if f[0] >= budget - tol]
    if not done:
        best = _max_saving(savings)
        raise ValueError(
            f'{option}={budget:g} is unreachable: non-adjacent sites among '
            f'blocks {sorted(errors)} save at most {best:g}')
    return list(min(done, key=lambda f: (f[1], len(f[2]), f[2]))[2])


def _pareto(entries: list) -> list:
    """Entries not dominated in (more saving, less error, fewer sites)."""
    entries = sorted(entries, key=lambda f: (-f[0], f[1], len(f[2]), f[2]))
    kept = []
    for f in entries:
        if not any(k[0] >= f[0] and k[1] <= f[1] and len(k[2]) <= len(f[2])
                   for k in kept):
            kept.append(f)
    return kept


def _max_saving(savings: Dict[int, float]) -> float:
    """Largest total saving of non-adjacent blocks (a max-weight
    independent set on a path)."""
    with_last = without_last = 0.0  # best totals with / without the last
    last = None
    for i in sorted(savings):
        best = max(with_last, without_last)
        base = without_last if last == i - 1 else best
        with_last, without_last = base + savings[i], best
        last = i
    return max(with_last, without_last)


__all__ = ['span_moments', 'fit_span', 'SpanAccumulator', 'choose_sites']
