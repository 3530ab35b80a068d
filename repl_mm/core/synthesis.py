"""Weight-space math of RepL as plain functions (spec §3, §4, §9.1).

No module state and no registry imports: each function is testable on tiny
tensors against values worked out by hand.

Grouped positions (spec §9.1, ResNeXt): a position with ``g`` conv groups
is a (Cout, Cin/g) matrix applied as ``F.conv2d(..., groups=g)``, i.e. the
block-diagonal (Cout, Cin) matrix :func:`block_diagonal` expands it to.
Where a function takes ``conv_groups`` (one int per matrix), None means
every matrix is dense (groups 1), which runs exactly the dense code.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

# re-exported (see __all__): callers import the pointwise helpers from here
from .pointwise import (_dense, block_diagonal, chain_product_groups,
                        diagonal_blocks, fold_chain, fold_grouped,
                        fold_grouped_backward, full_shape, grouped_product,
                        grouped_product_backward, pointwise, product_groups,
                        product_macs)


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


def _records_graph(tensors) -> bool:
    return torch.is_grad_enabled() and not torch.jit.is_tracing() and any(
        t.requires_grad for t in tensors)


class _PointwiseMix(torch.autograd.Function):
    """sum_s diag(phi_s) S(W_s) in at least fp32, saving only the inputs.

    Autograd through :func:`collapse_kernel` and :func:`mix_channels`
    would keep every S(W_s) (and its fp32 copy for a narrower weight), a
    (Cout, Cin) tensor per neighbour and position, alive for backward;
    this keeps the inputs (the parameters, alive anyway) and sums the taps
    again in backward, which costs Cout * Cin * k * k additions.
    """

    @staticmethod
    def forward(ctx, *terms: Tensor) -> Tensor:
        phis, weights = terms[0::2], terms[1::2]
        if ctx is not None:
            ctx.save_for_backward(*terms)
        return mix_channels([(at_least_fp32(phi),
                              collapse_kernel(at_least_fp32(w)))
                             for phi, w in zip(phis, weights)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        terms = ctx.saved_tensors
        grads = []
        for i in range(0, len(terms), 2):
            phi, w = terms[i], terms[i + 1]
            g_phi = g_w = None
            if ctx.needs_input_grad[i]:
                s = collapse_kernel(at_least_fp32(w))
                g_phi = (grad * s).sum(dim=1) if phi.dim() == 1 else \
                    (grad * s).sum()
                g_phi = g_phi.reshape(phi.shape).to(phi.dtype)
            if ctx.needs_input_grad[i + 1]:
                p = at_least_fp32(phi)
                g = grad * (p[:, None] if p.dim() == 1 else p)
                if w.dim() == 4:  # the same gradient reaches every tap
                    g = g[:, :, None, None].expand(w.shape)
                g_w = g.to(w.dtype)
            grads += [g_phi, g_w]
        return tuple(grads)


def pointwise_mix(terms: Sequence) -> Tensor:
    """``mix_channels`` of the collapsed neighbour kernels, in at least
    fp32: What = sum_s diag(phi_s) S(W_s) (spec §3).

    Same value and gradients as
    ``mix_channels([(at_least_fp32(phi), collapse_kernel(at_least_fp32(w)))
    ...])``, but backward keeps only the inputs (no (Cout, Cin) copy per
    neighbour).

    Args:
        terms (Sequence[tuple[Tensor, Tensor]]): Pairs ``(phi, W)``: phi of
            shape (Cout,) or a scalar, W a (Cout, Cin, kh, kw) kernel or a
            (Cout, Cin) matrix.

    Example:
        >>> w = torch.ones(2, 1, 3, 3)
        >>> pointwise_mix([(torch.tensor([1., 0.5]), w)]).tolist()
        [[9.0], [4.5]]
    """
    if not terms:
        raise ValueError('pointwise_mix needs at least one term')
    if not _records_graph(t for pair in terms for t in pair):
        # Plain ops where nothing is saved anyway: FLOP counters and
        # tracers see through them.
        return _PointwiseMix.forward(None, *(t for p in terms for t in p))
    return _PointwiseMix.apply(*(t for pair in terms for t in pair))


def chain_macs(mats: Sequence[Tensor]) -> int:
    """Multiply-adds per pixel of applying the chain one matrix at a time."""
    return sum(w.shape[0] * w.shape[1] for w in mats)


def folded_macs(mats: Sequence[Tensor]) -> int:
    """Multiply-adds per pixel of the folded chain."""
    return mats[-1].shape[0] * mats[0].shape[1]


def should_fold(mats: Sequence[Tensor],
                pixels: int,
                conv_groups: Optional[Sequence[int]] = None) -> bool:
    """Whether folding the chain in weight space costs fewer multiply-adds.

    Folding (:func:`fold_chain`: W_1, then W_j @ (W_{j-1} ... W_1) for
    j = 2..J) costs ``sum_{j=2..J} Cout_j * Cin_j * Cin_1`` once (it does
    not grow with the batch; W_1 itself costs nothing) and then
    ``Cout_J * Cin_1`` per pixel; the chain costs ``sum_{j=1..J} Cout_j *
    Cin_j`` per pixel. A single matrix is never "folded". With
    ``conv_groups``, every count is the grouped one (:func:`grouping_macs`).

    Args:
        mats (Sequence[Tensor]): The (Cout_j, Cin_j / g_j) matrices,
            j = 1..J.
        pixels (int): Pixels the chain is applied to (B x H x W).
        conv_groups (Sequence[int], optional): g_j. Defaults to all 1.
    """
    if len(mats) == 1:
        return False
    if not _dense(conv_groups):
        shapes = [full_shape(w, g) for w, g in zip(mats, conv_groups)]
        folded = ((0, len(mats)), )
        chain = tuple((j, j + 1) for j in range(len(mats)))
        return grouping_macs(shapes, folded, pixels, conv_groups) < \
            grouping_macs(shapes, chain, pixels, conv_groups)
    fold_once = 0
    cin = mats[0].shape[1]
    for w in mats[1:]:
        fold_once += w.shape[0] * w.shape[1] * cin
    return fold_once + pixels * folded_macs(mats) < pixels * chain_macs(mats)


def apply_chain(x: Tensor,
                mats: Sequence[Tensor],
                fold: Optional[bool] = None,
                conv_groups: Optional[Sequence[int]] = None) -> Tensor:
    """x_hat = W_J(...(W_1 x)) on a (B, C, H, W) map, in the cheaper order.

    Args:
        x (Tensor): (B, Cin_1, H, W).
        mats (Sequence[Tensor]): (Cout_j, Cin_j / g_j) matrices, Cin_{j+1}
            = Cout_j.
        fold (bool, optional): Force folding (True) or the chain (False);
            None picks the cheaper by multiply-adds. Same function either
            way (up to float rounding).
        conv_groups (Sequence[int], optional): The groups g_j of each
            matrix. Defaults to all 1.
    """
    if fold is None:
        fold = should_fold(mats, x.shape[0] * x.shape[2] * x.shape[3],
                           conv_groups)
    if _dense(conv_groups):
        if fold:
            return pointwise(x, fold_chain(mats))
        for w in mats:
            x = pointwise(x, w)
        return x
    if fold:
        return pointwise(x, *fold_grouped(mats, conv_groups))
    for w, g in zip(mats, conv_groups):
        x = pointwise(x, w, g)
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


class _ProductMix(torch.autograd.Function):
    """sum_s c_s W_out,s @ W_in,s in at least fp32, saving only the inputs
    (the scalars and the parameters); backward forms the products again
    (for the scalars' gradients) instead of keeping a (d, d) product per
    neighbour alive."""

    @staticmethod
    def forward(ctx, value: bool, *terms: Tensor) -> Tensor:
        if ctx is not None:
            ctx.value = value
            ctx.save_for_backward(*terms)
        out = None
        for i in range(0, len(terms), 3):
            c, w_in, w_out = terms[i:i + 3]
            t = at_least_fp32(c) * (
                at_least_fp32(w_out) @ _rows(at_least_fp32(w_in), value))
            out = t if out is None else out + t
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        terms = ctx.saved_tensors
        grads = [None]
        for i in range(0, len(terms), 3):
            c, w_in, w_out = terms[i:i + 3]
            c32, w_out32 = at_least_fp32(c), at_least_fp32(w_out)
            v32 = _rows(at_least_fp32(w_in), ctx.value)
            g_c = g_in = g_out = None
            if ctx.needs_input_grad[i + 1]:
                g_c = (grad * (w_out32 @ v32)).sum().to(c.dtype)
            if ctx.needs_input_grad[i + 2]:
                g_v = c32 * (w_out32.t() @ grad)
                if ctx.value:
                    g_in = torch.zeros_like(w_in)
                    g_in[2 * w_in.shape[1]:] = g_v.to(w_in.dtype)
                else:
                    g_in = g_v.to(w_in.dtype)
            if ctx.needs_input_grad[i + 3]:
                g_out = (c32 * (grad @ v32.t())).to(w_out.dtype)
            grads += [g_c, g_in, g_out]
        return tuple(grads)


def _rows(w_in: Tensor, value: bool) -> Tensor:
    return value_weight(w_in) if value else w_in


def operator_mix(op: str, terms: Sequence) -> Tensor:
    """sum_s c_s A_s (``op='attn'``, A = W_proj @ W_v) or sum_s c_s M_s
    (``op='mlp'``, M = W_fc2 @ W_fc1), in at least fp32 (spec §4).

    Same value and gradients as ``sum(c * attention_operator(qkv, proj))``
    (or ``mlp_operator``) in at least fp32, but backward keeps only the
    inputs: no (d, d) product per neighbour.

    Args:
        op (str): ``'attn'`` or ``'mlp'``.
        terms (Sequence[tuple[Tensor, Tensor, Tensor]]): ``(c, W_in,
            W_out)``: a scalar coefficient, then (qkv, proj) or (fc1, fc2)
            weights.

    Example:
        >>> fc1, fc2 = torch.eye(2).repeat(2, 1), torch.ones(2, 4)
        >>> operator_mix('mlp', [(torch.tensor(0.5), fc1, fc2)]).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    if op not in ('attn', 'mlp'):
        raise ValueError(f"op must be 'attn' or 'mlp', got {op!r}")
    if not terms:
        raise ValueError('operator_mix needs at least one term')
    if op == 'attn':
        for _, w_in, _ in terms:
            value_weight(w_in)  # checks the fused qkv shape
    flat = [t for term in terms for t in term]
    if not _records_graph(flat):
        # Plain ops where nothing is saved anyway (FLOP counters, tracers)
        return _ProductMix.forward(None, op == 'attn', *flat)
    return _ProductMix.apply(op == 'attn', *flat)


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


def fold_affine(weight: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
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


def chain_groupings(n: int) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """Every way to cut a chain of ``n`` matrices into contiguous groups,
    as tuples of half-open ``(start, stop)`` index ranges, the plain chain
    (one matrix a group) first and the fully folded chain last; 2^(n-1)
    of them (n = 3: sequential, (W3 W2) W1, W3 (W2 W1), W3 W2 W1).

    Example:
        >>> chain_groupings(2)
        (((0, 1), (1, 2)), ((0, 2),))
    """
    if n < 1:
        raise ValueError('a chain has at least one matrix')
    out = []
    for mask in range(2**(n - 1) - 1, -1, -1):
        # bit i set: cut between matrix i and i + 1
        cuts = [i + 1 for i in range(n - 1) if mask >> i & 1]
        bounds = [0] + cuts + [n]
        out.append(tuple(zip(bounds[:-1], bounds[1:])))
    return tuple(out)


def grouping_macs(shapes: Sequence[Tuple[int, int]],
                  groups: Sequence[Tuple[int, int]],
                  pixels: int,
                  conv_groups: Optional[Sequence[int]] = None) -> int:
    """Multiply-adds of applying a chain cut into ``groups`` to ``pixels``
    pixels: each group folded once as :func:`fold_chain` does (W_a, then
    W_j @ (...) for j = a+1..b-1: ``sum Cout_j * Cin_j * Cin_a``), then
    ``Cout_{b-1} * Cin_a`` per pixel for the group.

    With ``conv_groups`` each count is what the grouped computation
    costs (spec §9.1): a folded group as :func:`fold_grouped` computes it
    (:func:`product_macs` per product), then ``Cout_{b-1} * Cin_a / g``
    per pixel for a result with g groups (a lone grouped position:
    ``Cout_j * Cin_j / g_j``).

    Args:
        shapes (Sequence[tuple[int, int]]): Full (Cout_j, Cin_j), j = 1..J.
        groups (Sequence[tuple[int, int]]): ``(start, stop)`` ranges, as
            :func:`chain_groupings` gives them.
        pixels (int): B x H x W.
        conv_groups (Sequence[int], optional): g_j. Defaults to all 1.
    """
    total = 0
    if _dense(conv_groups):
        for start, stop in groups:
            cin = shapes[start][1]
            total += sum(shapes[j][0] * shapes[j][1] * cin
                         for j in range(start + 1, stop))
            total += pixels * shapes[stop - 1][0] * cin
        return total
    for start, stop in groups:
        acc, g = shapes[start], conv_groups[start]
        for j in range(start + 1, stop):
            total += product_macs(shapes[j], conv_groups[j], acc, g)
            acc, g = (shapes[j][0], acc[1]), product_groups(conv_groups[j], g)
        total += pixels * acc[0] * acc[1] // g
    return total


def best_grouping(
    mats: Sequence[Tensor],
    pixels: int,
    conv_groups: Optional[Sequence[int]] = None
) -> Tuple[Tuple[int, int], ...]:
    """The cheapest way by multiply-adds (:func:`grouping_macs`) to cut
    the chain into folded groups (:func:`chain_groupings`), a tie going to
    the grouping listed first there (the plain chain before any folding).
    For two matrices this folds exactly when :func:`should_fold` does.

    Args:
        mats (Sequence[Tensor]): The (Cout_j, Cin_j / g_j) matrices,
            j = 1..J.
        pixels (int): B x H x W.
        conv_groups (Sequence[int], optional): g_j: a grouped position is
            counted at its true cost. Defaults to all 1.
    """
    if _dense(conv_groups):
        conv_groups = None
        shapes = [(int(w.shape[0]), int(w.shape[1])) for w in mats]
    else:
        shapes = [full_shape(w, g) for w, g in zip(mats, conv_groups)]
    best, best_macs = None, None
    for groups in chain_groupings(len(shapes)):  # a loop: dynamo 2.1
        macs = grouping_macs(shapes, groups, pixels,
                             conv_groups)  # traces no min(key=)
        if best_macs is None or macs < best_macs:
            best, best_macs = groups, macs
    return best


def fold_groups(mats: Sequence[Tensor],
                groups: Sequence[Tuple[int, int]],
                conv_groups: Optional[Sequence[int]] = None) -> list:
    """One matrix per group: :func:`fold_chain` of ``mats[start:stop]``
    (:func:`fold_grouped` with ``conv_groups``; their groups are
    :func:`folded_conv_groups`)."""
    if _dense(conv_groups):
        return [fold_chain(mats[start:stop]) for start, stop in groups]
    return [
        fold_grouped(mats[start:stop], conv_groups[start:stop])[0] if stop -
        start > 1 else mats[start] for start, stop in groups
    ]


def folded_conv_groups(conv_groups: Optional[Sequence[int]],
                       groups: Sequence[Tuple[int, int]]) -> Tuple[int, ...]:
    """The conv groups of each matrix :func:`fold_groups` gives."""
    if conv_groups is None:
        return (1, ) * len(groups)
    return tuple(
        chain_product_groups(conv_groups[start:stop])
        for start, stop in groups)


__all__ = [
    'apply_chain',
    'at_least_fp32',
    'attention_operator',
    'batch_norm_affine',
    'best_grouping',
    'block_diagonal',
    'chain_groupings',
    'chain_macs',
    'chain_product_groups',
    'collapse_kernel',
    'diagonal_blocks',
    'fold_affine',
    'fold_chain',
    'fold_grouped',
    'fold_grouped_backward',
    'fold_groups',
    'folded_conv_groups',
    'folded_macs',
    'full_shape',
    'grouped_product',
    'grouped_product_backward',
    'grouping_macs',
    'mix_channels',
    'mlp_operator',
    'operator_mix',
    'pointwise',
    'pointwise_mix',
    'product_groups',
    'product_macs',
    'should_fold',
    'value_weight',
]
