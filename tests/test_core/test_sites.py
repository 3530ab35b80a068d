"""The lean site variants compute the plain computing layer's function:
equal outputs, gradients and BN running statistics, with less kept for
backward."""
import pytest
import torch
from torch import nn

from repl_mm.analysis import SavedTensorMeter
from repl_mm.core import ConvSite, TransformerSite


def conv_site(recompute, shapes=((16, 16), ), residual=True, drop=0.0):
    torch.manual_seed(0)
    srcs = []
    nbrs = []
    for cout, cin in shapes:
        p, n = nn.Conv2d(cin, cout, 3), nn.Conv2d(cin, cout, 3)
        nbrs += [p, n]
        srcs.append([('prev', p), ('next', n)])
    drop_path = _DropPath(drop) if drop else None
    site = ConvSite(
        list(shapes),
        srcs,
        nn.BatchNorm2d(shapes[-1][0]),
        nn.ReLU(inplace=True),
        residual=residual,
        zero_init=False,
        drop_path=drop_path,
        recompute=recompute)
    return site, nbrs


def vit_site(recompute, drop=0.0):
    torch.manual_seed(0)
    d = 8
    lin = {
        k: nn.Linear(*s)
        for k, s in dict(
            q0=(d, 3 * d),
            p0=(d, d),
            f0=(d, 4 * d),
            g0=(4 * d, d),
            q1=(d, 3 * d),
            p1=(d, d),
            f1=(d, 4 * d),
            g1=(4 * d, d)).items()
    }
    src = {
        'attn': [('prev', (lin['q0'], lin['p0'])),
                 ('next', (lin['q1'], lin['p1']))],
        'mlp': [('prev', (lin['f0'], lin['g0'])),
                ('next', (lin['f1'], lin['g1']))]
    }
    site = TransformerSite(
        d,
        src,
        nn.LayerNorm(d),
        nn.GELU(),
        zero_init=False,
        recompute=recompute,
        drop_path=_DropPath(drop) if drop else None)
    return site, list(lin.values())


class _DropPath(nn.Module):
    """Per-sample stochastic depth (timm's), to test RNG replay."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1))) > self.p
        return x * keep / (1 - self.p)


def run(build, shape, **kw):
    """Output, grads (input, site params, neighbour weights), buffers and
    bytes kept for backward of one training step."""
    site, nbrs = build(**kw)
    site.train()
    x = torch.rand(shape, requires_grad=True)
    h = x * 2  # a non-leaf input, as inside a network
    weights = list(site.parameters()) + list(
        site.buffers()) + [p for m in nbrs for p in m.parameters()]
    torch.manual_seed(5)
    with SavedTensorMeter(weights + [x]) as meter:
        out = site(h)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = [x.grad] + [p.grad for p in site.parameters()
                        ] + [m.weight.grad for m in nbrs]
    return out.detach(), grads, [b.clone() for b in site.buffers()], \
        meter.bytes


@pytest.mark.parametrize(
    'kw',
    [
        dict(),
        dict(shapes=((4, 16), (4, 4), (16, 4))),  # Bottleneck-shaped chain
        dict(residual=False),
        dict(drop=0.5),
    ])
def test_conv_site_recompute_is_exact(kw):
    shape = (4, kw.get('shapes', ((16, 16), ))[0][1], 6, 6)
    plain = run(conv_site, shape, recompute=False, **kw)
    lean = run(conv_site, shape, recompute=True, **kw)
    assert torch.allclose(plain[0], lean[0], atol=1e-6)
    for a, b in zip(plain[1], lean[1]):
        assert a is not None and torch.count_nonzero(a) > 0
        assert torch.allclose(a, b, atol=1e-5)
    # running mean/var updated once, num_batches_tracked == 1
    for a, b in zip(plain[2], lean[2]):
        assert torch.equal(a, b)
    assert int(lean[2][-1]) == 1
    # lean keeps h (the checkpoint's input) and out (the activation's),
    # plus the weight-space graph of synthesis (kept, so synthesis is not
    # re-run in backward): per position at most three matrix-sized
    # tensors. plain also keeps x_hat and the norm's input.
    one_map = 4 * 16 * 6 * 6 * 4
    shapes = kw.get('shapes', ((16, 16), ))
    matrices = sum(3 * cout * cin * 4 for cout, cin in shapes)
    assert lean[3] <= 2 * one_map + matrices
    assert plain[3] >= lean[3] + one_map


@pytest.mark.parametrize('drop', [0.0, 0.5])
def test_vit_site_recompute_is_exact(drop):
    plain = run(vit_site, (3, 5, 8), recompute=False, drop=drop)
    lean = run(vit_site, (3, 5, 8), recompute=True, drop=drop)
    assert torch.allclose(plain[0], lean[0], atol=1e-6)
    for a, b in zip(plain[1], lean[1]):
        assert a is not None and torch.count_nonzero(a) > 0
        assert torch.allclose(a, b, atol=1e-5)
    one_map = 3 * 5 * 8 * 4
    # lean keeps h, and the synthesized operators with their weight-space
    # graph (kept so that synthesis is not re-run in backward): no other
    # map-sized tensor
    operators = 2 * 8 * 8 * 4
    graph = 4 * (24 * 8 + 8 * 8 + 32 * 8 + 8 * 32)  # the neighbours' weights
    assert lean[3] <= one_map + operators + graph
    assert plain[3] >= lean[3] + 2 * one_map  # GELU and LN inputs


def test_vit_synthesis_stays_fp32_under_autocast():
    site, nbrs = vit_site(recompute=True)
    h = torch.rand(2, 5, 8, requires_grad=True)
    # A weighted loss: the plain sum of a LayerNorm's output over its
    # width is constant, which would make every site gradient zero.
    weight = torch.linspace(-1, 1, h.numel()).view(h.shape)
    tensors = [h, *site.parameters(), *(m.weight for m in nbrs)]

    def grads(autocast):
        for t in tensors:
            t.grad = None
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            ops = site.synthesize()
            out = site(h)
        assert all(v.dtype == torch.float32 for v in ops.values())
        (out.float() * weight).sum().backward()
        return [t.grad.clone() for t in tensors]

    ref = grads(False)  # fp32
    for g, r in zip(grads(True), ref):
        assert torch.count_nonzero(r) > 0 and torch.count_nonzero(g) > 0
        # bf16 activations: about 1% off for weight-sized gradients; the
        # scalars' (alpha, beta) sum many rounded terms that cancel.
        rel = ((g - r).norm() / r.norm()).item()
        assert rel < (0.3 if r.dim() == 0 else 0.05)
        assert r.dim() or torch.sign(g) == torch.sign(r)
