"""Grouped-conv sites (spec §9.1): the grouped pointwise math against its
dense block-diagonal form, worked-out costs, the lean, plain and
checkpoint paths of a grouped ConvSite against each other, the static
fold and the surgery's serving rule."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repl_mm.core import ConvSite
from repl_mm.core import lean as lean_mod
from repl_mm.core.contract import ConvBlock
from repl_mm.core.lean import GroupedConvUpdate
from repl_mm.core.plan import ReplacementConfig
from repl_mm.core.static import StaticConvSite, should_fold_static
from repl_mm.core.surgery import _conv_sources
from repl_mm.core.synthesis import (apply_chain, best_grouping, block_diagonal,
                                    chain_groupings, diagonal_blocks,
                                    fold_grouped, fold_grouped_backward,
                                    fold_groups, folded_conv_groups,
                                    grouped_product, grouping_macs, pointwise,
                                    product_macs, should_fold)

F64 = torch.float64
# a ResNeXt bottleneck site: 16 -> 8, 8 -> 8 in 4 groups (3x3), 8 -> 16
SHAPES = [(8, 16), (8, 8), (16, 8)]
GROUPS = (1, 4, 1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- the grouped pointwise math ---------------------------------------------


def test_block_diagonal_by_hand():
    w = torch.tensor([[1.], [2.], [3.], [4.]])  # (4, 2/2): 2 groups
    assert block_diagonal(w, 2).tolist() == [[1., 0.], [2., 0.], [0., 3.],
                                             [0., 4.]]
    assert torch.equal(diagonal_blocks(block_diagonal(w, 2), 2), w)
    assert block_diagonal(w, 1) is w


def test_pointwise_is_the_grouped_conv():
    x = torch.randn(2, 8, 3, 3, dtype=F64, generator=_gen(0))
    w = torch.randn(12, 2, dtype=F64, generator=_gen(1))  # 8 -> 12, g = 4
    dense = F.conv2d(x, block_diagonal(w, 4)[:, :, None, None])
    assert torch.allclose(pointwise(x, w, 4), dense, rtol=0, atol=1e-13)
    conv = nn.Conv2d(8, 12, 1, groups=4, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w[:, :, None, None])
    assert torch.allclose(pointwise(x, w, 4), conv(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize('gb,ga', [(1, 1), (2, 2), (4, 4), (1, 4), (4, 1),
                                   (2, 4), (4, 2)])
def test_grouped_product_is_exact(gb, ga):
    a = torch.randn(8, 12 // ga, dtype=F64, generator=_gen(0))
    b = torch.randn(16, 8 // gb, dtype=F64, generator=_gen(1))
    p, g = grouped_product(b, gb, a, ga)
    assert g == (ga if ga == gb else 1)
    assert p.shape == (16, 12 // g)
    ref = block_diagonal(b, gb) @ block_diagonal(a, ga)
    assert torch.allclose(block_diagonal(p, g), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('conv_groups', [(1, 4, 1), (4, 4), (1, 4), (4, 1),
                                         (2, 4, 1), (4, 2), (4, 4, 4)])
def test_fold_grouped_backward_is_autograds(conv_groups):
    mats = [
        torch.randn(
            8, 8 // g, dtype=F64, generator=_gen(j), requires_grad=True)
        for j, g in enumerate(conv_groups)
    ]
    prod, _ = fold_grouped(mats, conv_groups)
    grad = torch.randn(prod.shape, dtype=F64, generator=_gen(9))
    want = torch.autograd.grad(prod, mats, grad)
    got = fold_grouped_backward([m.detach() for m in mats], conv_groups, grad)
    for w, g in zip(want, got):
        assert torch.allclose(w, g, rtol=0, atol=1e-12)


def test_product_macs_by_hand():
    # (16, 8) @ (8, 12): dense 16 * 8 * 12 = 1536 multiply-adds
    assert product_macs((16, 8), 1, (8, 12), 1) == 1536
    assert product_macs((16, 8), 4, (8, 12), 4) == 1536 // 16  # per group
    assert product_macs((16, 8), 4, (8, 12), 1) == 1536 // 4
    assert product_macs((16, 8), 1, (8, 12), 4) == 1536 // 4
    assert product_macs((16, 8), 2, (8, 12), 4) == 1536 // 2  # A expanded


def test_grouping_macs_counts_grouped_positions_by_hand():
    # per pixel: conv1 8*16 = 128, conv2 8*8/4 = 16, conv3 16*8 = 128
    chain = ((0, 1), (1, 2), (2, 3))
    assert grouping_macs(SHAPES, chain, 10, GROUPS) == 10 * 272
    # (conv2 conv1): fold 8*8*16/4 = 256 once, then 8*16 per pixel
    assert grouping_macs(SHAPES, ((0, 2), (2, 3)), 10,
                         GROUPS) == 256 + 10 * 256
    # all folded: 256, then (16, 8) @ (8, 16) = 2048, then 16*16 a pixel
    assert grouping_macs(SHAPES, ((0, 3), ), 10,
                         GROUPS) == 256 + 2048 + 10 * 256
    # the dense count of the same shapes is higher: 8*8 for conv2
    assert grouping_macs(SHAPES, chain, 10) == 10 * 320


def test_best_grouping_uses_the_grouped_cost():
    mats = [torch.zeros(8, 16), torch.zeros(8, 2), torch.zeros(16, 8)]
    # chain 272 p against (conv2 conv1) 256 + 256 p: folds from p = 17
    assert best_grouping(mats, 16, GROUPS) == ((0, 1), (1, 2), (2, 3))
    assert best_grouping(mats, 17, GROUPS) == ((0, 2), (2, 3))
    assert not should_fold(mats, 16, GROUPS)
    # the full fold: 2304 + 256 p against 272 p, from p = 145
    assert not should_fold(mats, 144, GROUPS) and should_fold(
        mats, 145, GROUPS)


@pytest.mark.parametrize('groups', chain_groupings(3))
def test_every_grouping_applies_the_same_chain(groups):
    x = torch.randn(2, 16, 3, 3, dtype=F64, generator=_gen(0))
    mats = [
        torch.randn(8, 16, dtype=F64, generator=_gen(1)),
        torch.randn(8, 2, dtype=F64, generator=_gen(2)),
        torch.randn(16, 8, dtype=F64, generator=_gen(3))
    ]
    ref = x
    for m, g in zip(mats, GROUPS):
        ref = F.conv2d(ref, block_diagonal(m, g)[:, :, None, None])
    got = apply_chain(
        x,
        fold_groups(mats, groups, GROUPS),
        fold=False,
        conv_groups=folded_conv_groups(GROUPS, groups))
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


# -- the grouped site -------------------------------------------------------


def _convs(groups=4, seed=0):
    torch.manual_seed(seed)
    return [
        nn.Conv2d(16, 8, 1, bias=False),
        nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False),
        nn.Conv2d(8, 16, 1, bias=False)
    ]


def _site(prev, nxt, own=(), recompute=True, norm=None, conv_groups=GROUPS):
    srcs = [[] if j in own else [('prev', p), ('next', n)]
            for j, (p, n) in enumerate(zip(prev, nxt), 1)]
    torch.manual_seed(5)
    site = ConvSite(
        SHAPES,
        srcs,
        norm if norm is not None else nn.BatchNorm2d(16),
        nn.ReLU(),
        zero_init=False,
        recompute=recompute,
        conv_groups=conv_groups)
    with torch.no_grad():
        for name, p in site.named_parameters():
            if name.startswith('phi'):
                p.uniform_(0.2, 1.0, generator=_gen(len(name)))
    return site


def _dense_twin(convs):
    """Dense convs holding the block-diagonal form of grouped ``convs``."""
    out = []
    for c in convs:
        d = nn.Conv2d(
            c.in_channels,
            c.out_channels,
            c.kernel_size,
            padding=c.padding,
            bias=False)
        with torch.no_grad():
            w = c.weight  # (Cout, Cin/g, kh, kw)
            taps = [
                block_diagonal(w[:, :, i, j], c.groups)
                for i in range(w.shape[2]) for j in range(w.shape[3])
            ]
            d.weight.copy_(torch.stack(taps, -1).view(d.weight.shape))
        out.append(d)
    return out


def test_grouped_site_shapes_and_names():
    prev, nxt = _convs(), _convs(seed=1)
    site = _site(prev, nxt, own=(2, ))
    assert site.conv_groups == GROUPS
    assert tuple(site.own_weight(2).shape) == (8, 2)  # (Cout, Cin / g)
    assert tuple(site.phi(1, 'prev').shape) == (8, )
    assert 'conv_groups=(1, 4, 1)' in repr(site)


def test_grouped_site_checks_its_sources():
    prev, nxt = _convs(), _convs(groups=2)
    with pytest.raises(ValueError, match='weight shape'):
        _site(prev, nxt)
    with pytest.raises(ValueError, match='conv_groups of position 2'):
        _site(prev, prev, conv_groups=(1, 3, 1))
    with pytest.raises(ValueError, match='conv_groups must give one int'):
        _site(prev, prev, conv_groups=(1, 4))
    eight = nn.Conv2d(8, 8, 3, groups=4, bias=False)
    flat = nn.Conv2d(32, 8, 1, bias=False)  # weight (8, 32): the same
    flat.weight = nn.Parameter(torch.zeros(8, 2, 1, 1))  # shape, groups 1
    with pytest.raises(ValueError, match='groups=1, the site needs groups=4'):
        ConvSite([(8, 8)], [[('prev', eight), ('next', flat)]],
                 nn.BatchNorm2d(8),
                 nn.ReLU(),
                 conv_groups=(4, ))


@pytest.mark.parametrize('own', [(), (2, )])
@pytest.mark.parametrize('size', [2, 12])
def test_grouped_site_equals_its_dense_twin(size, own):
    prev, nxt = _convs(), _convs(seed=1)
    site = _site(prev, nxt, own=own, recompute=False)
    dense = _site(
        _dense_twin(prev),
        _dense_twin(nxt),
        own=own,
        recompute=False,
        conv_groups=None)
    with torch.no_grad():
        for name, p in site.named_parameters():
            q = dense.get_parameter(name)
            q.copy_(block_diagonal(p, 4) if name == 'weight2' else p)
    x = torch.randn(2, 16, size, size, generator=_gen(0))
    assert torch.allclose(site(x), dense(x), rtol=0, atol=1e-5)


def _step(site, x, g):
    x = x.clone().requires_grad_()
    out = site(x)
    tensors = [x] + site.trainable_tensors()
    grads = torch.autograd.grad(out, tensors, g)
    stats = getattr(site.site_norm, 'running_mean', None)
    return out, grads, None if stats is None else stats.clone()


class _Calls:

    def __enter__(self):
        self.n, self._orig = 0, GroupedConvUpdate.apply

        def apply(*args):
            self.n += 1
            return self._orig(*args)

        GroupedConvUpdate.apply = apply
        return self

    def __exit__(self, *exc):
        GroupedConvUpdate.apply = self._orig
        return False


@pytest.mark.parametrize('groups', chain_groupings(3))
@pytest.mark.parametrize('train', [True, False])
def test_lean_plain_checkpoint_agree(groups, train, monkeypatch):
    """Every grouping of the chain (forced), in train and eval mode: the
    lean Function, autograd through the plain update and a checkpoint
    (a GroupNorm site: no lean path) give the same outputs, gradients
    and BN statistics."""
    monkeypatch.setattr(lean_mod, '_first_order_only', lambda: None)
    from repl_mm.core import cnn_site
    monkeypatch.setattr(cnn_site, 'best_grouping', lambda *a: groups)
    prev, nxt = _convs(), _convs(seed=1)
    for m in prev + nxt:
        m.double()
    x = torch.randn(3, 16, 4, 4, dtype=F64, generator=_gen(0))
    g = torch.randn(3, 16, 4, 4, dtype=F64, generator=_gen(1))
    runs = []
    for recompute in (False, True):
        site = _site(prev, nxt, own=(2, ), recompute=recompute).double()
        site.train(train)
        with _Calls() as calls:
            runs.append(_step(site, x, g))
        assert calls.n == (1 if recompute else 0)
    (y0, g0, r0), (y1, g1, r1) = runs
    assert torch.allclose(y0, y1, rtol=0, atol=1e-12)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)
    assert torch.equal(r0, r1)
    ckpt = []
    for recompute in (False, True):
        site = _site(
            prev, nxt, recompute=recompute, norm=nn.GroupNorm(4, 16)).double()
        ckpt.append(_step(site, x, g))
    for a, b in zip(ckpt[0][1], ckpt[1][1]):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize('groups', [((0, 1), (1, 2), (2, 3)), ((0, 2), (2, 3)),
                                    ((0, 3), )])
def test_gradcheck_grouped_conv_update(groups):
    dt = F64
    h = torch.randn(3, 16, 2, 3, dtype=dt, generator=_gen(0))
    mats = [
        torch.randn(8, 16, dtype=dt, generator=_gen(1)),
        torch.randn(8, 2, dtype=dt, generator=_gen(2)),
        torch.randn(16, 8, dtype=dt, generator=_gen(3))
    ]
    gamma = torch.rand(16, dtype=dt, generator=_gen(4)) + 0.5
    beta = torch.randn(16, dtype=dt, generator=_gen(5))
    k = torch.tensor(0.7, dtype=dt)
    inputs = [t.requires_grad_() for t in (h, gamma, beta, *mats)]

    def fn(h, gamma, beta, *mats):
        return GroupedConvUpdate.apply(h, k, gamma, beta, None, None, True,
                                       0.1, 1e-5, groups, GROUPS, *mats)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_grouped_site_float64():
    prev, nxt = _convs(), _convs(seed=1)
    site = _site(prev, nxt, own=(2, )).double().train()
    for m in prev + nxt:
        m.double()
    h = torch.rand(2, 16, 3, 3, dtype=F64, generator=_gen(0))
    h.requires_grad_()
    params = site.trainable_tensors()
    with _Calls() as calls:
        assert torch.autograd.gradcheck(lambda h, *ps: site(h), (h, *params))
    assert calls.n


# -- static fold and surgery ------------------------------------------------


def test_should_fold_static_counts_groups():
    # ResNeXt 32x4d-like: C -> C/2 -> C/2 (32 groups) -> C folds (C^2
    # against C^2 + C^2 / 128)
    shapes = [(128, 256), (128, 128), (256, 128)]
    assert should_fold_static(shapes, (1, 32, 1))
    # the tiny site: chain 272 against 16 * 16 = 256 per pixel
    assert should_fold_static(SHAPES, GROUPS)
    # two grouped positions of 4 groups stay grouped: 2 * 64 / 4 against
    # the folded 64 / 4
    assert should_fold_static([(8, 8), (8, 8)], (4, 4))


@pytest.mark.parametrize('shapes,groups', [(SHAPES, GROUPS),
                                           ([(8, 16), (8, 8),
                                             (16, 8)], (1, 2, 1)),
                                           ([(8, 8), (8, 8)], (4, 4))])
def test_static_site_equals_the_trained_site(shapes, groups):
    torch.manual_seed(0)
    prev = [
        nn.Conv2d(ci, co, 3, groups=g, bias=False)
        for (co, ci), g in zip(shapes, groups)
    ]
    nxt = [
        nn.Conv2d(ci, co, 3, groups=g, bias=False)
        for (co, ci), g in zip(shapes, groups)
    ]
    site = ConvSite(
        shapes, [[('prev', p), ('next', n)] for p, n in zip(prev, nxt)],
        nn.BatchNorm2d(shapes[-1][0]),
        nn.ReLU(),
        zero_init=False,
        conv_groups=groups)
    x = torch.randn(4, shapes[0][1], 5, 5, generator=_gen(0))
    site.train()(x)  # running statistics
    site.eval()
    static = StaticConvSite(
        shapes, nn.BatchNorm2d(shapes[-1][0]), nn.ReLU(), conv_groups=groups)
    static.load_site(site)
    static.eval()
    assert torch.allclose(static(x), site(x), rtol=0, atol=1e-5)
    if static.folded and len(set(groups)) == 1:
        assert static.pointwise[0].groups == groups[0]
    with pytest.raises(ValueError, match='conv_groups'):
        StaticConvSite(shapes, nn.BatchNorm2d(shapes[-1][0]),
                       nn.ReLU()).load_site(site)


def test_neighbour_serves_only_with_the_same_groups():
    convs = _convs()
    other = _convs(groups=2)
    desc = ConvBlock(convs=convs, norm=nn.BatchNorm2d(16), act=nn.ReLU())
    nbrs = {
        'prev':
        ConvBlock(convs=other, norm=nn.BatchNorm2d(16), act=nn.ReLU()),
        'next':
        ConvBlock(
            convs=_convs(seed=1), norm=nn.BatchNorm2d(16), act=nn.ReLU())
    }
    cfg = ReplacementConfig.from_dict(None)
    for mode in ('synthesize', 'interpolate'):
        srcs = _conv_sources(mode, desc, nbrs, cfg)
        assert [[n for n, _ in s] for s in srcs] == [['prev',
                                                      'next'], ['next'],
                                                     ['prev', 'next']]
