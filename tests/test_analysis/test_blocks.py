"""Single sites against the blocks they replace
(repl_mm/analysis/blocks.py) on a CIFAR ResNet-20 at batch 2: the sites,
their input shapes, and how the options order the counted figures.
Nothing here asserts a speed."""
import pytest
import torch

from repl_mm.analysis import blocks, profiling
from repl_mm.analysis.blocks import OPTIONS, measure_blocks
from .test_benchmark import r20_case


def test_blocks_of_resnet20(monkeypatch):
    loads = iter([(1.0, 0, 0), (5.0, 0, 0)])
    monkeypatch.setattr(profiling.os, 'getloadavg', lambda: next(loads))
    res = measure_blocks(r20_case(repeats=3), repeats=2)
    assert res['options'] == list(OPTIONS) == ['recompute', 'no recompute']
    assert res['load']['reliable'] is False and res['load']['max'] == 5.0
    rows = res['rows']
    assert [r['index'] for r in rows] == [5, 8]
    assert [r['name'] for r in rows] == ['layer2.1', 'layer3.1']
    assert [r['shape'] for r in rows] == [[2, 32, 16, 16], [2, 64, 8, 8]]
    for r in rows:
        rc, no = r['sites']['recompute'], r['sites']['no recompute']
        # a site's 1x1 chain costs less than the block's 3x3 convs; its
        # recompute re-runs the chain in backward
        assert 0 < no['flops'] < rc['flops'] < r['block']['flops']
        # recompute keeps less than no recompute, both less than the block
        assert 0 < rc['bytes'] < no['bytes'] < r['block']['bytes']
        for s in (rc, no):
            assert s['bytes_ratio'] == pytest.approx(s['bytes'] /
                                                     r['block']['bytes'])
            assert s['flops_ratio'] == pytest.approx(s['flops'] /
                                                     r['block']['flops'])
            assert set(s['time_ratio']) == {'median', 'q1', 'q3'}
            assert s['time_ms']['median'] > 0


def test_unknown_option_raises():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['fast'\]"):
        measure_blocks(r20_case(repeats=3), options=['fast'])


def test_profile_of_resnet20():
    """The per-op profile: exclusive shares that add up to one, the top
    ops by self time, and the op calls, which are counted, not timed: a
    site (synthesis, the 1x1 chain, its hand-written backward) calls more
    aten ops than the BasicBlock it replaces. No share is asserted: they
    are timings."""
    res = measure_blocks(
        r20_case(repeats=3), repeats=1, options=['recompute'], profile=1)
    for r in res['rows']:
        for p in (r['block']['profile'], r['sites']['recompute']['profile']):
            assert p['self_ms'] > 0 and p['aten_calls'] > 0
            assert sum(p['shares'].values()) == pytest.approx(1.0)
            ms = [t['ms'] for t in p['top']]
            assert ms == sorted(ms, reverse=True) and len(ms) == 5
            assert sum(t['share'] for t in p['top']) <= 1 + 1e-9
        assert r['block']['profile']['aten_calls'] < \
            r['sites']['recompute']['profile']['aten_calls']


def test_profile_needs_the_cpu(monkeypatch):
    # no CUDA here: the device check is reached as it would be on a GPU
    monkeypatch.setattr(blocks, 'resolve_device',
                        lambda d: torch.device('cuda', 0))
    with pytest.raises(ValueError, match=r"profile=1: .* device is cuda:0"):
        measure_blocks(r20_case(repeats=3), profile=1, device='cuda')


def test_compiled_blocks_time_the_compiled_modules(monkeypatch):
    """With a backend every block and site is timed as its compiled
    module (here 'eager': dynamo's tracing without code generation);
    bytes and FLOPs stay the eager modules'."""
    compiled = []
    real = torch.compile

    def spy(module, backend):
        compiled.append((type(module).__name__, backend))
        return real(module, backend=backend)

    monkeypatch.setattr(torch, 'compile', spy)
    case = r20_case(repeats=3)
    eager = measure_blocks(case, repeats=1, options=['recompute'])
    res = measure_blocks(
        case, repeats=1, options=['recompute'], compile_backend='eager')
    assert res['compile_backend'] == 'eager' and eager['compile_backend'] \
        is None
    assert sorted(compiled) == sorted([('BasicBlock', 'eager')] * 2 +
                                      [('ConvSite', 'eager')] * 2)
    for r, e in zip(res['rows'], eager['rows']):
        assert r['block']['flops'] == e['block']['flops']
        assert r['sites']['recompute']['bytes'] == \
            e['sites']['recompute']['bytes']
        assert r['sites']['recompute']['time_ms']['median'] > 0


def test_blocks_of_a_tiny_swin():
    """A Swin block is called as block(x, hw_shape): the single-block
    steps call the block and its sites so too."""
    from repl_mm.analysis.cases import make_case
    case = make_case(
        dict(
            default_scope='mmpretrain',
            model=dict(
                type='ImageClassifier',
                backbone=dict(
                    type='SwinTransformer',
                    arch=dict(
                        embed_dims=16, depths=[2, 6, 1], num_heads=[1, 2, 4]),
                    img_size=32,
                    window_size=2,
                    out_indices=(2, )),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead', num_classes=10, in_channels=64))),
        name='swin',
        input_size=32,
        batch_size=2)
    res = measure_blocks(case, repeats=1, warmup=0, options=['recompute'])
    rows = res['rows']
    assert [r['index'] for r in rows] == [4, 8]
    assert [r['name']
            for r in rows] == ['stages.1.blocks.1', 'stages.1.blocks.5']
    assert [r['shape'] for r in rows] == [[2, 16, 32], [2, 16, 32]]
    for r in rows:
        site = r['sites']['recompute']
        # (at 16 tokens of width 32 the synthesis, ~10 d^3 per step,
        # outweighs the block: no FLOP order holds at this size)
        assert site['flops'] > 0 and r['block']['flops'] > 0
        assert 0 < site['bytes'] < r['block']['bytes']
