"""The span and bias diagnostics on a ResNeXt (grouped-conv sites, spec
§9.1): the block enumeration of the upstream class and the RepL twin, a
span fit over its would-be sites, and the forward/gradient deviations of
its sites."""
import torch
from mmengine.registry import MODELS, init_default_scope
from mmpretrain.models.backbones import ResNeXt

from repl_mm.analysis.bias import measure_bias
from repl_mm.analysis.span import (collect_span_stats, residual_blocks,
                                   would_be_sites)
from repl_mm.models.cls_resnext import RepLResNeXt

TINY = dict(
    depth=50, groups=4, width_per_group=4, stem_channels=8, base_channels=8)


def classifier(**replacement):
    init_default_scope('mmpretrain')
    model = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(TINY, type='RepLResNeXt', replacement=replacement),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=3, in_channels=256)))
    model.init_weights()
    with torch.no_grad():  # upstream heads start at ~0
        torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    return model


def batch(n=4, seed=0):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(seed)
    return dict(
        inputs=torch.randn(n, 3, 32, 32, generator=g),
        data_samples=[DataSample().set_gt_label(i % 3) for i in range(n)])


def test_residual_blocks_of_resnext():
    blocks = residual_blocks(RepLResNeXt(**TINY))
    assert blocks == residual_blocks(ResNeXt(**TINY))
    assert len(blocks) == 16
    assert would_be_sites(blocks)[:3] == [2, 3, 5]


def test_span_stats_of_resnext_sites():
    stats, _ = collect_span_stats(
        classifier(mode='none'), [batch()], num_images=4, sites=[5, 9])
    assert sorted(stats) == [5, 9]
    for s in stats.values():
        assert s['span'] == 'prev+next' and 0 <= s['error'] <= 1


def test_bias_of_resnext_sites():
    res = measure_bias(classifier(zero_init=False), [batch()])
    assert res['sites'] == [5, 9, 12]
    rows = res['rows']
    assert (rows[0]['d_fwd'], rows[0]['d_grad']) == (0.0, 0.0)
    assert rows[1]['d_fwd'] > 1e-4 and rows[1]['d_grad'] > 1e-4
    zero = measure_bias(classifier(zero_init=True), [batch()])['rows']
    assert all(r['d_fwd'] == 0.0 for r in zero)


def test_benchmark_resnext50_case():
    """The suite's ResNeXt-50 32x4d: grouped sites, stochastic depth for
    the 'sd' methods (mmpretrain's ResNeXt has drop_path_rate), and a
    stock ResNeXt config maps to its twin."""
    from repl_mm.analysis.benchmark import method_model_cfg
    from repl_mm.analysis.cases import build_model, make_case, suite_cases
    case, = suite_cases(['resnext50'], quick=True)
    assert case.backbone_type == 'RepLResNeXt' and case.input_size == (112,
                                                                       112)
    sd = method_model_cfg(case, 'repl+sd')['backbone']
    assert sd['drop_path_rate'] > 0
    model = build_model(case.scope, method_model_cfg(case, 'repl'))
    sites = model.backbone.site_modules()
    assert sorted(sites) == [5, 9, 12]
    assert all(s.conv_groups == (1, 32, 1) for s in sites.values())
    stock = make_case(
        dict(
            default_scope='mmdet',
            model=dict(
                type='RetinaNet',
                backbone=dict(type='ResNeXt', depth=50, groups=32))))
    assert stock.backbone_type == 'RepLResNeXt'
