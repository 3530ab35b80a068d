"""Recomputation in backward (repl_mm.core.recompute): several backward
passes through one graph, and the run-time checkpoint classes pickle."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from repl_mm.core import ConvSite, TransformerSite
from repl_mm.core import recompute as cp
from repl_mm.core.recompute import (FrozenBuffers, fuse_into_segment,
                                    use_non_reentrant_checkpoint)
from .test_sites import conv_site, vit_site

BUILDERS = {
    'conv': (conv_site, (4, 16, 6, 6)),
    'bottleneck':
    (lambda **kw: conv_site(shapes=((4, 16), (4, 4),
                                    (16, 4)), **kw), (4, 16, 6, 6)),
    'vit': (vit_site, (3, 5, 8)),
}


def passes(kind, recompute, n, drop=0.0, grad_first=False):
    """Gradients (input, site params, neighbour weights) accumulated over
    ``n`` backward passes through one graph, and the site's buffers."""
    build, shape = BUILDERS[kind]
    site, nbrs = build(recompute=recompute, drop=drop)
    site.train()
    x = torch.rand(shape, requires_grad=True)
    torch.manual_seed(5)
    out = site(x * 2)
    loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
    if grad_first:  # a gradient penalty's pattern: grad, then backward
        (gx, ) = torch.autograd.grad(loss, x, retain_graph=True)
        assert torch.count_nonzero(gx) > 0
        n -= 1
    for i in range(n):
        loss.backward(retain_graph=i < n - 1)
    grads = [x.grad] + [p.grad for p in site.parameters()
                        ] + [m.weight.grad for m in nbrs]
    return grads, [b.clone() for b in site.buffers()]


@pytest.mark.parametrize('drop', [0.0, 0.5])
@pytest.mark.parametrize('kind', sorted(BUILDERS))
def test_second_backward_through_a_recomputing_site(kind, drop):
    once, _ = passes(kind, True, 1, drop)
    twice, buffers = passes(kind, True, 2, drop)
    plain, plain_buffers = passes(kind, False, 2, drop)
    for a, b, c in zip(once, twice, plain):
        assert a is not None and torch.count_nonzero(a) > 0
        assert torch.allclose(2 * a, b, atol=1e-5)
        assert torch.allclose(b, c, atol=1e-5)
    # the norm's statistics are updated by the forward only
    for a, b in zip(buffers, plain_buffers):
        assert torch.equal(a, b)


@pytest.mark.parametrize('kind', ['conv', 'vit'])
def test_grad_then_backward_through_a_recomputing_site(kind):
    lean, _ = passes(kind, True, 2, grad_first=True)
    plain, _ = passes(kind, False, 2, grad_first=True)
    for a, b in zip(lean, plain):
        assert a is not None and torch.allclose(a, b, atol=1e-5)


def _gradcheck(site, h, nbrs):
    params = [*site.parameters()] + [m.weight for m in nbrs]
    assert site.recompute
    # gradcheck perturbs the parameters in place and differentiates once
    # per output element: many backward passes through one graph.
    assert torch.autograd.gradcheck(lambda h, *ps: site(h), (h, *params))


def test_gradcheck_conv_site_float64():
    torch.manual_seed(0)
    # a Bottleneck-shaped chain 3 -> 2 -> 3 with both neighbours
    nbrs = [
        nn.Conv2d(3, 2, 3).double(),
        nn.Conv2d(2, 3, 3).double(),
        nn.Conv2d(3, 2, 3).double(),
        nn.Conv2d(2, 3, 3).double()
    ]
    site = ConvSite([(2, 3), (3, 2)],
                    [[('prev', nbrs[0]),
                      ('next', nbrs[2])], [('prev', nbrs[1]),
                                           ('next', nbrs[3])]],
                    nn.BatchNorm2d(3),
                    nn.ReLU(),
                    zero_init=False,
                    scale=0.7).double().train()
    with torch.no_grad():
        for p in site.parameters():
            p.uniform_(0.2, 1.5)
    h = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    _gradcheck(site, h, nbrs)


def test_gradcheck_transformer_site_float64():
    torch.manual_seed(0)
    d = 4
    nbrs = [
        nn.Linear(d, 3 * d),
        nn.Linear(d, d),
        nn.Linear(d, 4 * d),
        nn.Linear(4 * d, d),
        nn.Linear(d, 3 * d),
        nn.Linear(d, d),
        nn.Linear(d, 4 * d),
        nn.Linear(4 * d, d)
    ]
    nbrs = [m.double() for m in nbrs]
    src = {
        'attn': [('prev', (nbrs[0], nbrs[1])), ('next', (nbrs[4], nbrs[5]))],
        'mlp': [('prev', (nbrs[2], nbrs[3])), ('next', (nbrs[6], nbrs[7]))]
    }
    site = TransformerSite(
        d, src, nn.LayerNorm(d), nn.GELU(), zero_init=False,
        scale=0.7).double()
    with torch.no_grad():
        site.alpha.fill_(0.3)
        site.beta.fill_(0.8)
        site.site_norm.weight.uniform_(0.5, 1.5)
        site.site_norm.bias.uniform_(-0.5, 0.5)
    h = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    _gradcheck(site, h, nbrs)


def test_frozen_buffers_is_reusable():
    bn = nn.BatchNorm1d(2)
    ctx = FrozenBuffers(bn)
    for _ in range(3):
        with ctx:
            bn(torch.rand(4, 2))
            with ctx:  # re-entrant too
                bn(torch.rand(4, 2))
            assert int(bn.num_batches_tracked) == 1
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_mean, torch.zeros(2))


class Block(nn.Module):
    """A residual block with an upstream-style ``with_cp`` flag."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.with_cp = False

    def forward(self, x):
        return self.relu(self.bn(self.conv1(x)) + x)


# Another upstream class of that name, in another module.
OtherBlock = type('Block', (Block, ), {'__module__': 'elsewhere.blocks'})


def segment_net():
    """block, site (fused into the block's checkpoint segment), block."""
    torch.manual_seed(0)
    b1, b2 = Block(), Block()
    site = ConvSite([(4, 4)], [[('prev', b1.conv1), ('next', b2.conv1)]],
                    nn.BatchNorm2d(4),
                    nn.ReLU(),
                    zero_init=False)
    for b in (b1, b2):
        b.with_cp = True
        use_non_reentrant_checkpoint(b)
    fuse_into_segment(b1, site)
    return nn.Sequential(b1, site, b2)


def test_with_cp_segment_second_backward():
    net = segment_net().train()
    x = torch.rand(2, 4, 5, 5, requires_grad=True)
    loss = (net(x) * torch.linspace(-1, 1, 200).view(2, 4, 5, 5)).sum()
    loss.backward(retain_graph=True)
    once = [x.grad.clone()] + [p.grad.clone() for p in net.parameters()]
    loss.backward()
    twice = [x.grad] + [p.grad for p in net.parameters()]
    for a, b in zip(once, twice):
        assert torch.count_nonzero(a) > 0
        assert torch.allclose(2 * a, b, atol=1e-5)
    assert int(net[0].bn.num_batches_tracked) == 1
    assert int(net[1].site_norm.num_batches_tracked) == 1


def _roundtrips(net):
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    yield torch.load(buf, weights_only=False)
    yield pickle.loads(pickle.dumps(net))
    yield pickle.loads(pickle.dumps(net, protocol=0))
    yield copy.deepcopy(net)


def test_checkpoint_classes_pickle():
    net = segment_net().eval()
    name = type(net[0]).__name__
    assert name == 'NonReentrant_tests_test_core_test_recompute_Block'
    assert getattr(cp, name) is type(net[0])
    x = torch.rand(2, 4, 5, 5)
    ref = net(x)
    for copied in _roundtrips(net):
        assert type(copied[0]) is type(net[0])
        assert isinstance(copied[0], Block) and copied[0].with_cp
        # the fused site is the copy's own, and reads the copy's blocks
        assert copied[0].repl_tail[0] is copied[1]
        assert copied[1]._sources[0][0][1] is copied[0].conv1
        assert torch.equal(copied(x), ref)


def test_checkpoint_class_names_are_unique():
    a = use_non_reentrant_checkpoint(Block())
    b = use_non_reentrant_checkpoint(OtherBlock())
    assert type(a) is not type(b)
    assert type(a).__name__ != type(b).__name__
    assert type(b).__name__ == 'NonReentrant_elsewhere_blocks_Block'
    assert type(use_non_reentrant_checkpoint(Block())) is type(a)
