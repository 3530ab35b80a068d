"""The ConvNeXt computing layer (spec §9.3): formula, evaluation orders,
precision, placement, copies, compile, static and interpolated sites."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import nn

from repl_mm.converters.to_static import to_static
from repl_mm.core import (ConvNeXtSite, InterpolatedBlock, StaticConvNeXtSite,
                          iter_sites)
from repl_mm.core.convnext_site import pointwise_matrix
from repl_mm.models.cls_convnext import RepLConvNeXt
from repl_mm.utils.compat import compiles_sites
from ..test_models.test_backbones.cases import TINY_CONVNEXT
from ..test_models.test_backbones.test_contract import outputs, weighted_loss
from .test_compile import assert_same_step, breaks_inside_core, step


class Neighbour(nn.Module):
    """The three weights a ConvNeXt site reads from a kept block."""

    def __init__(self, dim, ratio=4, **factory):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **factory)
        self.pw1 = nn.Linear(dim, ratio * dim, **factory)
        self.pw2 = nn.Linear(ratio * dim, dim, **factory)


def make_site(dim=3, names=('prev', 'next'), seed=0, ratio=4, **kwargs):
    """A site drawing from ``names``, and its neighbours (a ModuleDict:
    they own the weights)."""
    torch.manual_seed(seed)
    factory = {k: kwargs.pop(k) for k in ('device', 'dtype') if k in kwargs}
    nbrs = nn.ModuleDict({n: Neighbour(dim, ratio, **factory) for n in names})
    sources = {
        'dw': [(n, nbrs[n].dw) for n in names],
        'pw': [(n, (nbrs[n].pw1, nbrs[n].pw2)) for n in names]
    }
    kwargs.setdefault('zero_init', False)
    site = ConvNeXtSite(dim, sources, nn.LayerNorm(dim, **factory), nn.GELU(),
                        **kwargs)
    return site, nbrs


def test_synthesis_and_update_against_a_hand_computation():
    site, nbrs = make_site(dim=2, ratio=2)
    with torch.no_grad():
        nbrs['prev'].dw.weight.fill_(1.0)  # S = 9 per channel
        nbrs['next'].dw.weight.fill_(2.0)  # S = 18
        site.phi_prev.copy_(torch.tensor([1.0, 0.0]))
        site.phi_next.copy_(torch.tensor([0.0, 0.5]))
        eye = torch.tensor([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])
        for n in ('prev', 'next'):
            nbrs[n].pw1.weight.copy_(eye)  # (4, 2)
        nbrs['prev'].pw2.weight.fill_(1.0)  # M_prev = [[2, 2], [2, 2]]
        nbrs['next'].pw2.weight.copy_(  # M_next = I
            torch.tensor([[1., 0., 0., 0.], [0., 0., 0., 1.]]))
        site.beta.fill_(1.0)  # alpha stays 0.5
        site.site_norm.weight.copy_(torch.tensor([1.0, 2.0]))
        site.site_norm.bias.copy_(torch.tensor([0.5, -1.0]))
        site.scale.fill_(0.5)
    ops = site.synthesize()
    assert ops['dw'].tolist() == [9.0, 9.0]  # 1 * 9 + 0; 0 + 0.5 * 18
    assert ops['pw'].tolist() == [[2.0, 1.0], [1.0, 2.0]]
    assert site.operator().tolist() == [[18.0, 9.0], [9.0, 18.0]]
    h = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 2, 3)
    # Mhat (Dhat * h) = [[2, 1], [1, 2]] [9, -18] = [0, -27]
    z = F.gelu(torch.tensor([0.0, -27.0]))
    ln = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + 1e-5)
    upd = 0.5 * (ln * torch.tensor([1.0, 2.0]) + torch.tensor([0.5, -1.0]))
    expected = h + upd.view(1, 2, 1, 1)
    site.eval()
    assert torch.allclose(site(h), expected, atol=1e-6)


def test_own_operators_and_one_scalar():
    site = ConvNeXtSite(4, {}, nn.LayerNorm(4), nn.GELU())
    assert site.sources == {'dw': ('own', ), 'pw': ('own', )}
    assert torch.equal(site.dw_weight, torch.ones(4))
    assert site.pw_weight.shape == (4, 4)
    assert sorted(n for n, _ in site.named_parameters()) == [
        'dw_weight', 'pw_weight', 'site_norm.bias', 'site_norm.weight'
    ]
    # zero gamma: the site starts as its skip path
    h = torch.rand(2, 4, 3, 3)
    assert torch.equal(site(h), h)
    tied, _ = make_site(num_scalars=1)
    assert tied.tied and not hasattr(tied, 'beta')
    assert float(tied.coefficient('next').detach()) == 0.5
    # beta reported as used: 1 - alpha (as a tied ViT site reports it)
    assert tied.mixing_summary() == dict(
        phi_prev=0.5, phi_next=0.5, alpha=0.5, beta=0.5)


def test_bad_sources_are_refused():
    nbr = Neighbour(4)
    with pytest.raises(ValueError, match='depthwise weight has shape'):
        ConvNeXtSite(8, {'dw': [('prev', nbr.dw)]}, nn.LayerNorm(8), nn.GELU())
    with pytest.raises(ValueError, match='not a 8 -> r -> 8 MLP'):
        ConvNeXtSite(8, {'pw': [('prev', (nbr.pw1, nbr.pw2))]},
                     nn.LayerNorm(8), nn.GELU())
    with pytest.raises(ValueError, match=r"operators \['attn'\]"):
        ConvNeXtSite(4, {'attn': []}, nn.LayerNorm(4), nn.GELU())
    assert pointwise_matrix(torch.ones(6, 3, 1, 1)).shape == (6, 3)
    with pytest.raises(ValueError, match='1x1 conv'):
        pointwise_matrix(torch.ones(6, 3, 3, 3))


def site_step(site, nbrs, h, seed=0):
    torch.manual_seed(seed)
    out = site(h)
    weighted_loss([out]).backward()
    # (the neighbours' biases are not synthesized: no gradient)
    tensors = [h, *site.parameters(), *nbrs.parameters()]
    grads = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize('recompute,with_cp', [(True, False), (True, True),
                                               (False, True)])
def test_recompute_and_with_cp_are_exact(recompute, with_cp):
    """Same outputs and gradients as the plain update, drop path
    included (its draw is replayed)."""
    ref, nbrs = make_site(recompute=False, drop_path=DropPath(0.5))
    site = copy.deepcopy(ref)
    site.recompute, site.with_cp = recompute, with_cp
    # the copy reads the copy's neighbours: give it the originals
    site._sources = ref._sources
    h = torch.rand(4, 3, 5, 5, requires_grad=True)
    a, ga = site_step(ref, nbrs, h)
    b, gb = site_step(site, nbrs, h)
    assert torch.equal(a, b)
    assert [g is None for g in ga] == [g is None for g in gb]
    assert all(torch.equal(x, y) for x, y in zip(ga, gb) if x is not None)
    # the neighbours' dw, pw1 and pw2 weights learn through the synthesis
    nbr_grads = ga[-len(list(nbrs.parameters())):]
    assert sum(g is not None and g.abs().sum() > 0 for g in nbr_grads) == 6


@pytest.mark.parametrize('recompute', [True, False])
def test_gradcheck_float64(recompute):
    site, nbrs = make_site(dtype=torch.float64, recompute=recompute)
    holder = nn.ModuleDict({'site': site, 'nbrs': nbrs})
    names = [n for n, _ in holder.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in holder.parameters()]
    h = torch.rand(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(h, *params):
        """The site with its and its neighbours' parameters swapped for
        ``params`` (the site reads the neighbours' modules)."""
        saved = dict(holder.named_parameters())
        for n, v in zip(names, params):
            mod, attr = _owner(holder, n)
            del mod._parameters[attr]
            setattr(mod, attr, v)
        try:
            return site(h)
        finally:
            for n in names:
                mod, attr = _owner(holder, n)
                delattr(mod, attr)
                mod._parameters[attr] = saved[n]

    assert torch.autograd.gradcheck(f, (h, *values))


def _owner(root, name):
    *path, attr = name.split('.')
    mod = root
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


@pytest.mark.parametrize('with_cp', [False, True])
def test_synthesis_runs_once_per_step(with_cp, monkeypatch):
    site, nbrs = make_site(with_cp=with_cp)
    calls = []
    real = ConvNeXtSite._synthesize
    monkeypatch.setattr(ConvNeXtSite, '_synthesize',
                        lambda self: calls.append(1) or real(self))
    h = torch.rand(2, 3, 4, 4, requires_grad=True)
    weighted_loss([site(h)]).backward()
    assert len(calls) == 1


def test_float64_and_meta_models():
    """What the surgery creates takes the replaced block's dtype and
    device (hook route on a model already cast / on meta)."""
    from mmpretrain.models.backbones import ConvNeXt

    from repl_mm.models.base import to_repl_backbone
    model = ConvNeXt(**TINY_CONVNEXT).double()
    to_repl_backbone(model, dict(zero_init=False))
    sites = [m for m in model.modules() if isinstance(m, ConvNeXtSite)]
    assert sites
    for site in sites:
        assert all(t.dtype == torch.float64
                   for t in [*site.parameters(), *site.buffers()])
        assert site.operator().dtype == torch.float64
    out = outputs(model, torch.rand(2, 3, 32, 32, dtype=torch.float64))
    assert all(o.dtype == torch.float64 for o in out)
    # upstream's __init__ cannot run on meta (it reads its drop-path
    # rates with .item()): a model moved there, then the hook route
    meta = ConvNeXt(**TINY_CONVNEXT).to('meta')
    to_repl_backbone(meta, None)
    site = meta.stages[2][3]
    assert isinstance(site, ConvNeXtSite)
    assert all(t.is_meta for t in [*site.parameters(), *site.buffers()])
    with torch.no_grad():  # torch 2.1 cannot checkpoint on meta
        assert site(torch.empty(2, 24, 2, 2, device='meta')).is_meta
    meta.to_empty(device='cpu')
    assert float(site.scale) == 1.0  # refilled with the built value


def test_bf16_autocast_on_cpu():
    """Synthesis in fp32 with autocast on; the update under autocast is
    close to fp32's."""
    site, nbrs = make_site(dim=8)
    h = torch.rand(2, 8, 4, 4)
    ref = site(h)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        dw, pw = site.weights(h)
        out = site(h)
    assert dw.dtype == pw.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), ref, atol=5e-2, rtol=5e-2)
    # a bf16 model: synthesis in fp32, the update in bf16
    bf16, _ = make_site(dim=8, dtype=torch.bfloat16)
    assert all(w.dtype == torch.float32 for w in bf16.weights(h.bfloat16()))
    assert bf16(h.bfloat16()).dtype == torch.bfloat16


def test_deepcopy_maps_sources_to_the_copy():
    model = RepLConvNeXt(**TINY_CONVNEXT, replacement=dict(zero_init=False))
    clone = copy.deepcopy(model)
    site, copied = model.stages[2][3], clone.stages[2][3]
    assert site.sources == {'dw': ('prev', 'next'), 'pw': ('prev', 'next')}
    assert copied.source_dw()[0][1] is clone.stages[2][2].depthwise_conv
    assert copied.source_pw()[1][1][1] is clone.stages[2][4].pointwise_conv2
    own = {id(p) for p in clone.parameters()}
    assert all(id(w) in own for w in copied._source_weights())


def build(variant, **kwargs):
    replacement = dict(
        zero_init=False,
        **{
            'norecompute': dict(recompute=False),
            'interpolate': dict(mode='interpolate')
        }.get(variant, {}))
    torch.manual_seed(0)
    return RepLConvNeXt(
        **TINY_CONVNEXT,
        with_cp=variant == 'with_cp',
        replacement=replacement,
        **kwargs).train()


@pytest.mark.parametrize('variant',
                         ['default', 'norecompute', 'with_cp', 'interpolate'])
def test_compiled_step_equals_eager(variant):
    """aot_eager compile of a training step gives eager's outputs and
    gradients (on a torch that cannot trace the sites they run eagerly
    between compiled graphs: compiles_sites)."""
    torch._dynamo.reset()
    model = build(variant)
    twin = copy.deepcopy(model)
    x = torch.rand(2, 3, 32, 32)
    assert not breaks_inside_core(copy.deepcopy(model), x)
    ref = step(model, x)
    got = step(twin, x, torch.compile(twin, backend='aot_eager'))
    assert_same_step(ref, got, atol=1e-5)
    assert compiles_sites() or not breaks_inside_core(model, x)


@pytest.mark.parametrize('static_from', ['synthesize', 'interpolate'])
def test_static_model_equals_the_trained_one(static_from):
    opts = dict(zero_init=False, scale=0.7) if static_from == 'synthesize' \
        else {}
    # layer scale 1 (as in the detection configs): an interpolated block
    # with upstream's 1e-6 would be about the identity
    kwargs = dict(TINY_CONVNEXT, layer_scale_init_value=1.0)
    torch.manual_seed(0)
    trained = RepLConvNeXt(
        **kwargs, replacement=dict(mode=static_from, **opts))
    with torch.no_grad():  # mixing weights away from their init
        for n, p in trained.named_parameters():
            if n.rsplit('.', 1)[-1] in ('alpha', 'beta') or '.phi_' in n:
                p.uniform_(0.2, 0.9)
    static = RepLConvNeXt(
        **kwargs,
        replacement=dict(mode='static', static_from=static_from, **opts))
    to_static(trained, static)
    kinds = {type(r.module) for r in iter_sites(static)}
    assert kinds == ({StaticConvNeXtSite} if static_from == 'synthesize' else
                     {type(trained.stages[0][0])})
    drop = RepLConvNeXt(**kwargs, replacement=dict(mode='drop'))
    drop.load_state_dict(
        {
            k: v
            for k, v in trained.state_dict().items()
            if k in drop.state_dict() and k != 'replacement_plan'
        },
        strict=False)
    x = torch.rand(2, 3, 32, 32)
    drop.eval()
    for a, b, c in zip(
            outputs(trained, x), outputs(static, x), outputs(drop, x)):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)  # the sites do something
    if static_from == 'synthesize':  # else plain blocks, which train
        with pytest.raises(RuntimeError, match='inference only'):
            static.train()(x)


def test_interpolated_weights():
    model = RepLConvNeXt(**TINY_CONVNEXT, replacement=dict(mode='interpolate'))
    site = model.stages[2][3]
    assert isinstance(site, InterpolatedBlock)
    assert model.replacement_plan.sites[1].sources == {
        'dw': ('prev', 'next'),
        'pw1': ('prev', 'next'),
        'pw2': ('prev', 'next')
    }
    with torch.no_grad():
        site.alpha.fill_(0.25)
        site.beta.fill_(2.0)
    prev, nxt = model.stages[2][2], model.stages[2][4]
    parts = ('depthwise_conv', 'pointwise_conv1', 'pointwise_conv2')
    for w, part in zip(site.interpolate(), parts):
        assert torch.allclose(
            w, 0.25 * getattr(prev, part).weight +
            2.0 * getattr(nxt, part).weight)
    # the block keeps its layer scale, biases and norm
    assert {n
            for n, _ in site.block.named_parameters()} == {
                'gamma', 'depthwise_conv.bias', 'norm.weight', 'norm.bias',
                'pointwise_conv1.bias', 'pointwise_conv2.bias'
            }


def test_variants_grn_and_conv_pointwise():
    """ConvNeXt V2 (GRN, no layer scale) builds and trains: the site has
    no GRN (spec §9.3). With 1x1-conv pointwise layers
    (``linear_pw_conv=False``) the site computes what it computes from the
    same weights as linears."""
    v2 = RepLConvNeXt(
        **TINY_CONVNEXT,
        use_grn=True,
        layer_scale_init_value=0.,
        replacement=dict(zero_init=False))
    weighted_loss(outputs(v2, torch.rand(2, 3, 32, 32))).backward()
    assert v2.stages[2][3].phi_next.grad.abs().sum() > 0
    torch.manual_seed(0)
    lin = RepLConvNeXt(**TINY_CONVNEXT, replacement=dict(zero_init=False))
    conv = RepLConvNeXt(
        **TINY_CONVNEXT,
        linear_pw_conv=False,
        replacement=dict(zero_init=False))
    target = conv.state_dict()
    conv.load_state_dict({
        k: v.view(target[k].shape) if k in target else v
        for k, v in lin.state_dict().items()
    })
    lin.eval(), conv.eval()
    x = torch.rand(2, 3, 32, 32)
    for a, b in zip(outputs(lin, x), outputs(conv, x)):
        assert torch.allclose(a, b, atol=1e-5)


def test_describe_refuses_a_dense_block_conv():
    from mmpretrain.models.backbones.convnext import ConvNeXtBlock

    from repl_mm.models.cls_convnext import describe_convnext_block
    block = ConvNeXtBlock(8)
    block.depthwise_conv = nn.Conv2d(8, 8, 7, padding=3)
    with pytest.raises(ValueError, match='depthwise conv'):
        describe_convnext_block(block)
    block = ConvNeXtBlock(8, linear_pw_conv=False)
    block.pointwise_conv1 = nn.Conv2d(8, 32, 3, padding=1)
    with pytest.raises(ValueError, match='pointwise_conv1'):
        describe_convnext_block(block)


def test_fit_site_to_the_replaced_block():
    """e2e_to_repl's fit (variable projection, LN affine in closed form)
    brings the site nearer the E2E block it replaces."""
    from repl_mm.converters.site_fit import fit_site
    torch.manual_seed(0)
    e2e = RepLConvNeXt(
        **TINY_CONVNEXT,
        layer_scale_init_value=1.0,
        replacement=dict(mode='none'))
    e2e.init_weights()
    e2e.eval()
    record = {}
    hook = e2e.stages[2][3].register_forward_hook(
        lambda m, i, o: record.update(x=i[0].detach(), y=o.detach()))
    e2e(torch.rand(4, 3, 32, 32))
    hook.remove()
    repl = RepLConvNeXt(**TINY_CONVNEXT, layer_scale_init_value=1.0)
    repl.load_state_dict(e2e.state_dict(), strict=False)
    site = repl.stages[2][3]
    before, after = fit_site(site, record['x'], record['y'])
    assert after < 0.75 * before
    assert float(site.alpha) != 0.5 and site.site_norm.weight.abs().sum() > 0


def test_vit_weights_num_scalars_and_own_operators_on_the_backbone():
    """``vit_weights`` reads 'attn' as D and 'mlp' as M; a site with no
    neighbour of its width owns both; the checkpoint comparison treats
    ConvNeXt sites like transformer ones (vit_weights, num_scalars)."""
    model = RepLConvNeXt(
        **TINY_CONVNEXT, replacement=dict(vit_weights='mlp', num_scalars=1))
    site = model.stages[2][3]
    assert site.sources == {'dw': ('own', ), 'pw': ('prev', 'next')}
    assert hasattr(site, 'dw_weight') and not hasattr(site, 'phi_prev')
    assert site.tied and not hasattr(site, 'beta')
    with pytest.raises(ValueError, match='vit_weights: checkpoint'):
        RepLConvNeXt(**TINY_CONVNEXT).load_state_dict(
            model.state_dict(), strict=False)
    with pytest.raises(ValueError, match='num_scalars: checkpoint 1'):
        RepLConvNeXt(
            **TINY_CONVNEXT,
            replacement=dict(vit_weights='mlp')).load_state_dict(
                model.state_dict(), strict=False)
    # depths 1, 1, 2, 1: block 2 is stage 2's only block, its neighbours
    # lie across down-sampling layers
    lone = RepLConvNeXt(
        arch=dict(depths=[1, 1, 2, 1], channels=[8, 16, 24, 32]),
        replacement=dict(indices=[2], zero_init=False))
    site = lone.stages[1][0]
    assert lone.replacement_plan.sites[0].sources == {
        'dw': ('own', ),
        'pw': ('own', )
    }
    assert site.pw_weight.shape == (16, 16)
    weighted_loss(outputs(lone, torch.rand(2, 3, 32, 32))).backward()
    assert site.pw_weight.grad.abs().sum() > 0
    assert site.dw_weight.grad.abs().sum() > 0


def test_site_layer_depth_is_the_replaced_blocks():
    model = RepLConvNeXt(arch='tiny')
    site_depth = model.get_layer_depth('backbone.stages.2.5.alpha',
                                       'backbone.')
    block_depth = RepLConvNeXt(
        arch='tiny', replacement=dict(mode='none')).get_layer_depth(
            'backbone.stages.2.5.depthwise_conv.weight', 'backbone.')
    assert site_depth == block_depth
    assert isinstance(model.stages[2][5], ConvNeXtSite)
