"""Span diagnostic and site choice (paper A.10/A.11): the fit
on features with known answers, the budget chooser against brute force,
the hooks on a toy backbone, the CLI end to end on a tiny CIFAR ResNet-20,
and the benchmark's ``repl_idx`` method."""
import importlib.util
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from torch import nn

from repl_mm.analysis.benchmark import make_case, method_model_cfg
from repl_mm.analysis.span import (SpanAccumulator, backbone_costs,
                                   choose_sites, collect_span_stats,
                                   e2e_twin_config, fit_span, residual_blocks,
                                   run_span_diagnostic, span_moments,
                                   would_be_sites)
from repl_mm.apis import init_model

ROOT = Path(__file__).resolve().parents[2]
DIGITS_E2E = ROOT / 'configs/demo/resnet32-e2e_1xb64_15e_digits.py'


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny convs: one thread is fastest, and on a shared machine two
    threads contending with other processes are ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_tool(name):
    spec = importlib.util.spec_from_file_location(
        name, ROOT / f'tools/analysis/{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the fit ---------------------------------------------------------------
def test_exact_span_zero_error_and_coefficients():
    prev, nxt = torch.randn(6, 3, 5, 5), torch.randn(6, 3, 5, 5)
    h = 0.3 * prev - 1.2 * nxt
    acc = SpanAccumulator()
    for s in (slice(0, 4), slice(4, 6)):  # two batches, one fit
        acc.update(h[s], prev[s], nxt[s])
    r = acc.result()
    assert acc.num_images == 6
    assert r['coef'] == pytest.approx([0.3, -1.2], abs=1e-6)
    assert r['error'] < 1e-6 and r['error_mean'] < 1e-6
    assert r['angle'] < 1e-4 and r['angle_mean'] < 1e-4


def test_orthogonal_features_error_one_angle_90():
    # per image, h lives on coordinates the neighbours never touch
    prev, nxt, h = (torch.zeros(5, 4) for _ in range(3))
    prev[:, :2] = torch.randn(5, 2)
    nxt[:, 1:3] = torch.randn(5, 2)
    h[:, 3] = torch.rand(5) + 0.5
    r = fit_span(*span_moments(h, prev, nxt))
    assert r['coef'] == pytest.approx([0, 0], abs=1e-12)
    assert r['error'] == pytest.approx(1.0)
    assert r['error_mean'] == pytest.approx(1.0)
    # the projection is zero: no angle to it (nan), never a made-up one
    assert math.isnan(r['angle'])


def test_one_neighbour_by_hand():
    # h = (1, 2) on span{(1, 0)}: a = 1, residual (0, 2), r = 2/sqrt(5),
    # angle atan(2) = 63.43 deg; aggregate and per image agree (1 image)
    g, c, s = span_moments(torch.tensor([[1., 2.]]), torch.tensor([[1., 0.]]))
    assert g.tolist() == [[[1.0]]] and c.tolist() == [[1.0]]
    r = fit_span(g, c, s)
    assert r['coef'] == pytest.approx([1.0])
    assert r['error'] == pytest.approx(2 / 5**0.5)
    assert r['angle'] == pytest.approx(math.degrees(math.atan(2)))
    assert r['angle_mean'] == pytest.approx(r['angle'])


def test_shared_coefficients_differ_from_per_image_fit():
    # image 1: h = prev, image 2: h = 3 prev (prev orthonormal rows): the
    # shared a = (1 + 3*1) / 2 = 2 leaves residuals 1 and 1 of norms 1 and
    # 3: r = sqrt(2 / 10); per image 1/1 and 1/3 -> mean 2/3; both images
    # stay collinear with their fit: angle 0
    prev = torch.eye(2)
    h = torch.tensor([[1., 0.], [0., 3.]])
    r = fit_span(*span_moments(h, prev))
    assert r['coef'] == pytest.approx([2.0])
    assert r['error'] == pytest.approx((2 / 10)**0.5)
    assert r['error_mean'] == pytest.approx(2 / 3)
    assert r['angle_mean'] == pytest.approx(0, abs=1e-5)


def test_collinear_neighbours_min_norm():
    prev = torch.randn(3, 7)
    r = fit_span(*span_moments(2 * prev, prev, prev))
    assert r['coef'] == pytest.approx([1.0, 1.0])
    assert r['error'] < 1e-7


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r'nxt has shape \(2, 3\)'):
        span_moments(torch.rand(2, 4), torch.rand(2, 4), torch.rand(2, 3))


# -- the chooser -----------------------------------------------------------
def brute_force(errors, savings, budget):
    best = None
    idx = sorted(errors)
    for k in range(len(idx) + 1):
        for sub in itertools.combinations(idx, k):
            if any(b - a == 1 for a, b in zip(sub, sub[1:])):
                continue
            if sum(savings[i] for i in sub) < budget - 1e-9:
                continue
            key = (sum(errors[i] for i in sub), k, sub)
            best = key if best is None or key < best else best
    return best


def test_choose_sites_non_adjacent_lowest_total_error():
    errors = {2: 0.1, 3: 0.05, 4: 0.2, 6: 0.3}
    # lowest total error of 2 non-adjacent sites: 2 + 4 (0.3), not the
    # greedy 3 + 6 (0.35), and never 2 + 3 or 3 + 4
    assert choose_sites(errors, None, 2) == [2, 4]
    assert choose_sites(errors, None, 1) == [3]
    # non-adjacency not binding: simply the lowest errors
    assert choose_sites({2: .3, 4: .1, 6: .2, 8: .4}, None, 2) == [4, 6]


def test_choose_sites_meets_a_saving_budget():
    errors = {2: 0.1, 3: 0.2, 5: 0.3, 7: 0.05}
    savings = {2: 0.05, 3: 0.3, 5: 0.1, 7: 0.1}
    # {3} saves 0.3 >= 0.25 at error 0.2; {2, 5, 7} saves 0.25 at 0.45
    assert choose_sites(errors, savings, 0.25) == [3]
    assert choose_sites(errors, savings, 0.1) == [7]
    chosen = choose_sites(errors, savings, 0.45)
    assert sum(savings[i] for i in chosen) >= 0.45 and chosen == [3, 5, 7]


def test_choose_sites_unreachable_budget():
    errors = {2: 0.1, 3: 0.2, 4: 0.3}
    with pytest.raises(
            ValueError, match=r'num_sites=3 is unreachable.*at most 2'):
        choose_sites(errors, None, 3)
    with pytest.raises(
            ValueError, match=r'flops_saving=0.6 is unreachable'
            r'.*at most 0.5'):
        choose_sites(errors, {2: .2, 3: .4, 4: .3}, 0.6, 'flops_saving')


def test_choose_sites_matches_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        idx = sorted(rng.sample(range(2, 14), rng.randint(1, 8)))
        errors = {i: rng.choice([0.0, rng.random()]) for i in idx}
        savings = {i: rng.choice([0.1, rng.random() / 4]) for i in idx}
        budget = rng.uniform(0.01, 0.6)
        best = brute_force(errors, savings, budget)
        if best is None:
            with pytest.raises(ValueError, match='unreachable'):
                choose_sites(errors, savings, budget)
        else:
            got = choose_sites(errors, savings, budget)
            assert (sum(errors[i] for i in got), len(got)) == \
                pytest.approx(best[:2])


# -- the hooks -------------------------------------------------------------
class Cube(nn.Module):

    def forward(self, x):
        return x**3


class Recover(nn.Module):
    """h3 = (h2 - a cbrt(h2)) / b, so h2 = a h1 + b h3 with h1 = cbrt(h2)
    (after a Cube): the span holds h2 exactly, h1 and h3 not collinear."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, y):
        return (y - self.a * torch.sign(y) * y.abs()**(1 / 3)) / self.b


class ToyBackbone(nn.Module):

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(6, 6),
             Cube(), Recover(0.7, -0.4),
             nn.Tanh()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class ToyModel(nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone = ToyBackbone()

    @staticmethod
    def data_preprocessor(data, training):
        return data


def test_collect_span_stats_on_a_toy_backbone():
    torch.manual_seed(0)
    batches = [dict(inputs=torch.randn(4, 6)) for _ in range(5)]
    stats, blocks = collect_span_stats(ToyModel(), batches, num_images=10)
    assert [b['name'] for b in blocks] == [f'layers.{i}' for i in range(4)]
    assert sorted(stats) == [2, 3]  # block 1 has none before, 4 is last
    s = stats[2]
    assert s['num_images'] == 10 and s['shape'] == [6]
    assert s['span'] == 'prev+next'
    assert (s['a'], s['b']) == pytest.approx((0.7, -0.4), abs=1e-4)
    assert s['error'] < 1e-5 and s['angle'] < 1e-3
    assert stats[3]['error'] > 1e-3  # tanh(h3) is not in its neighbours' span


def test_collect_span_stats_refuses_a_block_that_is_no_site():
    batches = [dict(inputs=torch.randn(4, 6))]
    for sites in ([1], [2, 4]):  # the first block; the last block
        with pytest.raises(ValueError, match=r'not would-be sites.*\[2, 3\]'):
            collect_span_stats(ToyModel(), batches, 4, sites=sites)


def test_dead_block_left_out_of_a_saving_budget(tmp_path, test_root):
    """A block that outputs zero on every image has no error: it is left
    out of the choice under any budget."""
    cfg = Config.fromfile(DIGITS_E2E)
    cfg.merge_from_dict({
        'model.backbone.depth': 20,
        'test_dataloader.dataset.data_root': test_root
    })
    torch.manual_seed(0)
    model = init_model(e2e_twin_config(cfg))
    with torch.no_grad():  # block 2's output: relu(-1e6 + x) = 0; the
        model.backbone.layer1[1].bn2.bias.fill_(-1e6)  # blocks after it
        model.backbone.layer1[2].bn2.bias.normal_()  # are not zero again
    path = tmp_path / 'dead.pth'
    torch.save(dict(state_dict=model.state_dict()), path)
    res = run_span_diagnostic(
        cfg, str(path), num_images=8, budget=('flops_saving', 0.1))
    fits = {b['index']: b['fit'] for b in res['blocks'] if 'fit' in b}
    assert math.isnan(fits[2]['error'])
    assert 2 not in res['choice']['indices']
    assert res['choice']['flops_saving'] >= 0.1


def test_residual_blocks_mirror_the_plan():
    from repl_mm.models.cls_resnet import RepLResNet_CIFAR
    from repl_mm.models.cls_vit import RepLVisionTransformer
    r20 = RepLResNet_CIFAR(depth=20, replacement=dict(mode='none'))
    blocks = residual_blocks(r20)
    assert len(blocks) == 9 == r20.replacement_plan.num_blocks
    assert [b['replaceable'] for b in blocks].count(False) == 2  # 4 and 7
    assert would_be_sites(blocks) == [2, 3, 5, 6, 8]
    assert (blocks[4]['name'], blocks[4]['stage'], blocks[4]['block']) == \
        ('layer2.1', 2, 2)
    vit = RepLVisionTransformer(
        arch=dict(
            embed_dims=16, num_layers=4, num_heads=2, feedforward_channels=32),
        img_size=16,
        patch_size=8,
        replacement=dict(mode='none', interval=2))
    assert would_be_sites(residual_blocks(vit)) == [2, 3]


def test_residual_blocks_of_swin():
    """Swin blocks numbered over stages; a block opening a stage after
    its patch merging (block 3, stage 2's first) has no previous output
    of its shape: its span is its next neighbour alone, as its site's
    sources would be."""
    from mmdet.models.backbones import SwinTransformer

    from repl_mm.models.det_swin import RepLSwinTransformer
    kw = dict(
        embed_dims=16,
        depths=(2, 6, 1),
        num_heads=(1, 2, 4),
        strides=(4, 2, 2),
        window_size=2,
        out_indices=(0, 1, 2))
    blocks = residual_blocks(RepLSwinTransformer(**kw))
    assert blocks == residual_blocks(SwinTransformer(**kw))
    assert [(b['name'], b['stage'], b['block'])
            for b in blocks[2:4]] == [('stages.1.blocks.0', 2, 1),
                                      ('stages.1.blocks.1', 2, 2)]
    assert would_be_sites(blocks) == [2, 3, 4, 5, 6, 7, 8]

    class Task(torch.nn.Module):

        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def data_preprocessor(self, data, training):
            return data

    batches = [dict(inputs=torch.rand(2, 3, 32, 32)) for _ in range(2)]
    stats, _ = collect_span_stats(
        Task(RepLSwinTransformer(**kw, replacement=dict(mode='none'))),
        batches, 4)
    assert sorted(stats) == [2, 3, 4, 5, 6, 7, 8]
    # block 8's next one (9) lies across the patch merging: prev only;
    # block 3's previous one (2) too: next only
    assert stats[8]['span'] == 'prev' and stats[5]['span'] == 'prev+next'
    assert stats[3]['span'] == 'next' and stats[3]['a'] is None
    assert stats[5]['shape'] == [16, 32] and stats[5]['num_images'] == 4


def test_residual_blocks_of_an_upstream_backbone():
    """The adapter's enumeration, also for the upstream class it extends;
    a site stands in its block's slot."""
    from mmpretrain.models.backbones import ResNet

    from repl_mm.models.cls_resnet import RepLResNet
    assert residual_blocks(ResNet(depth=18)) == residual_blocks(
        RepLResNet(depth=18))
    with pytest.raises(ValueError, match='has neither res_layers'):
        residual_blocks(torch.nn.Sequential())


# -- the tool --------------------------------------------------------------
@pytest.fixture(scope='module')
def test_root(tmp_path_factory):
    """A small CIFAR-format set standing in for data/digits (which a clean
    clone does not have)."""
    import subprocess
    import sys
    root = tmp_path_factory.mktemp('data') / 'syn'
    subprocess.run([
        sys.executable,
        str(ROOT / 'tools/dataset_converters/make_datasets.py'),
        'synthetic-cifar', '--out',
        str(root), '--num-per-class', '20'
    ],
                   check=True,
                   capture_output=True)
    return str(root)


@pytest.fixture(scope='module')
def r20_checkpoint(tmp_path_factory):
    """A random ResNet-20 E2E checkpoint for the digits demo config."""
    cfg = Config.fromfile(DIGITS_E2E)
    cfg.merge_from_dict({'model.backbone.depth': 20})
    torch.manual_seed(0)
    model = init_model(e2e_twin_config(cfg))
    path = tmp_path_factory.mktemp('span') / 'r20.pth'
    torch.save(dict(state_dict=model.state_dict()), path)
    return str(path)


def test_cli_end_to_end(r20_checkpoint, test_root, tmp_path, capsys):
    tool = load_tool('span_diagnostic')
    out = tmp_path / 'out'
    code = tool.main([
        str(DIGITS_E2E), r20_checkpoint, '--num-images', '24', '--batch-size',
        '16', '--flops-saving', '0.1', '--out-dir',
        str(out), '--cfg-options', 'model.backbone.depth=20',
        f'test_dataloader.dataset.data_root={test_root}'
    ])
    assert code == 0
    res = json.loads((out / 'span.json').read_text())
    assert '| chosen (flops_saving=0.1) |' in (out / 'span.md').read_text()
    assert len(res['blocks']) == 9
    fits = {b['index']: b for b in res['blocks'] if 'fit' in b}
    assert sorted(fits) == [2, 3, 5, 6, 8]
    for b in fits.values():
        f = b['fit']
        assert f['num_images'] == 24
        assert 0 <= f['error'] <= 1 and 0 <= f['angle'] <= 90
        # a site saves FLOPs and activation memory
        assert 0 < b['flops_saving'] < 0.2 and 0 < b['memory_saving'] < 0.2
    # block 3 ends stage 1; block 4 down-samples: a one-neighbour span
    assert fits[3]['fit']['span'] == 'prev' and fits[3]['fit']['b'] is None
    assert fits[2]['fit']['shape'] == [16, 32, 32]
    choice = res['choice']
    idx = choice['indices']
    assert all(b - a > 1 for a, b in zip(idx, idx[1:]))
    assert choice['flops_saving'] >= 0.1
    # savings of non-adjacent sites add up: predicted = measured
    assert choice['measured_flops_saving'] == pytest.approx(
        choice['flops_saving'], rel=1e-6)
    assert choice['measured_memory_saving'] == pytest.approx(
        choice['memory_saving'], rel=1e-6)
    # costs of 2 test images scaled to the training batch (64): the same
    # bytes as any 2 images, never the whole test batch they came from
    cfg = Config.fromfile(DIGITS_E2E)
    cfg.merge_from_dict({'model.backbone.depth': 20})
    e2e = backbone_costs(
        init_model(e2e_twin_config(cfg)).backbone, torch.randn(2, 3, 32, 32),
        64)
    assert res['costs']['train_batch'] == 64
    assert res['costs']['e2e_backbone_bytes'] == e2e['bytes']
    assert res['costs']['e2e_backbone_flops'] == e2e['flops']
    plan = res['config_plan']  # R20, k=4: block 4 shifted to 5
    assert plan['indices'] == [5, 8]
    assert plan['measured_flops_saving'] == pytest.approx(
        fits[5]['flops_saving'] + fits[8]['flops_saving'], rel=1e-6)
    assert f'replacement=dict(indices={idx})' in capsys.readouterr().out


def test_cli_unreachable_budget_names_the_option(r20_checkpoint, test_root,
                                                 tmp_path, capsys):
    tool = load_tool('span_diagnostic')
    code = tool.main([
        str(DIGITS_E2E), r20_checkpoint, '--num-images', '4', '--num-sites',
        '4', '--skip-costs', '--out-dir',
        str(tmp_path), '--cfg-options', 'model.backbone.depth=20',
        f'test_dataloader.dataset.data_root={test_root}'
    ])
    assert code == 1
    text = (tmp_path / 'span.log').read_text()
    assert '--num-sites=4 is unreachable' in text and 'at most 3' in text


def test_mismatched_checkpoint_raises(r20_checkpoint):
    cfg = Config.fromfile(DIGITS_E2E)  # ResNet-32: the R20 file is wrong
    with pytest.raises(ValueError, match=r'r20\.pth.*does not fit'):
        init_model(e2e_twin_config(cfg), r20_checkpoint)


@pytest.mark.parametrize('argv, message', [
    (['--flops-saving', '1.5'], '--flops-saving must be a fraction in '
     '(0, 1), got 1.5'),
    (['--memory-saving', '0.2', '--skip-costs'], 'needs the per-block'),
    (['--num-sites', '0'], '--num-sites must be >= 1, got 0'),
    (['--num-sites', '2', '--flops-saving', '0.1'], 'not allowed with'),
])
def test_cli_rejects_bad_arguments(argv, message, r20_checkpoint, capsys):
    tool = load_tool('span_diagnostic')
    with pytest.raises(SystemExit):
        tool.parse_args([str(DIGITS_E2E), r20_checkpoint] + argv)
    assert message in capsys.readouterr().err


# -- the benchmark's repl_idx ----------------------------------------------
def test_benchmark_method_repl_idx():
    case = make_case(
        dict(
            default_scope='mmpretrain',
            model=dict(
                type='ImageClassifier',
                backbone=dict(
                    type='ResNet_CIFAR',
                    depth=20,
                    replacement=dict(interval=4, recompute=False)))))
    assert method_model_cfg(case, 'repl_idx') is None  # no indices
    case.indices = (2, 5)
    rep = method_model_cfg(case, 'repl_idx')['backbone']['replacement']
    assert rep == dict(interval=4, recompute=False, indices=[2, 5])
    cli = load_tool('benchmark')
    args = cli.parse_args([
        '--suite', 'cifar-r32', '--indices', '2', '5', '--methods', 'e2e',
        'repl'
    ])
    assert args.methods == ['e2e', 'repl', 'repl_idx']
    assert args.indices == [2, 5]


def test_benchmark_repl_idx_needs_indices(capsys):
    with pytest.raises(SystemExit):
        load_tool('benchmark').parse_args(
            ['--suite', '--methods', 'e2e', 'repl_idx'])
    assert '--methods repl_idx needs --indices' in capsys.readouterr().err


def _tiny_convnext_classifier(**replacement):
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    from ..test_models.test_backbones.cases import TINY_CONVNEXT
    backbone = dict(
        TINY_CONVNEXT,
        type='RepLConvNeXt',
        out_indices=(3, ),
        gap_before_final_norm=True,
        replacement=replacement)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(
            dict(
                type='ImageClassifier',
                data_preprocessor=dict(
                    type='ClsDataPreprocessor', mean=[0] * 3, std=[1] * 3),
                backbone=backbone,
                head=dict(type='LinearClsHead', num_classes=3,
                          in_channels=32)))


def _convnext_batches():
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(0)
    return [
        dict(
            inputs=[
                torch.randint(0, 255, (3, 32, 32), generator=g).to(torch.uint8)
                for _ in range(4)
            ],
            data_samples=[DataSample().set_gt_label(i % 3) for i in range(4)])
    ]


def test_convnext_span_uses_the_neighbours_of_its_shape():
    """ConvNeXt stages meet at down-sampling layers: a block's neighbour
    there has another width and is left out of its span (a stage's first
    block: 'next'; its last: 'prev'); both inside a stage."""
    model = _tiny_convnext_classifier(mode='none')
    stats, blocks = collect_span_stats(model, _convnext_batches(), 4)
    spans = {i: s['span'] for i, s in stats.items()}
    # depths 2, 2, 6, 2: blocks 1-2, 3-4, 5-10, 11-12
    assert spans == {
        2: 'prev',
        3: 'next',
        4: 'prev',
        5: 'next',
        **{
            i: 'prev+next'
            for i in range(6, 10)
        }, 10: 'prev',
        11: 'next'
    }
    assert stats[3]['a'] is None and stats[3]['b'] is not None
    assert all(0 <= s['error'] <= 1 for s in stats.values())
    assert all(s['num_images'] == 4 for s in stats.values())


def test_convnext_bias_diagnostic_runs():
    from repl_mm.analysis.bias import measure_bias
    model = _tiny_convnext_classifier(zero_init=False).train()
    batches = [model.data_preprocessor(b, True) for b in _convnext_batches()]
    result = measure_bias(model, batches)
    assert result['sites'] == [4, 8]
    rows = result['rows']
    assert [r['enabled_sites'] for r in rows] == [[], [4], [4, 8]]
    assert rows[0]['d_fwd'] == 0 and rows[2]['d_fwd'] > 0
