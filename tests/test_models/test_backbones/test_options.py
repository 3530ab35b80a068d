"""Upstream options keep working with replacement on."""
import pytest
import torch
from torch.utils import checkpoint as torch_cp

from repl_mm.core import ConvSite, NonReentrantCheckpoint, TransformerSite
from .cases import CASES, IDS, TINY_VIT
from .test_contract import outputs, weighted_loss


def test_plans_of_real_backbones():
    from repl_mm.models.cls_resnet import RepLResNet, RepLResNet_CIFAR
    from repl_mm.models.cls_vit import RepLVisionTransformer
    assert RepLResNet(depth=50).replacement_plan.indices == (5, 9, 12)
    assert RepLResNet(depth=18).replacement_plan.indices == (4, )
    assert RepLResNet_CIFAR(depth=32).replacement_plan.indices == (4, 8, 12)
    c32 = RepLResNet_CIFAR(depth=32, replacement=dict(interval=2))
    assert c32.replacement_plan.indices == (2, 4, 7, 8, 10, 12, 14)
    s7, s8 = c32.replacement_plan.sites[2:4]
    assert (s7.prev, s7.next, s8.prev, s8.next) == (6, 9, 6, 9)
    vit = RepLVisionTransformer(arch='deit-tiny', img_size=32, patch_size=8)
    assert vit.replacement_plan.indices == (4, 8)
    vit = RepLVisionTransformer(
        arch='deit-tiny',
        img_size=32,
        patch_size=8,
        replacement=dict(indices=[3, 7, 11]))
    assert vit.replacement_plan.indices == (3, 7, 11)
    c110 = RepLResNet_CIFAR(depth=110)
    assert c110.stage_blocks == (18, 18, 18)
    assert c110.replacement_plan.indices == tuple(range(4, 54, 4))


def test_cifar_he_nets_shape():
    from repl_mm.models.cls_resnet import RepLResNet_CIFAR
    m = RepLResNet_CIFAR(depth=32, replacement=dict(mode='none'))
    assert m.conv1.out_channels == 16 and m.conv1.stride == (1, 1)
    assert [len(getattr(m, n)) for n in m.res_layers] == [5, 5, 5]
    assert m(torch.rand(2, 3, 32, 32))[0].shape == (2, 64, 8, 8)
    assert sum(p.numel() for p in m.parameters()) < 0.5e6


def test_unserved_position_is_owned():
    from repl_mm.models.det_resnet import RepLResNet
    m = RepLResNet(depth=18)
    site = m.replacement_plan.sites[0]
    # layer2.0 (conv1 64->128) and layer3.0 (128->256, 256->256) serve
    # only conv2, from prev
    assert site.index == 4 and site.sources == {
        'conv1': ('own', ),
        'conv2': ('prev', )
    }
    assert m.layer2[1].weight1.shape == (128, 128)
    assert 'conv1:own' in str(m.replacement_plan)
    # neighbors='prev' falls back to next where prev cannot serve
    m = RepLResNet(depth=50, replacement=dict(neighbors='prev'))
    s5 = m.replacement_plan.sites[0]
    assert s5.sources == {
        'conv1': ('next', ),
        'conv2': ('prev', ),
        'conv3': ('prev', )
    }
    assert not hasattr(m.layer2[1], 'phi1_prev')


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_frozen_stages_and_norm_eval(case):
    kwargs = case.extra.get('frozen') or (dict(
        frozen_stages=5) if case.kind == 'transformer' else dict(
            frozen_stages=2))
    model = case.cls('repl')(
        **case.kwargs, **kwargs, replacement=dict(interval=2))
    model.train()
    frozen = 0
    for i, m in model.site_modules().items():
        in_frozen = model._site_frozen(i)
        frozen += in_frozen
        assert all(p.requires_grad != in_frozen for p in m.parameters())
        if case.kind == 'conv' or hasattr(model, 'stages'):
            # (upstream ViT leaves frozen layers in train mode: no train()
            # override; LN has no statistics)
            assert m.site_norm.training != in_frozen
    assert frozen > 0
    if case.kind == 'conv':
        model = case.cls('repl')(**case.kwargs, norm_eval=True)
        model.train()
        assert not model.layer1[0].norm1.training  # upstream norm_eval
        for m in model.site_modules().values():
            assert m.site_norm.training  # fresh site norms always train


def assert_frozen_part_frozen(model, x):
    """``model(x)[0]`` is the frozen part's output: no gradient reaches
    anything in it, and it does not change when the trainable parameters
    are updated (while the last output does)."""
    model.train()
    frozen_out = outputs(model, x)[0].detach().clone()
    last = outputs(model, x)[-1].detach().clone()
    weighted_loss(outputs(model, x)).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    torch.optim.SGD(trainable, lr=1.0).step()
    out = outputs(model, x)
    assert torch.equal(out[0], frozen_out)
    assert not torch.allclose(out[-1], last)


@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
def test_vit_site_in_frozen_stages(mode):
    """A ViT site in ``frozen_stages`` drawing from a layer that trains is
    refused (both routes); one drawing from frozen layers is frozen."""
    from mmpretrain.models.backbones import VisionTransformer

    from repl_mm.models.base import to_repl_backbone
    from repl_mm.models.cls_vit import RepLVisionTransformer
    match = (r'site 4 lies in the frozen part \(frozen_stages=4\) but is '
             'drawn from block 5, its next neighbour')
    with pytest.raises(ValueError, match=match):
        RepLVisionTransformer(
            **TINY_VIT, frozen_stages=4, replacement=dict(mode=mode))
    with pytest.raises(ValueError, match=match):
        to_repl_backbone(
            VisionTransformer(**TINY_VIT, frozen_stages=4), dict(mode=mode))
    x = torch.rand(2, 3, 32, 32)
    for frozen, extra in ((4, dict(neighbors='prev')), (5, {})):
        model = RepLVisionTransformer(
            **TINY_VIT,
            frozen_stages=frozen,
            out_indices=(frozen - 1, 5),
            replacement=dict(mode=mode, zero_init=False, **extra))
        site = model.layers[3]
        assert model._site_frozen(4)
        assert all(not p.requires_grad for p in site.parameters())
        assert_frozen_part_frozen(model, x)


@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
@pytest.mark.parametrize('name', ['det-r18', 'cls-cifar-r20'])
def test_resnet_site_in_frozen_stages(name, mode, monkeypatch):
    """ResNet sites in frozen stages draw from their own stage (widths
    double between stages) and are frozen with it; the check that refuses
    a frozen site drawing from a block that trains applies to them too."""
    case = next(c for c in CASES if c.name == name)
    model = case.cls('repl')(
        **dict(case.kwargs, out_indices=(1, 2)),
        frozen_stages=2,
        replacement=dict(mode=mode, interval=2, zero_init=False))
    frozen = [
        i for i in model.replacement_plan.indices if model._site_frozen(i)
    ]
    assert frozen and len(frozen) < len(model.replacement_plan.indices)
    assert_frozen_part_frozen(model, torch.rand(case.shape))
    # were a frozen site's neighbour to train, it would be refused
    monkeypatch.setattr(
        type(model), '_block_frozen', lambda self, index: index == 2)
    with pytest.raises(
            ValueError,
            match=r'site 2 lies in the frozen part '
            r'\(frozen_stages=2\) but is drawn from block 1, '
            'its prev neighbour'):
        case.cls('repl')(
            **case.kwargs,
            frozen_stages=2,
            replacement=dict(mode=mode, indices=[2]))


@pytest.mark.parametrize('mode', ['synthesize', 'interpolate', 'none'])
@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_with_cp_is_non_reentrant_and_exact(case, mode, monkeypatch):
    kw = dict(case.kwargs, with_cp=True)
    torch.manual_seed(0)
    cp_model = case.cls('repl')(
        **kw, replacement=dict(mode=mode, zero_init=False))
    torch.manual_seed(0)
    plain = case.build(mode=mode, zero_init=False)
    plain.load_state_dict(cp_model.state_dict())
    calls = []
    real = torch_cp.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get('use_reentrant'))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch_cp, 'checkpoint', spy)
    # every checkpoint of the core goes through this module
    monkeypatch.setattr('repl_mm.core.recompute.checkpoint', spy)
    x = torch.rand(case.shape, requires_grad=True)
    outs = outputs(cp_model, x)
    weighted_loss(outs).backward()
    ref = outputs(plain, x)
    weighted_loss(ref).backward()
    assert calls and all(c is False for c in calls)
    n_blocks = cp_model.replacement_plan.num_blocks
    fused = sum(getattr(m, 'fused', False) for m in cp_model.modules())
    if mode != 'none':
        # sites run in the previous block's segment where there is one
        assert fused > 0
    assert len(calls) >= n_blocks - fused
    for a, b in zip(outs, ref):
        assert torch.allclose(a, b, atol=1e-5)
    grads = dict(plain.named_parameters())
    for n, p in cp_model.named_parameters():
        assert torch.allclose(p.grad, grads[n].grad, atol=1e-4), n
    # BN statistics updated once per step, as without with_cp (upstream's
    # reentrant checkpoint would update them a second time in backward)
    stats = dict(plain.named_buffers())
    for n, b in cp_model.named_buffers():
        if b.is_floating_point():
            assert torch.allclose(b, stats[n], atol=1e-6), n
        else:
            assert torch.equal(b, stats[n]), n
    blocks = [
        m for m in cp_model.modules() if isinstance(m, NonReentrantCheckpoint)
    ]
    assert blocks


@pytest.mark.parametrize('with_cp', [False, True])
@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_synthesis_runs_once_per_step(case, mode, with_cp, monkeypatch):
    """Recomputation in backward (``recompute``, a ``with_cp`` site, a site
    fused into a kept block's segment) re-runs the feature-map part only:
    the synthesized weights are kept for backward."""
    from repl_mm.core import (ConvNeXtSite, ConvSite, InterpolatedBlock,
                              TransformerSite)
    counts = {}

    def counting(cls, name):
        real = getattr(cls, name)

        def spy(self, *args, **kwargs):
            counts[id(self)] = counts.get(id(self), 0) + 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)

    counting(ConvSite, 'synthesize')
    counting(TransformerSite, 'synthesize')
    counting(ConvNeXtSite, 'synthesize')
    counting(InterpolatedBlock, 'interpolate')
    model = case.cls('repl')(
        **dict(case.kwargs, with_cp=with_cp),
        replacement=dict(mode=mode, zero_init=False))
    model.train()
    sites = [
        m for m in model.modules()
        if isinstance(m, (ConvSite, TransformerSite, ConvNeXtSite,
                          InterpolatedBlock))
    ]
    assert sites
    counts.clear()
    x = torch.rand(case.shape, requires_grad=True)
    weighted_loss(outputs(model, x)).backward()
    assert {id(s): 1 for s in sites} == counts


def test_drop_path_rate_reaches_sites():
    from repl_mm.models.cls_resnet import RepLResNet
    from repl_mm.models.cls_vit import RepLVisionTransformer
    m = RepLResNet(depth=50, drop_path_rate=0.3)
    # upstream uses Identity for a zero rate (block 1)
    rates = [
        getattr(b.drop_path, 'drop_prob', 0.0) for layer in m.res_layers
        for b in getattr(m, layer)
    ]
    assert m.layer2[1].drop_path.drop_prob == pytest.approx(
        0.3 * 4 / 15)  # block 5 of 16 on linspace(0, 0.3, 16)
    assert len(rates) == 16
    vit = RepLVisionTransformer(**TINY_VIT, drop_path_rate=0.5)
    assert vit.layers[3].drop_path.drop_prob == pytest.approx(0.5 * 3 / 5)


def test_out_indices_and_zero_init_residual():
    from repl_mm.models.cls_resnet import RepLResNet
    m = RepLResNet(depth=18, out_indices=(0, 1, 2, 3), zero_init_residual=True)
    m.init_weights()
    assert len(m.eval()(torch.rand(1, 3, 32, 32))) == 4
    assert torch.all(m.layer1[0].norm2.weight == 0)
    assert torch.all(
        m.layer2[1].site_norm.weight == 0)  # the site's (zero_init)


def test_layer_depth_of_sites():
    from repl_mm.models.cls_resnet import RepLResNet
    from repl_mm.models.cls_vit import RepLVisionTransformer
    m = RepLResNet(depth=50)
    ref = m.get_layer_depth('backbone.layer2.1.conv1.weight', 'backbone.')
    assert m.get_layer_depth('backbone.layer2.1.phi2_prev', 'backbone.') == ref
    vit = RepLVisionTransformer(**TINY_VIT)
    assert vit.get_layer_depth('backbone.layers.3.alpha', 'backbone.') == \
        vit.get_layer_depth('backbone.layers.3.ln1.weight', 'backbone.')


def test_vit_options():
    from repl_mm.models.cls_vit import RepLVisionTransformer
    m = RepLVisionTransformer(**TINY_VIT, replacement=dict(num_scalars=1))
    site = m.layers[3]
    assert isinstance(site, TransformerSite) and site.tied
    assert hasattr(site, 'alpha') and not hasattr(site, 'beta')
    m = RepLVisionTransformer(**TINY_VIT, replacement=dict(vit_weights='attn'))
    assert m.layers[3].mlp_weight.shape == (32, 32)
    assert m.replacement_plan.sites[0].sources == {
        'attn': ('prev', 'next'),
        'mlp': ('own', )
    }
    m = RepLVisionTransformer(**TINY_VIT, replacement=dict(vit_weights='none'))
    s = m.layers[3]
    assert not hasattr(s, 'alpha') and not hasattr(s, 'beta')
    m = RepLVisionTransformer(**TINY_VIT, replacement=dict(neighbors='next'))
    assert not hasattr(m.layers[3], 'alpha')


def test_residual_false_is_literal_eq12():
    from repl_mm.models.cls_resnet import RepLResNet
    m = RepLResNet(
        depth=18, replacement=dict(residual=False, zero_init=False)).eval()
    site = m.layer2[1]
    assert isinstance(site, ConvSite)
    h = torch.rand(1, 128, 4, 4)
    mats = site.synthesize()
    x_hat = torch.einsum('oc,bchw->bohw', mats[1] @ mats[0], h)
    assert torch.allclose(
        site(h), torch.relu(site.site_norm(x_hat)), atol=1e-5)


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_repl_with_cp_keeps_less_than_cp_alone(case):
    """Fused sites add no feature map to a checkpointed network's kept
    tensors, only their synthesized weights (kept so that backward does not
    synthesize again); a site checkpointed on its own would tie with the
    block it replaced."""
    from repl_mm.analysis import saved_bytes
    from repl_mm.core import ConvNeXtSite, ConvSite, TransformerSite

    def measure(**replacement):
        torch.manual_seed(0)
        model = case.cls('repl')(
            **case.kwargs, with_cp=True, replacement=replacement).train()
        x = torch.rand(case.shape, requires_grad=True)
        params = {p.data_ptr() for p in model.parameters()}
        # the synthesized weights (an owned weight is a parameter)
        kept = sum(t.numel() * t.element_size() for m in model.modules()
                   if isinstance(m, (ConvSite, TransformerSite, ConvNeXtSite))
                   for t in m.weights(x) if t.data_ptr() not in params)
        return saved_bytes(model, lambda m: weighted_loss(outputs(m, x)),
                           lambda loss: loss.backward()), kept

    (e2e, _), (repl, kept), (drop, _) = (measure(mode='none'), measure(),
                                         measure(mode='drop'))
    assert kept > 0
    # fused: the site's boundary is not kept either
    assert repl == drop + kept
    # the inputs here are tiny: weight-sized tensors can outweigh the
    # feature maps, so compare the maps only
    assert repl - kept < e2e
