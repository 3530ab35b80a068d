"""Swin blocks (spec §9.2): numbering over stages, neighbours across patch
merging, owned operators, hw_shape through every stand-in, with_cp,
frozen stages, layer depth, refused block variants."""
import pytest
import torch

from repl_mm.core import (DroppedBlock, InterpolatedBlock,
                          NonReentrantCheckpoint, TransformerSite)
from repl_mm.models.base import to_repl_backbone
from .cases import CASES, TINY_CLS_SWIN, TINY_SWIN
from .test_contract import outputs, weighted_loss

SWIN = [c for c in CASES if c.name.endswith('-swin')]
SWIN_IDS = [c.name for c in SWIN]


def swin_kwargs(case, depths, **kw):
    """The case's tiny Swin with other depths (widths 16, 32, 64, ...)."""
    n = len(depths)
    heads = [1, 2, 4, 4][:n]
    if 'arch' in case.kwargs:
        return dict(
            TINY_CLS_SWIN,
            arch=dict(embed_dims=16, depths=list(depths), num_heads=heads),
            out_indices=tuple(range(n)),
            **kw)
    return dict(
        TINY_SWIN,
        depths=tuple(depths),
        num_heads=tuple(heads),
        strides=(4, ) + (2, ) * (n - 1),
        out_indices=tuple(range(n)),
        **kw)


@pytest.mark.parametrize('case', SWIN, ids=SWIN_IDS)
def test_swin_t_numbering_and_width_rule(case):
    """Swin-T's depths 2, 2, 6, 2: 12 blocks, sites 4 and 8; site 4's next
    neighbour (block 5) lies across the patch merging, at twice the width:
    it does not serve, site 4 draws from block 3 only; site 8 from both."""
    m = case.cls('repl')(**swin_kwargs(case, (2, 2, 6, 2)))
    plan = m.replacement_plan
    assert plan.num_blocks == 12 and plan.indices == (4, 8)
    s4, s8 = plan.sites
    assert (s4.stage, s4.block, s4.prev, s4.next) == (2, 2, 3, 5)
    assert s4.sources == {'attn': ('prev', ), 'mlp': ('prev', )}
    assert (s8.stage, s8.block) == (3, 4)
    assert s8.sources == {'attn': ('prev', 'next'), 'mlp': ('prev', 'next')}
    site4 = m.stages[1].blocks[1]
    assert isinstance(site4, TransformerSite)
    assert hasattr(site4, 'alpha') and not hasattr(site4, 'beta')
    assert site4.dim == 32
    row = next(r for r in str(plan).splitlines() if r.startswith('4 '))
    assert 'attn:prev mlp:prev' in row


@pytest.mark.parametrize('case', SWIN, ids=SWIN_IDS)
def test_one_sided_site_draws_from_its_side_only(case):
    """Site 8 of the tiny case: its next neighbour (block 9, width 64)
    does not serve; the synthesized operators are alpha times block 7's."""
    m = case.build(zero_init=False)
    site = m.stages[1].blocks[5]
    assert isinstance(site, TransformerSite)
    assert site.sources == {'attn': ('prev', ), 'mlp': ('prev', )}
    prev = m.stages[1].blocks[4]
    ops = site.synthesize()
    v = prev.attn.w_msa.qkv.weight[64:96]  # rows 2d..3d of qkv, d = 32
    a_prev = prev.attn.w_msa.proj.weight @ v
    m_prev = prev.ffn.layers[1].weight @ prev.ffn.layers[0][0].weight
    assert torch.allclose(ops['attn'], site.alpha * a_prev, atol=1e-6)
    assert torch.allclose(ops['mlp'], site.alpha * m_prev, atol=1e-6)


@pytest.mark.parametrize('mode', ['synthesize', 'interpolate', 'static'])
@pytest.mark.parametrize('case', SWIN, ids=SWIN_IDS)
def test_site_with_no_serving_neighbour_owns_its_operators(case, mode):
    """Depths 1, 1, 1 with site 2: both neighbours have other widths (16
    and 64 against 32), so the site owns d x d operators (synthesize), or
    its block keeps its own weights (interpolate); the plan says 'own'."""
    m = case.cls('repl')(
        **swin_kwargs(case, (1, 1, 1)),
        replacement=dict(mode=mode, indices=[2], zero_init=False))
    site = m.stages[1].blocks[0]
    record = m.replacement_plan.sites[0]
    assert (record.prev, record.next) == (1, 3)
    if mode == 'interpolate':
        assert isinstance(site, InterpolatedBlock)
        assert record.sources == {'qkv': ('own', ), 'proj': ('own', )}
        assert not hasattr(site, 'alpha') and not hasattr(site, 'beta')
        assert site.block.attn.w_msa.qkv.weight.shape == (96, 32)
    else:
        assert record.sources == {'attn': ('own', ), 'mlp': ('own', )}
        assert 'own' in str(m.replacement_plan)
    if mode == 'synthesize':
        assert isinstance(site, TransformerSite)
        assert not hasattr(site, 'alpha') and not hasattr(site, 'beta')
        assert site.attn_weight.shape == (32, 32)
        assert site.mlp_weight.shape == (32, 32)
        # added: two owned operators and the fresh LN of width 32
        assert record.added_params == 2 * 32 * 32 + 2 * 32
        # its static twin computes the same (the owned operators fold)
        from repl_mm.converters.to_static import (check_equal,
                                                  static_replacement,
                                                  to_static)
        static = case.cls('repl')(
            **swin_kwargs(case, (1, 1, 1)),
            replacement=static_replacement(
                dict(mode=mode, indices=[2], zero_init=False)))
        to_static(m.eval(), static.eval())
        check_equal(m, static, torch.rand(2, 3, 32, 32), tol=1e-5)
    if mode != 'static':
        m.train()
        weighted_loss(outputs(m, torch.rand(2, 3, 32, 32))).backward()
        for name, p in m.named_parameters():
            assert p.grad is not None, name
    else:
        m.eval()
        assert all(
            torch.isfinite(o).all()
            for o in outputs(m, torch.rand(2, 3, 32, 32)))


@pytest.mark.parametrize('case', SWIN, ids=SWIN_IDS)
def test_every_stand_in_takes_hw_shape(case):
    """Each mode's module stands in the block's place called as
    ``block(x, hw_shape)``; token-wise sites give the same result for any
    hw_shape."""
    x = torch.rand(2, 16, 32)
    for mode, expected in (('synthesize', TransformerSite),
                           ('interpolate', InterpolatedBlock), ('drop',
                                                                DroppedBlock)):
        m = case.build(mode=mode, zero_init=False).eval()
        site = m.stages[1].blocks[1]
        assert isinstance(site, expected)
        out = site(x, (4, 4))
        assert out.shape == x.shape
        if mode == 'drop':
            assert out is x
        if mode == 'synthesize':
            assert torch.equal(out, site(x, (2, 8)))


@pytest.mark.parametrize('case', SWIN, ids=SWIN_IDS)
def test_upstream_with_cp_becomes_non_reentrant(case, monkeypatch):
    """Upstream's with_cp is the reentrant checkpoint: under RepL (the
    registry and the hook route alike) every kept block is a
    non-reentrant checkpointed block and only use_reentrant=False runs."""
    kw = dict(case.kwargs, with_cp=True)
    torch.manual_seed(0)
    stock = case.cls('upstream')(**kw)
    to_repl_backbone(stock, {})
    torch.manual_seed(0)
    repl = case.cls('repl')(**kw)
    for m in (stock, repl):
        kept = [
            b for s in m.stages for b in s.blocks
            if not isinstance(b, TransformerSite)
        ]
        assert kept and all(
            isinstance(b, NonReentrantCheckpoint) and b.with_cp for b in kept)
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get('use_reentrant'))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', spy)
    monkeypatch.setattr('repl_mm.core.recompute.checkpoint', spy)
    x = torch.rand(case.shape, requires_grad=True)
    weighted_loss(outputs(stock.train(), x)).backward()
    assert calls and all(c is False for c in calls)


@pytest.mark.parametrize('case', SWIN, ids=SWIN_IDS)
def test_frozen_blocks_are_upstreams(case):
    """``_block_frozen`` says what upstream's ``frozen_stages`` freezes
    (mmdet/mmseg: stages 1..i; mmpretrain: stages 1..i+1)."""
    frozen_stages = case.extra['frozen']['frozen_stages']
    ref = case.cls('upstream')(**case.kwargs, frozen_stages=frozen_stages)
    ref.train()
    model = case.build(mode='none')
    model.frozen_stages = frozen_stages
    blocks = [b for s in ref.stages for b in s.blocks]
    states = [not any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert any(states) and not all(states)
    assert states == [model._block_frozen(i) for i in range(1, 10)]


@pytest.mark.parametrize('case', SWIN, ids=SWIN_IDS)
def test_drop_path_of_the_replaced_block(case):
    m = case.cls('repl')(**dict(case.kwargs, drop_path_rate=0.4))
    ref = case.cls('upstream')(**dict(case.kwargs, drop_path_rate=0.4))
    blocks = [b for s in ref.stages for b in s.blocks]
    for i, site in m.site_modules().items():
        rate = blocks[i - 1].ffn.dropout_layer.drop_prob
        assert rate > 0
        assert site.drop_path.drop_prob == pytest.approx(rate)


def test_layer_depth_of_sites():
    """mmpretrain's layer-wise lr decay gives a site its block's depth."""
    case = next(c for c in SWIN if c.name == 'cls-swin')
    m = case.build()
    assert isinstance(m.stages[1].blocks[1], TransformerSite)
    ref = case.cls('upstream')(**case.kwargs)
    # block 4 of 9 (stage 2, block 2): depth 4 of 9 + 2
    assert m.get_layer_depth('backbone.stages.1.blocks.1.alpha',
                             'backbone.') == (4, 11) == \
        ref.get_layer_depth('backbone.stages.1.blocks.1.norm1.weight',
                            'backbone.')


def test_refuses_an_ffn_it_cannot_collapse():
    from repl_mm.models.cls_swin import RepLSwinTransformer
    with pytest.raises(ValueError, match='num_fcs=2.*num_fcs=3'):
        RepLSwinTransformer(**dict(
            TINY_CLS_SWIN,
            stage_cfgs=dict(block_cfgs=dict(ffn_cfgs=dict(num_fcs=3)))))


def test_old_mmpretrain_checkpoint_loads_into_the_repl_class():
    """mmpretrain's conversion of version-1 checkpoints (``norm.`` ->
    ``norm{last}.``, ``attn_mask`` dropped) applies to the RepL class as
    to upstream's."""
    from collections import OrderedDict

    from repl_mm.models.cls_swin import RepLSwinTransformer
    kw = dict(TINY_CLS_SWIN, out_indices=(2, ))
    src = RepLSwinTransformer(**kw, replacement=dict(mode='none'))
    sd = OrderedDict(
        (k.replace('norm2.', 'norm.', 1) if k.startswith('norm2.') else k,
         v + 1) for k, v in src.state_dict().items())
    sd['stages.0.blocks.1.attn.attn_mask'] = torch.zeros(16, 4, 4)
    sd._metadata = OrderedDict({'': dict(version=1)})
    m = RepLSwinTransformer(**kw, replacement=dict(mode='none'))
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.norm2.weight, src.norm2.weight + 1)
