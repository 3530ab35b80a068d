import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repl_mm.core import ConvSite, TransformerSite
from repl_mm.core.synthesis import (apply_chain, attention_operator,
                                    collapse_kernel, fold_chain, mix_channels,
                                    mlp_operator, should_fold)


def test_collapse_kernel_sums_taps():
    w = torch.arange(2 * 1 * 2 * 2, dtype=torch.float).view(2, 1, 2, 2)
    assert collapse_kernel(w).tolist() == [[6.], [22.]]


def test_mix_channels_is_diag_phi_times_w():
    w1 = torch.ones(2, 3)
    w2 = 2 * torch.ones(2, 3)
    phi1 = torch.tensor([1., 0.])
    phi2 = torch.tensor([0.5, 3.])
    out = mix_channels([(phi1, w1), (phi2, w2)])
    assert out.tolist() == [[2.] * 3, [6.] * 3]
    assert torch.equal(out, torch.diag(phi1) @ w1 + torch.diag(phi2) @ w2)


def test_chain_fold_equals_sequential():
    torch.manual_seed(0)
    mats = [torch.randn(4, 16), torch.randn(4, 4), torch.randn(16, 4)]
    x = torch.randn(2, 16, 5, 5)
    a = apply_chain(x, mats, fold=True)
    b = apply_chain(x, mats, fold=False)
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(fold_chain(mats), mats[2] @ mats[1] @ mats[0])
    # Bottleneck-shaped chains are cheaper unfolded at large maps;
    # square BasicBlock chains are cheaper folded.
    assert not should_fold(mats, 10000)
    assert should_fold([torch.randn(8, 8), torch.randn(8, 8)], 10000)


def test_vit_operators():
    d = 3
    qkv = torch.randn(3 * d, d)
    proj = torch.randn(d, d)
    assert torch.allclose(attention_operator(qkv, proj), proj @ qkv[2 * d:])
    fc1, fc2 = torch.randn(4 * d, d), torch.randn(d, 4 * d)
    assert mlp_operator(fc1, fc2).shape == (d, d)
    assert torch.allclose(mlp_operator(fc1, fc2), fc2 @ fc1)


def test_should_fold_counts_as_documented():
    # Two 8x8 matrices: folding costs 8 * 8 * 8 = 512 once (W_2 @ W_1; W_1
    # itself nothing), then 64 per pixel; the chain 2 * 64 = 128 per
    # pixel. 512 + 64 p < 128 p from p = 9 pixels.
    mats = [torch.randn(8, 8), torch.randn(8, 8)]
    assert not should_fold(mats, 8) and should_fold(mats, 9)
    # 16 -> 4 -> 4 -> 16: once 4*4*16 + 16*4*16, per pixel 256 folded
    # against 144 chained: never cheaper.
    mats = [torch.randn(4, 16), torch.randn(4, 4), torch.randn(16, 4)]
    assert not should_fold(mats, 1) and not should_fold(mats, 10**6)
    assert not should_fold(mats[:1], 10**6)  # one matrix: nothing to fold


def test_mlp_operator_hand_formula():
    # M = W_fc2 @ W_fc1: M[i, j] = sum_k fc2[i, k] * fc1[k, j]
    d = 2
    fc1 = torch.arange(4 * d * d, dtype=torch.float).view(4 * d, d)  # (8, 2)
    fc2 = torch.arange(d * 4 * d, dtype=torch.float).view(d, 4 * d) - 5.
    hand = [[
        sum(fc2[i, k].item() * fc1[k, j].item() for k in range(4 * d))
        for j in range(d)
    ] for i in range(d)]
    assert mlp_operator(fc1, fc2).tolist() == hand
    # the transpose, (fc1^T fc2^T) = M^T, is another matrix here
    assert (fc1.T @ fc2.T).tolist() != hand


def _linears(d):
    """One neighbour layer's weights: qkv (3d, d), proj, fc1, fc2."""
    return dict(
        qkv=nn.Linear(d, 3 * d),
        proj=nn.Linear(d, d),
        fc1=nn.Linear(d, 4 * d),
        fc2=nn.Linear(4 * d, d))


def _matmul(a, b):
    """a @ b written out: out[i, j] = sum_k a[i, k] b[k, j]."""
    return (a[:, :, None] * b[None, :, :]).sum(1)


def _layer_norm(y, gamma, beta, eps):
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean)**2).mean(-1, keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize('num_scalars', [2, 1])
def test_transformer_site_synthesis_hand_formula(num_scalars):
    """Spec §4 written out: A = W_proj W_v with W_v rows 2d..3d of qkv,
    M = W_fc2 W_fc1, Ahat = alpha A_prev + beta A_next (beta = 1 - alpha
    with one scalar), H + scale * LN(GELU(H Mhat^T) + H Ahat^T)."""
    torch.manual_seed(0)
    d = 4
    prev, nxt = _linears(d), _linears(d)
    src = {
        op: [(name, (layer[a], layer[b]))
             for name, layer in (('prev', prev), ('next', nxt))]
        for op, (a, b) in dict(attn=('qkv', 'proj'), mlp=('fc1',
                                                          'fc2')).items()
    }
    site = TransformerSite(
        d,
        src,
        nn.LayerNorm(d),
        nn.GELU(),
        num_scalars=num_scalars,
        zero_init=False,
        scale=0.7)
    with torch.no_grad():
        site.alpha.fill_(0.3)
        if num_scalars == 2:
            site.beta.fill_(0.8)
        site.site_norm.weight.uniform_(0.5, 1.5)
        site.site_norm.bias.uniform_(-0.5, 0.5)
    alpha, beta = 0.3, (0.8 if num_scalars == 2 else 0.7)

    def a_op(layer):
        w_v = layer['qkv'].weight[2 * d:3 * d]  # the V rows
        return _matmul(layer['proj'].weight, w_v)

    def m_op(layer):
        return _matmul(layer['fc2'].weight, layer['fc1'].weight)

    a_hat = alpha * a_op(prev) + beta * a_op(nxt)
    m_hat = alpha * m_op(prev) + beta * m_op(nxt)
    ops = site.synthesize()
    assert torch.allclose(ops['attn'], a_hat, atol=1e-6)
    assert torch.allclose(ops['mlp'], m_hat, atol=1e-6)
    # the Q or K rows give another operator: the test tells them apart
    w_q = prev['qkv'].weight[:d]
    assert not torch.allclose(
        alpha * _matmul(prev['proj'].weight, w_q) + beta * a_op(nxt), a_hat)

    h = torch.randn(2, 3, d)
    y = F.gelu(_matmul(h.view(-1, d), m_hat.T)) + _matmul(
        h.view(-1, d), a_hat.T)
    ln = site.site_norm
    hand = h + 0.7 * _layer_norm(y, ln.weight, ln.bias, ln.eps).view(h.shape)
    assert torch.allclose(site(h), hand, atol=1e-5)


def _spec_conv_site(h, positions, gamma, beta, eps, scale, residual):
    """Spec §3 written out. ``positions``: per conv position, its
    [(phi, neighbour 4-D kernel)] terms."""
    x = h
    for terms in positions:
        w_hat = 0
        for phi, w in terms:
            kh, kw = w.shape[2:]
            s = sum(w[:, :, a, b] for a in range(kh) for b in range(kw))
            w_hat = w_hat + phi[:, None] * s  # diag(phi) S(W)
        # a 1x1, stride-1 conv: out[b, o] = sum_c w_hat[o, c] x[b, c]
        x = (w_hat[None, :, :, None, None] * x[:, None]).sum(2)
    # train-mode BN: batch statistics, biased variance
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean)**2).mean((0, 2, 3), keepdim=True)
    norm = (x - mean) / torch.sqrt(var + eps) * gamma.view(1, -1, 1, 1) + \
        beta.view(1, -1, 1, 1)
    out = scale * norm + h if residual else scale * norm
    return torch.relu(out)


@pytest.mark.parametrize(
    'shapes,residual',
    [
        (((8, 8), (8, 8)), True),  # BasicBlock
        (((4, 8), (4, 4), (8, 4)), True),  # Bottleneck
        (((4, 8), (6, 4)), False),  # residual=False may change channels
    ])
def test_conv_site_forward_hand_formula(shapes, residual):
    torch.manual_seed(0)
    convs = {
        name: [nn.Conv2d(cin, cout, 3) for cout, cin in shapes]
        for name in ('prev', 'next')
    }
    site = ConvSite(
        list(shapes), [[(name, convs[name][j]) for name in ('prev', 'next')]
                       for j in range(len(shapes))],
        nn.BatchNorm2d(shapes[-1][0]),
        nn.ReLU(),
        residual=residual,
        zero_init=False,
        scale=0.7).train()
    with torch.no_grad():
        for p in site.parameters():  # phi, gamma and beta away from init
            p.uniform_(-1.5, 1.5)
    positions = [[(getattr(site, f'phi{j}_{name}'), convs[name][j - 1].weight)
                  for name in ('prev', 'next')]
                 for j in range(1,
                                len(shapes) + 1)]
    h = torch.randn(2, shapes[0][1], 5, 5)
    norm = site.site_norm
    hand = _spec_conv_site(h, positions, norm.weight, norm.bias, norm.eps, 0.7,
                           residual)
    out = site(h)
    assert out.shape == hand.shape
    assert torch.allclose(out, hand, atol=1e-5)


@pytest.mark.parametrize('kernel', [3, None])
def test_pointwise_mix_equals_autograd_and_gradchecks(kernel):
    """The lean mix: value and gradients of collapse + mix, float64
    gradcheck of its hand-written backward, and backward keeps only its
    inputs."""
    from repl_mm.analysis import SavedTensorMeter
    from repl_mm.core.synthesis import pointwise_mix
    torch.manual_seed(0)
    shape = (5, 4, kernel, kernel) if kernel else (5, 4)
    terms = [(torch.rand(5, dtype=torch.float64, requires_grad=True),
              torch.rand(shape, dtype=torch.float64, requires_grad=True)),
             (torch.rand((), dtype=torch.float64, requires_grad=True),
              torch.rand(shape, dtype=torch.float64, requires_grad=True))]
    flat = [t for pair in terms for t in pair]
    assert torch.autograd.gradcheck(
        lambda *t: pointwise_mix(list(zip(t[0::2], t[1::2]))), flat)
    g = torch.rand(5, 4, dtype=torch.float64)
    ref = mix_channels([(p, collapse_kernel(w)) for p, w in terms])
    ref_grads = torch.autograd.grad(ref, flat, g)
    with SavedTensorMeter(flat) as meter:
        out = pointwise_mix(terms)
    assert meter.bytes == 0  # nothing but the inputs
    assert torch.allclose(out, ref)
    for a, b in zip(torch.autograd.grad(out, flat, g), ref_grads):
        assert torch.allclose(a, b)


def test_pointwise_mix_of_half_weights_runs_in_fp32():
    from repl_mm.core.synthesis import pointwise_mix
    phi = torch.full((3, ), 0.5, requires_grad=True)
    w = torch.rand(3, 2, 3, 3).half().requires_grad_()
    out = pointwise_mix([(phi, w)])
    assert out.dtype == torch.float32
    out.sum().backward()
    assert w.grad.dtype == torch.float16 and phi.grad.dtype == torch.float32
    assert torch.allclose(phi.grad, w.float().sum((1, 2, 3)))


@pytest.mark.parametrize('op', ['attn', 'mlp'])
def test_operator_mix_equals_autograd_and_gradchecks(op):
    """The lean ViT operator mix: value and gradients of the products,
    float64 gradcheck of its backward, only its inputs kept."""
    from repl_mm.analysis import SavedTensorMeter
    from repl_mm.core.synthesis import operator_mix
    torch.manual_seed(0)
    d = 4
    fn = attention_operator if op == 'attn' else mlp_operator
    shapes = ((3 * d, d), (d, d)) if op == 'attn' else ((2 * d, d), (d, 2 * d))

    def rand(*shape):
        return torch.rand(shape, dtype=torch.float64, requires_grad=True)

    terms = [(rand(), rand(*shapes[0]), rand(*shapes[1])) for _ in range(2)]
    flat = [t for term in terms for t in term]
    assert torch.autograd.gradcheck(
        lambda *t: operator_mix(op, [t[i:i + 3] for i in range(0, 6, 3)]),
        flat)
    g = torch.rand(d, d, dtype=torch.float64)
    ref = sum(c * fn(w_in, w_out) for c, w_in, w_out in terms)
    ref_grads = torch.autograd.grad(ref, flat, g)
    with SavedTensorMeter(flat) as meter:
        out = operator_mix(op, terms)
    assert meter.bytes == 0
    assert torch.allclose(out, ref)
    for a, b in zip(torch.autograd.grad(out, flat, g), ref_grads):
        assert torch.allclose(a, b)
    with pytest.raises(
            ValueError, match="op must be 'attn' or 'mlp', got "
            "'ffn'"):
        operator_mix('ffn', terms)
