"""Contract tests over every registered RepL backbone and every mode."""
import copy

import pytest
import torch
from torch import nn

from repl_mm.core import ConvSite, InterpolatedBlock, TransformerSite
from repl_mm.core.cnn_site import ConvSite as _ConvSite

from .cases import CASES, IDS

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
    if isinstance(site._sources, dict):  # TransformerSite
        return [(n, m.weight) for lst in site._sources.values()
                for n, pair in lst for m in pair]
    return [(n, conv.weight) for lst in site._sources for n, conv in lst]


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_neighbours_get_gradient_through_synthesis(case, monkeypatch):
    model = case.build(zero_init=False)
    x = torch.rand(case.shape)
    sites = [m for m in model.modules()
             if isinstance(m, (ConvSite, TransformerSite))]
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


def expected_counts(case, mode, ref, plan):
    """Independent parameter count of the sites (spec §2-§4)."""
    blocks = site_blocks_of(ref, case)
    removed = added = 0
    for s in plan.sites:
        blk = blocks[s.index - 1]
        if mode == 'none':
            continue
        if mode == 'drop':
            removed += sum(p.numel() for p in blk.parameters())
            continue
        if case.kind == 'conv':
            convs = [blk.conv1, blk.conv2] + (
                [blk.conv3] if hasattr(blk, 'conv3') else [])
            if mode == 'synthesize':
                removed += sum(p.numel() for p in blk.parameters())
                for c, src in zip(convs, s.sources.values()):
                    cout, cin = c.weight.shape[:2]
                    added += cout * cin if src == ('own', ) else \
                        cout * len(src)
                added += 2 * convs[-1].weight.shape[0]  # fresh norm
            else:  # interpolate
                for c, src in zip(convs, s.sources.values()):
                    if src != ('own', ):
                        removed += c.weight.numel()
                added += len({n for v in s.sources.values() for n in v
                              if n != 'own'})
        else:
            d = blk.embed_dims
            if mode == 'synthesize':
                removed += sum(p.numel() for p in blk.parameters())
                used = {n for v in s.sources.values() for n in v
                        if n != 'own'}
                added += len(used) + 2 * d + sum(
                    d * d for v in s.sources.values() if v == ('own', ))
            else:
                removed += blk.attn.qkv.weight.numel() + \
                    blk.attn.proj.weight.numel()
                added += len({n for v in s.sources.values() for n in v})
    return removed, added


def site_blocks_of(model, case):
    if case.kind == 'conv':
        return [b for name in model.res_layers for b in getattr(model, name)]
    return list(model.layers)


def count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_parameter_count(case, mode):
    model = case.build(mode=mode)
    ref = case.build_upstream()
    removed, added = expected_counts(case, mode, ref, model.replacement_plan)
    assert model.replacement_plan.removed_params == removed
    assert model.replacement_plan.added_params == added
    assert count(model) == count(ref) - removed + added
    if mode != 'none':
        assert removed > 0


def load_kept(model, ref):
    missing, unexpected = model.load_state_dict(ref.state_dict(),
                                                strict=False)
    return missing, unexpected


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_drop_equals_physical_removal(case):
    model = case.build(mode='drop')
    ref = case.build_upstream()
    load_kept(model, ref)
    removed = copy.deepcopy(ref)
    blocks = site_blocks_of(removed, case)
    for i in model.replacement_plan.indices:
        for parent in [getattr(removed, n) for n in getattr(
                removed, 'res_layers', [])] or [removed.layers]:
            for k in range(len(parent)):
                if parent[k] is blocks[i - 1]:
                    parent[k] = nn.Identity()
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
        {k: v for k, v in model.state_dict().items()
         if k != 'replacement_plan'}, strict=False)
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


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_sites_are_the_right_modules(case):
    model = case.build()
    sites = [m for m in model.modules()
             if isinstance(m, (ConvSite, TransformerSite))]
    assert len(sites) == len(model.replacement_plan.indices)
    interp = case.build(mode='interpolate')
    assert sum(isinstance(m, InterpolatedBlock) for m in interp.modules()) \
        == len(interp.replacement_plan.indices)
    assert _ConvSite is ConvSite
