"""The lean site updates (repl_mm.core.lean): exact gradients, the plain
computation's outputs, gradients and norm statistics, no more kept for
backward than the checkpoint they replace, and the cases that keep the
checkpoint."""
import copy

import pytest
import torch
from mmcv.cnn.bricks.drop import DropPath
from torch import nn

from repl_mm.analysis import SavedTensorMeter
from repl_mm.core import ConvSite, TransformerSite
from repl_mm.core import lean as lean_mod
from repl_mm.core.lean import ConvUpdate, TokenUpdate
from repl_mm.core.synthesis import best_grouping, chain_groupings, should_fold
from repl_mm.utils.compat import TORCH_VERSION

BOTTLENECK = ((4, 16), (4, 4), (16, 4))


def _mask(b, zero=1):
    """A drop-path-like factor of shape (B, 1, 1, 1): sample ``zero``
    dropped, the others kept at 1 / keep."""
    k = torch.full((b, 1, 1, 1), 2.0, dtype=torch.float64)
    k[zero] = 0
    return k


# -- gradcheck of the Functions ---------------------------------------------


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('drop', [False, True])
@pytest.mark.parametrize('shapes,groups', [
    (((3, 3), ), ((0, 1), )),
    (((2, 3), (2, 2), (3, 2)), ((0, 1), (1, 2), (2, 3))),
    (((2, 3), (2, 2), (3, 2)), ((0, 2), (2, 3))),
    (((2, 3), (2, 2), (3, 2)), ((0, 1), (1, 3))),
    (((2, 3), (2, 2), (3, 2)), ((0, 3), )),
])
def test_gradcheck_conv_update(shapes, groups, drop, train):
    torch.manual_seed(0)
    dt = torch.float64
    h = torch.randn(3, shapes[0][1], 2, 3, dtype=dt, requires_grad=True)
    mats = [torch.randn(s, dtype=dt, requires_grad=True) for s in shapes]
    c = shapes[-1][0]
    gamma = torch.rand(c, dtype=dt, requires_grad=True) + 0.5
    beta = torch.randn(c, dtype=dt, requires_grad=True)
    k = _mask(3) * 0.7 if drop else torch.tensor(0.7, dtype=dt)
    rm, rv = torch.randn(c, dtype=dt), torch.rand(c, dtype=dt) + 0.5

    def fn(h, gamma, beta, *mats):
        # batch statistics without running ones: gradcheck calls this many
        # times, the running update is checked elsewhere
        return ConvUpdate.apply(h, k, gamma, beta, None if train else rm,
                                None if train else rv, train, 0.1, 1e-5,
                                groups, *mats)

    assert torch.autograd.gradcheck(fn, (h, gamma, beta, *mats))


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
@pytest.mark.parametrize('drop', [False, True])
def test_gradcheck_token_update(drop, approximate):
    torch.manual_seed(0)
    dt = torch.float64
    d = 4
    h = torch.randn(3, 2, d, dtype=dt, requires_grad=True)
    attn, mlp = (
        torch.randn(d, d, dtype=dt, requires_grad=True) for _ in range(2))
    gamma = torch.rand(d, dtype=dt, requires_grad=True) + 0.5
    beta = torch.randn(d, dtype=dt, requires_grad=True)
    k = _mask(3).view(3, 1, 1) * 0.7 if drop else torch.tensor(0.7, dtype=dt)

    def fn(h, attn, mlp, gamma, beta):
        return TokenUpdate.apply(h, k, attn, mlp, gamma, beta, 1e-5,
                                 approximate)

    assert torch.autograd.gradcheck(fn, (h, attn, mlp, gamma, beta))


def test_gradcheck_conv_site_residual_false_float64():
    site, nbrs = conv_site(recompute=True, shapes=BOTTLENECK, residual=False)
    site.double().train()
    for m in nbrs:
        m.double()
    h = torch.rand(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in site.parameters()] + [m.weight for m in nbrs]
    with Spy() as spy:
        assert torch.autograd.gradcheck(lambda h, *ps: site(h), (h, *params))
    assert spy.calls['ConvUpdate']


# -- the sites against the plain computation --------------------------------


class Spy:
    """Count calls of the lean Functions."""

    def __enter__(self):
        self.calls = {'ConvUpdate': 0, 'TokenUpdate': 0}
        self._orig = {}
        for name in self.calls:
            fn = getattr(lean_mod, name)
            self._orig[name] = fn.apply

            def apply(*args, _name=name, _fn=fn.apply):
                self.calls[_name] += 1
                return _fn(*args)

            fn.apply = apply
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            getattr(lean_mod, name).apply = orig
        return False


def conv_site(recompute,
              shapes=((16, 16), ),
              residual=True,
              drop=0.0,
              norm=None,
              drop_path=None):
    torch.manual_seed(0)
    srcs, nbrs = [], []
    for cout, cin in shapes:
        p, n = nn.Conv2d(cin, cout, 3), nn.Conv2d(cin, cout, 3)
        nbrs += [p, n]
        srcs.append([('prev', p), ('next', n)])
    if drop_path is None and drop:
        drop_path = DropPath(drop)
    site = ConvSite(
        list(shapes),
        srcs,
        norm if norm is not None else nn.BatchNorm2d(shapes[-1][0]),
        nn.ReLU(inplace=True),
        residual=residual,
        zero_init=False,
        drop_path=drop_path,
        recompute=recompute)
    return site, nbrs


def vit_site(recompute, drop=0.0, norm=None, act=None, d=8):
    torch.manual_seed(0)
    lin = {}
    for i in range(2):
        lin.update({
            f'q{i}': nn.Linear(d, 3 * d),
            f'p{i}': nn.Linear(d, d),
            f'f{i}': nn.Linear(d, 4 * d),
            f'g{i}': nn.Linear(4 * d, d)
        })
    src = {
        'attn': [(n, (lin[f'q{i}'], lin[f'p{i}']))
                 for i, n in enumerate(('prev', 'next'))],
        'mlp': [(n, (lin[f'f{i}'], lin[f'g{i}']))
                for i, n in enumerate(('prev', 'next'))]
    }
    site = TransformerSite(
        d,
        src,
        norm if norm is not None else nn.LayerNorm(d),
        act if act is not None else nn.GELU(),
        zero_init=False,
        recompute=recompute,
        drop_path=DropPath(drop) if drop else None)
    return site, list(lin.values())


def run(build, shape, passes=1, train=True, autocast=False, **kw):
    """Output, grads (input, site params, neighbour weights) after
    ``passes`` backward passes through one graph, buffers, bytes kept for
    backward, and the lean Functions' calls."""
    site, nbrs = build(**kw)
    site.train(train)
    x = torch.rand(shape, requires_grad=True)
    h = x * 2  # a non-leaf input, as inside a network
    weights = list(site.parameters()) + list(
        site.buffers()) + [p for m in nbrs for p in m.parameters()]
    torch.manual_seed(5)
    with Spy() as spy, SavedTensorMeter(weights + [x]) as meter, \
            torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = site(h)
    loss = (out.float() *
            torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
    for i in range(passes):
        loss.backward(retain_graph=i < passes - 1)
    grads = [x.grad] + [p.grad for p in site.parameters()
                        ] + [m.weight.grad for m in nbrs]
    return dict(
        out=out.detach(),
        grads=grads,
        buffers=[b.clone() for b in site.buffers()],
        bytes=meter.bytes,
        calls=spy.calls)


def assert_same(ref, got, atol=1e-6, rtol=1e-5, exact_buffers=True):
    assert torch.allclose(ref['out'], got['out'], atol=atol, rtol=rtol)
    for a, b in zip(ref['grads'], got['grads']):
        assert a is not None and torch.count_nonzero(a) > 0
        assert torch.allclose(a, b, atol=10 * atol, rtol=rtol)
    for a, b in zip(ref['buffers'], got['buffers']):
        if exact_buffers:
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, atol=atol, rtol=rtol)


CONV_CASES = {
    'basic': dict(),
    'basic2': dict(shapes=((16, 16), (16, 16))),  # folded at this size
    'bottleneck': dict(shapes=BOTTLENECK),
    'residual_false': dict(residual=False),
    'drop': dict(drop=0.5),
    'bottleneck_drop': dict(shapes=BOTTLENECK, drop=0.5),
    'momentum_none': dict(norm=nn.BatchNorm2d(16, momentum=None)),
    'untracked': dict(norm=nn.BatchNorm2d(16, track_running_stats=False)),
    'no_affine': dict(norm=nn.BatchNorm2d(16, affine=False)),
}


def _shape(kw, b=4, hw=6):
    return (b, kw.get('shapes', ((16, 16), ))[0][1], hw, hw)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('name', sorted(CONV_CASES))
def test_conv_site_lean_equals_plain(name, train):
    kw = CONV_CASES[name]
    plain = run(
        conv_site,
        _shape(kw),
        recompute=False,
        train=train,
        **copy.deepcopy(kw))
    lean = run(
        conv_site,
        _shape(kw),
        recompute=True,
        train=train,
        **copy.deepcopy(kw))
    assert lean['calls']['ConvUpdate'] == 1
    assert_same(plain, lean)
    if name != 'untracked':  # num_batches_tracked
        assert int(lean['buffers'][-1]) == int(train)


def test_conv_site_folds_the_cheapest_grouping():
    """At a large map, the Bottleneck chain is cut as (W3 W2) W1 / W3 (W2
    W1) or folded: the lean and the plain path fold alike."""
    kw = dict(shapes=BOTTLENECK)
    mats = [torch.empty(s) for s in BOTTLENECK]
    groups = best_grouping(mats, 2 * 20 * 20)
    assert len(groups) < 3
    plain = run(conv_site, _shape(kw, b=2, hw=20), recompute=False, **kw)
    lean = run(conv_site, _shape(kw, b=2, hw=20), recompute=True, **kw)
    assert lean['calls']['ConvUpdate'] == 1
    assert_same(plain, lean)


def test_best_grouping():
    assert chain_groupings(3) == (((0, 1), (1, 2), (2, 3)), ((0, 2), (2, 3)),
                                  ((0, 1), (1, 3)), ((0, 3), ))
    assert chain_groupings(1) == (((0, 1), ), )
    for pixels in (1, 8, 9, 16, 10**4):
        for shapes in (((8, 8), (8, 8)), ((4, 16), (16, 4)), ((16, 4), (4,
                                                                        16))):
            mats = [torch.empty(s) for s in shapes]
            assert (len(best_grouping(mats, pixels)) == 1) == \
                should_fold(mats, pixels)
    mats = [torch.empty(s) for s in BOTTLENECK]
    # per pixel: chain 144, (W2 W1) then W3 128 (+256 once), folded 256
    assert best_grouping(mats, 16) == ((0, 1), (1, 2), (2, 3))
    assert best_grouping(mats, 17) == ((0, 2), (2, 3))
    wide = [torch.empty(s) for s in ((16, 4), (4, 4), (4, 16))]
    assert best_grouping(wide, 10**4) == ((0, 3), )


@pytest.mark.parametrize('drop', [0.0, 0.5])
@pytest.mark.parametrize('kind', ['conv', 'bottleneck', 'vit'])
def test_second_backward_adds_up(kind, drop):
    build, shape = {
        'conv': (conv_site, (4, 16, 6, 6)),
        'bottleneck':
        (lambda **kw: conv_site(shapes=BOTTLENECK, **kw), (4, 16, 6, 6)),
        'vit': (vit_site, (3, 5, 8)),
    }[kind]
    once = run(build, shape, recompute=True, drop=drop)
    twice = run(build, shape, passes=2, recompute=True, drop=drop)
    plain = run(build, shape, passes=2, recompute=False, drop=drop)
    assert sum(twice['calls'].values()) == 1
    for a, b, c in zip(once['grads'], twice['grads'], plain['grads']):
        assert torch.allclose(2 * a, b, atol=1e-5)
        assert torch.allclose(b, c, atol=1e-5)
    for a, b in zip(twice['buffers'], plain['buffers']):
        assert torch.equal(a, b)  # updated by the forward only


def _checkpoint_run(build, shape, cls, **kw):
    """``run`` with the lean path switched off: today's checkpoint."""
    orig = cls.lean_applies
    cls.lean_applies = lambda self, h: False
    try:
        return run(build, shape, recompute=True, **kw)
    finally:
        cls.lean_applies = orig


@pytest.mark.parametrize('drop', [0.0, 0.5])
@pytest.mark.parametrize('shapes', [((16, 16), ), BOTTLENECK])
def test_conv_site_keeps_no_more_than_the_checkpoint(shapes, drop):
    shape = (4, shapes[0][1], 6, 6)
    plain = run(conv_site, shape, recompute=False, shapes=shapes, drop=drop)
    lean = run(conv_site, shape, recompute=True, shapes=shapes, drop=drop)
    ckpt = _checkpoint_run(
        conv_site, shape, ConvSite, shapes=shapes, drop=drop)
    assert ckpt['calls']['ConvUpdate'] == 0
    assert lean['calls']['ConvUpdate'] == 1
    # beyond the checkpoint's h and matrices: mean and invstd (C values
    # each) and, with drop path, the mask (B values); nothing map-sized
    stats = 2 * shapes[-1][0] * 4 + (4 * 4 if drop else 0)
    assert lean['bytes'] <= ckpt['bytes'] + stats
    one_map = 4 * 16 * 6 * 6 * 4
    assert plain['bytes'] >= lean['bytes'] + one_map


@pytest.mark.parametrize('drop', [0.0, 0.5])
def test_vit_site_lean_equals_plain(drop):
    plain = run(vit_site, (3, 5, 8), recompute=False, drop=drop)
    lean = run(vit_site, (3, 5, 8), recompute=True, drop=drop)
    ckpt = _checkpoint_run(vit_site, (3, 5, 8), TransformerSite, drop=drop)
    assert lean['calls']['TokenUpdate'] == 1
    assert ckpt['calls']['TokenUpdate'] == 0
    assert_same(plain, lean)
    # beyond the checkpoint's: mean and rstd (2 values per token) and the
    # mask (B values)
    stats = 2 * 3 * 5 * 4 + (3 * 4 if drop else 0)
    assert lean['bytes'] <= ckpt['bytes'] + stats
    assert plain['bytes'] >= lean['bytes'] + 2 * 3 * 5 * 8 * 4


def test_vit_site_tanh_gelu_is_lean():
    kw = dict(act=nn.GELU(approximate='tanh'))
    plain = run(vit_site, (3, 5, 8), recompute=False, **kw)
    lean = run(vit_site, (3, 5, 8), recompute=True, **kw)
    assert lean['calls']['TokenUpdate'] == 1
    assert_same(plain, lean)


# -- the cases that keep the checkpoint -------------------------------------


class _SyncLikeBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass (as SyncBatchNorm-like norms are): its
    forward could do anything, so the lean path is not taken."""


class _PerElementDrop(nn.Module):
    """Not a per-sample drop path (a mask per element)."""

    def forward(self, x):
        if not self.training:
            return x
        return x * (torch.rand_like(x) > 0.5) * 2


CONV_FALLBACKS = {
    'syncbn_like': dict(norm=_SyncLikeBN(16)),
    'groupnorm': dict(norm=nn.GroupNorm(4, 16)),
    'elementwise_drop': dict(drop_path=_PerElementDrop()),
}


@pytest.mark.parametrize('name', sorted(CONV_FALLBACKS))
def test_conv_site_fallbacks(name):
    kw = CONV_FALLBACKS[name]
    plain = run(conv_site, _shape(kw), recompute=False, **copy.deepcopy(kw))
    ckpt = run(conv_site, _shape(kw), recompute=True, **copy.deepcopy(kw))
    assert ckpt['calls']['ConvUpdate'] == 0
    assert_same(plain, ckpt)


@pytest.mark.parametrize('kind', ['conv', 'vit'])
def test_autocast_keeps_the_checkpoint(kind):
    build, shape = {
        'conv': (conv_site, (4, 16, 6, 6)),
        'vit': (vit_site, (3, 5, 8))
    }[kind]
    plain = run(build, shape, recompute=False, autocast=True)
    ckpt = run(build, shape, recompute=True, autocast=True)
    assert sum(ckpt['calls'].values()) == 0
    assert_same(plain, ckpt)


VIT_FALLBACKS = {
    'no_affine': dict(norm=nn.LayerNorm(8, elementwise_affine=False)),
    'relu': dict(act=nn.ReLU()),
    'groupnorm': dict(norm=nn.GroupNorm(1, 5)),
}


@pytest.mark.parametrize('name', sorted(VIT_FALLBACKS))
def test_vit_site_fallbacks(name):
    kw = VIT_FALLBACKS[name]
    plain = run(vit_site, (3, 5, 8), recompute=False, **copy.deepcopy(kw))
    ckpt = run(vit_site, (3, 5, 8), recompute=True, **copy.deepcopy(kw))
    assert ckpt['calls']['TokenUpdate'] == 0
    assert torch.allclose(plain['out'], ckpt['out'], atol=1e-6)
    for a, b in zip(plain['grads'], ckpt['grads']):
        if a is None:  # no LN gamma: nothing reaches the mixing weights
            assert b is None
        else:
            assert torch.allclose(a, b, atol=1e-5)


def test_double_backward_raises():
    site, _ = conv_site(recompute=True)
    x = torch.rand(2, 16, 4, 4, requires_grad=True)
    with pytest.raises(
            RuntimeError, match=r'replacement=dict\(recompute=False\)'):
        torch.autograd.grad(site(x).pow(2).sum(), x, create_graph=True)
    # the plain path is twice differentiable
    plain, _ = conv_site(recompute=False)
    (gx, ) = torch.autograd.grad(plain(x).pow(2).sum(), x, create_graph=True)
    gx.sum().backward()
    assert x.grad is not None


# -- torch.compile ----------------------------------------------------------


@pytest.mark.skipif(
    TORCH_VERSION < (2, 14),
    reason='older dynamo breaks the graph on the Functions: the sites '
    'keep their checkpoint path under compile there')
@pytest.mark.parametrize('kind', ['conv', 'bottleneck', 'vit'])
def test_compiled_lean_site(kind):
    build, shape = {
        'conv': (conv_site, (4, 16, 6, 6)),
        'bottleneck':
        (lambda **kw: conv_site(shapes=BOTTLENECK, **kw), (4, 16, 6, 6)),
        'vit': (vit_site, (3, 5, 8)),
    }[kind]
    torch._dynamo.reset()
    site, _ = build(recompute=True, drop=0.5)
    site.train()
    x = torch.rand(shape, requires_grad=True)
    explained = torch._dynamo.explain(copy.deepcopy(site))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    twin = copy.deepcopy(site)
    site.drop_path.drop_prob = twin.drop_path.drop_prob = 0.0
    out = site(x)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    out2 = torch.compile(twin, backend='aot_eager')(x2)
    out2.sum().backward()
    assert torch.allclose(out, out2, atol=1e-6)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for p, q in zip(site.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
    for a, b in zip(site.buffers(), twin.buffers()):
        assert torch.equal(a, b)
