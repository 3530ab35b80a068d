"""Contract tests over every registered RepL backbone and every mode."""
import copy

import pytest
import torch
from torch import nn

from repl_mm.core import (ConvNeXtSite, ConvSite, DroppedBlock,
                          InterpolatedBlock, TransformerSite)
from .cases import CASES, IDS, TINY_CONVNEXT, TINY_VIT, Case

SITE_TYPE = {
    'conv': ConvSite,
    'transformer': TransformerSite,
    'convnext': ConvNeXtSite
}

MODES = ['synthesize', 'interpolate', 'drop', 'none']


def outputs(model, x):
    out = model(x)
    return out if isinstance(out, (tuple, list)) else (out, )


def weighted_loss(outs):
    g = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)


def site_blocks(model):
    """Site index -> (parent container, key) from the plan's prefixes."""
    mods = dict(model.named_modules())
    out = {}
    for i, prefix in model._site_prefixes.items():
        parent, key = prefix[:-1].rsplit('.', 1)
        out[i] = (mods[parent], int(key))
    return out


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_shapes_grads_no_nan(case, mode):
    model = case.build(mode=mode, zero_init=False)
    ref = case.build_upstream()
    model.train()
    x = torch.rand(case.shape)
    outs = outputs(model, x)
    ref_outs = outputs(ref, x)
    assert [o.shape for o in outs] == [o.shape for o in ref_outs]
    assert all(torch.isfinite(o).all() for o in outs)
    weighted_loss(outs).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f'{name} got no gradient'
            assert p.grad.abs().sum() > 0, f'{name} got a zero gradient'


def neighbour_weights(site):
    """(neighbour name, weight) pairs a site synthesizes from."""
    if isinstance(site, ConvNeXtSite):
        return [(n, c.weight) for n, c in site.source_dw()] + [
            (n, m.weight) for n, pair in site.source_pw() for m in pair
        ]
    if isinstance(site, TransformerSite):
        return [(n, m.weight) for lst in site._sources.values()
                for n, pair in lst for m in pair]
    return [(n, conv.weight) for lst in site._sources for n, conv in lst]


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_neighbours_get_gradient_through_synthesis(case, monkeypatch):
    model = case.build(zero_init=False)
    x = torch.rand(case.shape)
    sites = [
        m for m in model.modules() if isinstance(m, tuple(SITE_TYPE.values()))
    ]
    # the site drawing from most neighbours (ResNet-18's only site draws
    # from prev alone: its next neighbour downsamples)
    site = max(sites, key=lambda m: len({n for n, _ in neighbour_weights(m)}))
    pairs = neighbour_weights(site)
    names = {n for n, _ in pairs}
    assert names == {'prev', 'next'} or case.name.endswith('r18')

    def grads():
        model.zero_grad()
        weighted_loss(outputs(model, x)).backward()
        return [w.grad.clone() for _, w in pairs]

    full = grads()
    orig = type(site).synthesize

    def detached(self):
        out = orig(self)
        if self is not site:
            return out
        if isinstance(out, dict):
            return {k: v.detach() for k, v in out.items()}
        return [m.detach() for m in out]

    monkeypatch.setattr(type(site), 'synthesize', detached)
    cut = grads()
    for name in names:
        assert any(not torch.allclose(f, c)
                   for (n, _), f, c in zip(pairs, full, cut) if n == name), \
            f'{name} neighbour got no gradient through the synthesis'


def block_containers(model):
    """The sequences holding the blocks: ResNet layers, Swin stages' blocks,
    ConvNeXt stages, a ViT's layers."""
    if hasattr(model, 'res_layers'):
        return [getattr(model, name) for name in model.res_layers]
    if hasattr(model, 'stages'):
        return [getattr(stage, 'blocks', stage) for stage in model.stages]
    return [model.layers]


def site_blocks_of(model, case):
    return [b for seq in block_containers(model) for b in seq]


def width(block):
    """A transformer block's width: a ViT layer's ``embed_dims``, a Swin
    block's attention width."""
    if hasattr(block, 'embed_dims'):
        return block.embed_dims
    return block.attn.w_msa.embed_dims


def count(m):
    return sum(p.numel() for p in m.parameters())


def independent_plan(blocks, kind, k=4):
    """Spec §1 with its defaults (interval 4, offset 0, ``shift``), from
    the upstream blocks alone: site index -> (prev, next) kept neighbour
    (1-based, None at an end)."""
    n = len(blocks)
    # replaceable: identity shortcut (ResNet: no downsample; every ViT
    # layer and ConvNeXt block)
    ok = [kind != 'conv' or b.downsample is None for b in blocks]
    sites = []
    for i in range(k, n, k):
        while i < n and (not ok[i - 1] or i in sites):
            i += 1  # shift; never the last block
        if i < n:
            sites.append(i)
    kept = [i for i in range(1, n + 1) if i not in sites]
    return {
        i: (max((j for j in kept if j < i),
                default=None), min((j for j in kept if j > i), default=None))
        for i in sorted(sites)
    }


CONVNEXT_PARTS = ('depthwise_conv', 'pointwise_conv1', 'pointwise_conv2')


def convnext_serves(blk, nbr, mode):
    """A ConvNeXt neighbour serves a site of the same width (synthesize),
    or with the same dw, pw1 and pw2 weight shapes (interpolate)."""
    if mode == 'interpolate':
        return all(
            getattr(blk, p).weight.shape == getattr(nbr, p).weight.shape
            for p in CONVNEXT_PARTS)
    return nbr.depthwise_conv.out_channels == blk.depthwise_conv.out_channels


def expected_counts(case, mode, ref):
    """Site indices and parameter counts (removed, added) from the upstream
    model's block shapes by the formulas of spec §2-§4 (``neighbors=
    'both'``), never from the plan under test."""
    blocks = site_blocks_of(ref, case)
    plan = independent_plan(blocks, case.kind)
    removed = added = 0
    for i, (prev, nxt) in plan.items():
        blk = blocks[i - 1]
        nbrs = [blocks[j - 1] for j in (prev, nxt) if j is not None]
        if mode == 'none':
            continue
        if mode == 'drop':
            removed += count(blk)
        elif case.kind == 'conv':
            names = ['conv1', 'conv2'
                     ] + (['conv3'] if hasattr(blk, 'conv3') else [])
            used = set()
            for name in names:
                w = getattr(blk, name).weight
                cout, cin = w.shape[:2]
                # synthesize: a neighbour with the same (Cout, Cin) serves;
                # interpolate: one with the same kernel
                serve = [
                    id(b) for b in nbrs
                    if (getattr(b, name).weight.shape == w.shape if mode ==
                        'interpolate' else getattr(b, name).weight.shape[:2] ==
                        (cout, cin))
                ]
                used.update(serve)
                if mode == 'synthesize':
                    # phi per serving neighbour, or an owned 1x1 weight
                    added += cout * len(serve) if serve else cout * cin
                elif serve:
                    removed += w.numel()  # interpolated, no longer owned
            if mode == 'synthesize':
                removed += count(blk)
                cout = getattr(blk, names[-1]).weight.shape[0]
                added += 2 * cout  # the fresh BN (gamma, beta)
            else:
                added += len(used)  # alpha and/or beta
        elif case.kind == 'convnext':
            dim = blk.depthwise_conv.out_channels
            serve = [b for b in nbrs if convnext_serves(blk, b, mode)]
            if mode == 'synthesize':
                # phi (length C) and alpha or beta per serving neighbour,
                # else an own D (C) and M (C x C); the fresh LN of width C
                removed += count(blk)
                added += (dim + 1) * len(serve) if serve else \
                    dim + dim * dim
                added += 2 * dim
            else:  # interpolate: dw, pw1, pw2 weights (biases stay)
                if serve:
                    removed += sum(
                        getattr(blk, p).weight.numel() for p in CONVNEXT_PARTS)
                added += len(serve)
        else:
            d = width(blk)
            # a neighbour of another width (across a Swin patch merging)
            # does not serve (spec §9.2)
            nbrs = [b for b in nbrs if width(b) == d]
            if mode == 'synthesize':
                # alpha, beta (one per neighbour), the fresh LN of width d;
                # Ahat and Mhat come from the neighbours, or are owned
                removed += count(blk)
                added += len(nbrs) + 2 * d + (0 if nbrs else 2 * d * d)
            elif nbrs:  # interpolate: qkv (3d x d) and proj (d x d)
                removed += 3 * d * d + d * d
                added += len(nbrs)
    return tuple(plan), removed, added


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_parameter_count(case, mode):
    model = case.build(mode=mode)
    ref = case.build_upstream()
    indices, removed, added = expected_counts(case, mode, ref)
    assert model.replacement_plan.indices == indices
    assert model.replacement_plan.removed_params == removed
    assert model.replacement_plan.added_params == added
    assert count(model) == count(ref) - removed + added
    if mode != 'none':
        assert removed > 0


def load_kept(model, ref):
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    return missing, unexpected


class Removed(nn.Module):
    """No block: passes its input, as called (a Swin block's ``hw_shape``
    too)."""

    def forward(self, x, *args):
        return x


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_drop_equals_physical_removal(case):
    model = case.build(mode='drop')
    ref = case.build_upstream()
    load_kept(model, ref)
    removed = copy.deepcopy(ref)
    blocks = site_blocks_of(removed, case)
    for i in model.replacement_plan.indices:
        for parent in block_containers(removed):
            for k in range(len(parent)):
                if parent[k] is blocks[i - 1]:
                    parent[k] = Removed()
    model.eval(), removed.eval()
    x = torch.rand(case.shape)
    for a, b in zip(outputs(model, x), outputs(removed, x)):
        assert torch.allclose(a, b, atol=1e-5)
    assert count(removed) == count(model)


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_scale_zero_is_skip_path(case):
    model = case.build(scale=0.0, zero_init=False)
    drop = case.build(mode='drop')
    drop.load_state_dict(
        {
            k: v
            for k, v in model.state_dict().items() if k != 'replacement_plan'
        },
        strict=False)
    model.eval(), drop.eval()
    x = torch.rand(case.shape)
    for a, b in zip(outputs(model, x), outputs(drop, x)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_none_equals_upstream(case):
    torch.manual_seed(3)
    ref = case.build_upstream()
    torch.manual_seed(3)
    model = case.build(mode='none')
    assert list(model.state_dict()) == list(ref.state_dict())
    for (k, a), b in zip(model.state_dict().items(),
                         ref.state_dict().values()):
        assert torch.equal(a, b), k
    model.eval(), ref.eval()
    x = torch.rand(case.shape)
    for a, b in zip(outputs(model, x), outputs(ref, x)):
        assert torch.equal(a, b)
    assert model.replacement_plan.indices  # same plan as the RepL twin
    assert model.replacement_plan.indices == \
        case.build().replacement_plan.indices


# The upstream backbones, narrow (ResNets: stem and base width 8).
NARROW = dict(stem_channels=8, base_channels=8)
INIT_CASES = [
    Case('det-r18', 'repl_mm.models.det_resnet:RepLResNet',
         'mmdet.models.backbones:ResNet', dict(depth=18, **NARROW)),
    Case('det-r50', 'repl_mm.models.det_resnet:RepLResNet',
         'mmdet.models.backbones:ResNet', dict(depth=50, **NARROW)),
    Case('seg-r18v1c', 'repl_mm.models.seg_resnet:RepLResNetV1c',
         'mmseg.models.backbones:ResNetV1c', dict(depth=18, **NARROW)),
    Case('cls-r18', 'repl_mm.models.cls_resnet:RepLResNet',
         'mmpretrain.models.backbones:ResNet', dict(depth=18, **NARROW)),
    Case('cls-cifar-r18', 'repl_mm.models.cls_resnet:RepLResNet_CIFAR',
         'mmpretrain.models.backbones:ResNet_CIFAR', dict(depth=18, **NARROW)),
    Case(
        'cls-vit',
        'repl_mm.models.cls_vit:RepLVisionTransformer',
        'mmpretrain.models.backbones:VisionTransformer',
        TINY_VIT,
        kind='transformer'),
    Case(
        'cls-convnext',
        'repl_mm.models.cls_convnext:RepLConvNeXt',
        'mmpretrain.models.backbones:ConvNeXt',
        TINY_CONVNEXT,
        kind='convnext'),
]


@pytest.mark.parametrize('case', INIT_CASES, ids=[c.name for c in INIT_CASES])
def test_none_equals_upstream_after_init_weights(case, monkeypatch):
    """``mode='none'`` is upstream's model at the same seed, also after
    ``init_weights``: no block is initialised twice, so every draw (and
    every later one) is upstream's."""
    import mmengine.model.base_module as base_module
    logged = []
    monkeypatch.setattr(base_module, 'print_log',
                        lambda msg, *args, **kwargs: logged.append(msg))
    torch.manual_seed(3)
    ref = case.cls('upstream')(**case.kwargs)
    ref.init_weights()
    ref_rng = torch.get_rng_state()
    torch.manual_seed(3)
    model = case.build(mode='none')
    model.init_weights()
    assert model.replacement_plan.indices  # the twin has sites planned
    a, b = model.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert not [m for m in logged if 'more than once' in m]


@pytest.mark.parametrize('name', ['det-r50', 'cls-vit'])
def test_interpolated_block_gets_upstream_init(name):
    """An ``interpolate`` site's block initialises what it keeps as
    upstream does: a ViT layer's xavier FFN (the draws of the whole model
    stay upstream's), mmdet's zero-init residual norm3 of a Bottleneck."""
    case = next(c for c in INIT_CASES if c.name == name)
    torch.manual_seed(3)
    ref = case.cls('upstream')(**case.kwargs)
    ref.init_weights()
    torch.manual_seed(3)
    model = case.build(mode='interpolate')
    model.init_weights()
    ref_sd = ref.state_dict()
    for i, site in model.site_modules().items():
        assert isinstance(site, InterpolatedBlock)
        prefix = model._site_prefixes[i]
        for k, v in site.block.state_dict().items():
            if case.kind == 'transformer' or k.startswith('bn'):
                assert torch.equal(v, ref_sd[prefix + k]), prefix + k
        if case.kind == 'conv':
            assert torch.all(site.block.norm3.weight == 0)
        assert all(
            float(p) == 0.5 for n, p in site.named_parameters()
            if n in ('alpha', 'beta'))


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_sites_are_the_right_modules(case):
    """Each mode puts its module at exactly the plan's sites (under the
    replaced block's name) and leaves upstream's block everywhere else."""
    ref_types = [type(b) for b in site_blocks_of(case.build_upstream(), case)]
    site_type = SITE_TYPE[case.kind]
    for mode, expected in (('synthesize', site_type),
                           ('interpolate', InterpolatedBlock), ('drop',
                                                                DroppedBlock)):
        model = case.build(mode=mode)
        indices = model.replacement_plan.indices
        assert indices
        blocks = site_blocks_of(model, case)
        assert len(blocks) == len(ref_types)
        mods = dict(model.named_modules())
        for i, prefix in model._site_prefixes.items():
            assert mods[prefix[:-1]] is blocks[i - 1]
        for i, (block, ref_type) in enumerate(zip(blocks, ref_types), 1):
            assert type(block) is (expected if i in indices else ref_type), i
        if mode == 'interpolate':
            assert all(
                type(blocks[i - 1].block) is ref_types[i - 1] for i in indices)
        repl = tuple(SITE_TYPE.values()) + (InterpolatedBlock, )
        assert sum(isinstance(m, repl)
                   for m in model.modules()) == (0 if mode == 'drop' else
                                                 len(indices))
