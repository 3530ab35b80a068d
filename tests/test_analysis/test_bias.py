"""The bias diagnostic of paper A.12: known answers on tiny
classifiers (a CIFAR ResNet and a ViT with RepL sites), the scales left as
they were, clear errors, and the CLI end to end on a synthetic set."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.registry import MODELS, init_default_scope

from repl_mm.analysis.bias import (find_sites, flatten_outputs,
                                   gradient_deviation, measure_bias,
                                   sample_deviations, shared_parameters)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / 'configs/demo/resnet32-repl_1xb64_15e_mnist5k.py'

# CIFAR ResNet-20 at width 8 (8/16/32 channels): k = 4 -> sites 5, 8
# (block 4 down-samples: the plan shifts it to 5)
TINY_R20 = dict(
    type='RepLResNet_CIFAR', depth=20, stem_channels=8, base_channels=8)
# 5-layer ViT, d = 16, on 8x8 images: k = 2 -> sites 2, 4
TINY_VIT = dict(
    type='RepLVisionTransformer',
    arch=dict(
        embed_dims=16, num_layers=5, num_heads=2, feedforward_channels=32),
    img_size=8,
    patch_size=4)
# 5-block Swin, widths 16 and 32, on 8x8 images (2x2, then 1x1 tokens):
# k = 2 -> sites 2 (drawn from block 1 only: block 3 is twice as wide), 4
TINY_SWIN = dict(
    type='RepLSwinTransformer',
    arch=dict(embed_dims=16, depths=[2, 3], num_heads=[1, 2]),
    img_size=8,
    window_size=2,
    pad_small_map=True,
    out_indices=(1, ))


def classifier(kind='cnn', **replacement):
    init_default_scope('mmpretrain')
    if kind == 'cnn':
        backbone = dict(TINY_R20, replacement=dict(interval=4, **replacement))
        neck, head = dict(type='GlobalAveragePooling'), dict(
            type='LinearClsHead', num_classes=3, in_channels=32)
    elif kind == 'swin':
        backbone = dict(TINY_SWIN, replacement=dict(interval=2, **replacement))
        neck, head = dict(type='GlobalAveragePooling'), dict(
            type='LinearClsHead', num_classes=3, in_channels=32)
    else:
        backbone = dict(TINY_VIT, replacement=dict(interval=2, **replacement))
        neck, head = None, dict(
            type='VisionTransformerClsHead', num_classes=3, in_channels=16)
    model = MODELS.build(
        dict(type='ImageClassifier', backbone=backbone, neck=neck, head=head))
    model.init_weights()
    with torch.no_grad():  # upstream heads start at ~0 (ViT's at exactly 0)
        for m in model.head.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.5)
    return model


def batch(n=4, seed=0, channels=3):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(seed)
    return dict(
        inputs=torch.randn(n, channels, 8, 8, generator=g),
        data_samples=[DataSample().set_gt_label(i % 3) for i in range(n)])


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    # tiny convs: threads only contend on a shared machine (20x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sites_of(model):
    return sorted(model.backbone.site_modules().items())


# -- the math -----------------------------------------------------------------


def test_flatten_outputs_nested_per_sample():
    out = flatten_outputs((torch.ones(2, 3), [torch.full((2, 1, 2, 2), 2.)], {
        'a': torch.zeros(2, 1)
    }))
    assert out.shape == (2, 8)
    assert out[0].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
    with pytest.raises(ValueError, match='batch as its first dim'):
        flatten_outputs((torch.ones(2, 3), torch.ones(3, 3)))


def test_sample_and_gradient_deviation_by_hand():
    d = sample_deviations(
        torch.tensor([[3., 4.], [1., 1.]]), torch.tensor([[0., 0.], [1., 1.]]))
    assert d.tolist() == [5.0, 0.0]
    # |(1,2,2) - (1,0,0)| = sqrt(8); |(1,0,0)| = 1
    d_grad, rho = gradient_deviation(
        torch.tensor([1., 2., 2.]), torch.tensor([1., 0., 0.]))
    assert d_grad == pytest.approx(math.sqrt(8))
    assert rho == pytest.approx(math.sqrt(8))
    assert math.isnan(gradient_deviation(torch.ones(2), torch.zeros(2))[1])


# -- known answers on models --------------------------------------------------


@pytest.mark.parametrize('kind', ['cnn', 'vit', 'swin'])
def test_zero_update_sites_give_zero_deviation_for_every_r(kind):
    # zero_init: each site's fresh norm has gamma = beta = 0, so its update
    # is exactly 0 whatever its scale: F_b^(r) = F bit for bit
    model = classifier(kind, zero_init=True)
    res = measure_bias(model, [batch()])
    assert res['sites'] == ([5, 8] if kind == 'cnn' else [2, 4])
    assert [r['r'] for r in res['rows']] == [0, 1, 2]
    for row in res['rows']:
        assert (row['d_fwd'], row['d_grad'], row['rho']) == (0.0, 0.0, 0.0)
    assert res['grad_norm'] > 0


@pytest.mark.parametrize('kind', ['cnn', 'vit', 'swin'])
def test_deviation_grows_when_a_site_with_an_update_is_enabled(kind):
    model = classifier(kind, zero_init=False)
    rows = measure_bias(model, [batch()])['rows']
    # r = 0 is F itself, measured: exactly zero
    assert (rows[0]['d_fwd'], rows[0]['d_grad']) == (0.0, 0.0)
    assert rows[1]['d_fwd'] > 1e-4 and rows[1]['d_grad'] > 1e-4
    assert rows[2]['d_fwd'] > 1e-4 and rows[2]['rho'] > 1e-4
    assert [r['enabled_sites'] for r in rows
            ] == ([[], [5], [5, 8]] if kind == 'cnn' else [[], [2], [2, 4]])


def test_a_zero_update_site_adds_nothing():
    # site 5 updates, site 8 (gamma 0) does not: enabling it changes nothing
    model = classifier(zero_init=False)
    with torch.no_grad():
        sites_of(model)[1][1].site_norm.weight.zero_()
    rows = measure_bias(model, [batch()])['rows']
    assert rows[1]['d_fwd'] > 0
    assert rows[2]['d_fwd'] == rows[1]['d_fwd']
    assert rows[2]['d_grad'] == rows[1]['d_grad']


def test_values_match_a_direct_computation():
    """d_fwd(1), d_grad(1), rho(1) as paper A.12 writes them, computed here
    by setting the first site's scale by hand."""
    model = classifier(zero_init=False).eval()
    data = batch(n=6)
    sites = sites_of(model)
    params = [p for _, p in shared_parameters(model, sites)]

    def run(first_scale):
        sites[0][1].scale.fill_(first_scale)
        sites[1][1].scale.fill_(0.)
        with torch.no_grad():
            logits = model(**data, mode='tensor')
        loss = model.parse_losses(model(**data, mode='loss'))[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params)
        ])
        return logits, flat, loss.item()

    logits_f, grad_f, _ = run(0.)
    logits_b, grad_b, loss_b = run(1.)
    for _, s in sites:
        s.scale.fill_(1.)
    row = measure_bias(model, [data])['rows'][1]
    assert row['d_fwd'] == pytest.approx(
        (logits_b - logits_f).norm(dim=1).mean().item(), rel=1e-5)
    d = (grad_b - grad_f).norm().item()
    assert row['d_grad'] == pytest.approx(d, rel=1e-4)
    assert row['rho'] == pytest.approx(d / grad_f.norm().item(), rel=1e-4)
    assert row['loss'] == pytest.approx(loss_b, rel=1e-5)
    # theta: every trainable parameter but the sites' (phi, site norms)
    own = {id(p) for _, s in sites for p in s.parameters()}
    assert len(params) == sum(1 for p in model.parameters()
                              if id(p) not in own)


def test_batches_weighted_by_images():
    # two batches of 4 and 2 images give the gradient of the mean loss
    # over the 6 images (one batch of 6)
    model = classifier(zero_init=False)
    whole = batch(n=6, seed=1)
    parts = [{
        k: v[:4]
        for k, v in whole.items()
    }, {
        k: v[4:]
        for k, v in whole.items()
    }]
    a = measure_bias(model, [whole])
    b = measure_bias(model, parts)
    assert b['num_images'] == 6 and b['num_grad_images'] == 6
    for ra, rb in zip(a['rows'], b['rows']):
        for key in ('d_fwd', 'd_grad', 'rho', 'loss'):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-7)


def test_scales_mode_and_grads_restored_even_on_error():
    model = classifier(zero_init=False).train()
    sites = sites_of(model)
    sites[0][1].scale.fill_(0.25)
    sites[1][1].scale.fill_(0.75)
    measure_bias(model, [batch()])
    assert [s.scale.item() for _, s in sites] == [0.25, 0.75]
    assert model.training and model.backbone.training
    assert all(p.grad is None for p in model.parameters())
    # a batch the model cannot run: still restored
    with pytest.raises(RuntimeError):
        measure_bias(model, [batch(), batch(channels=5)])
    assert [s.scale.item() for _, s in sites] == [0.25, 0.75]
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_existing_gradients_left_as_they_were():
    # a caller's accumulated gradients, on shared and site parameters alike
    model = classifier(zero_init=False)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i))
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    measure_bias(model, [batch()])
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n


@pytest.mark.parametrize('mode,match', [
    ('interpolate', "mode='interpolate'.*no scale buffer"),
    ('drop', "mode='drop'.*no computing layer"),
    ('none', "mode='none'.*no computing layer"),
])
def test_modes_without_scaled_sites_are_refused(mode, match):
    with pytest.raises(ValueError, match=match):
        find_sites(classifier(mode=mode))


def test_model_without_repl_backbone_is_refused():
    with pytest.raises(ValueError, match='no RepL backbone'):
        find_sites(torch.nn.Linear(2, 2))


# -- the CLI ------------------------------------------------------------------


def load_tool():
    path = ROOT / 'tools/analysis/bias_diagnostic.py'
    spec = importlib.util.spec_from_file_location('bias_diagnostic', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A tiny config on a synthetic 8x8 CIFAR-format set and checkpoints of
    its model (sites updating) and of a model with another plan."""
    from mmengine.config import Config

    from repl_mm.datasets.writers import synthetic_images, write_cifar
    root = tmp_path_factory.mktemp('bias')
    imgs, labels, classes = synthetic_images(
        num_per_class=2, num_classes=10, img_size=8)
    write_cifar(str(root / 'data'), (imgs, labels), (imgs, labels), classes)
    cfg_path = root / 'tiny.py'
    cfg_path.write_text(
        f"_base_ = '{DEMO}'\n"
        'model = dict(backbone=dict(depth=20, stem_channels=8, '
        'base_channels=8, replacement=dict(zero_init=False)),\n'
        '             head=dict(in_channels=32))\n'
        f"test_dataloader = dict(dataset=dict(data_root='{root / 'data'}'))"
        '\n')
    cfg = Config.fromfile(str(cfg_path))
    init_default_scope('mmpretrain')

    def save(name, **replacement):
        model_cfg = cfg.model.copy()
        model_cfg['data_preprocessor'] = cfg.data_preprocessor
        model_cfg['backbone'] = dict(
            model_cfg['backbone'],
            replacement=dict(model_cfg['backbone']['replacement'],
                             **replacement))
        model = MODELS.build(model_cfg)
        model.init_weights()
        path = root / name
        torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
        return str(path)

    return dict(
        cfg=str(cfg_path),
        ckpt=save('repl.pth'),
        k2=save('k2.pth', interval=2),
        e2e=save('e2e.pth', mode='none'))


def test_cli_writes_table_json_and_plot(tiny_run, tmp_path):
    out = tmp_path / 'out'
    result = load_tool().main([
        tiny_run['cfg'], tiny_run['ckpt'], '--num-images', '13',
        '--grad-images', '6', '--batch-size', '4', '--out-dir',
        str(out)
    ])
    data = json.loads((out / 'bias.json').read_text())
    assert data['sites'] == [5, 8] and data['output'] == 'class logits'
    assert data['num_images'] == 13 and data['num_grad_images'] == 6
    assert [r['r'] for r in data['rows']] == [0, 1, 2]
    assert data['rows'][0]['d_fwd'] == 0.0 == data['rows'][0]['d_grad']
    assert data['rows'][1]['d_fwd'] > 0 and data['rows'][2]['rho'] > 0
    table = (out / 'bias.md').read_text()
    assert '| 2 | 5, 8 |' in table
    assert (out / 'bias.png').read_bytes()[:4] == b'\x89PNG'
    assert np.isclose(result['rows'][2]['d_grad'], data['rows'][2]['d_grad'])


def test_cli_refuses_mismatched_checkpoint_and_e2e_config(tiny_run, tmp_path):
    tool = load_tool()
    with pytest.raises(ValueError, match='does not match.*another RepL plan'):
        tool.main([
            tiny_run['cfg'], tiny_run['k2'], '--num-images', '2', '--out-dir',
            str(tmp_path)
        ])
    # the E2E twin of the config (same plan, blocks kept): nothing to enable
    with pytest.raises(ValueError, match="mode='none'.*no computing layer"):
        tool.main([
            tiny_run['cfg'], tiny_run['e2e'], '--num-images', '2', '--out-dir',
            str(tmp_path), '--cfg-options',
            'model.backbone.replacement.mode=none'
        ])
    with pytest.raises(SystemExit):
        tool.main([tiny_run['cfg'], tiny_run['ckpt'], '--num-images', '0'])


# -- detection and segmentation: the task loss, raw head outputs ------------
SHAPES = {
    'mmdet': ('configs/shapes/retinanet_repl-r18_fpn_1xb8-scratch-adam-4e_'
              'coco-shapes.py', 'make_coco_shapes'),
    'mmseg': ('configs/shapes/deeplabv3_repl-r18-d8_1xb8-scratch-adam-200it_'
              'cityscapes-shapes.py', 'make_cityscapes_shapes'),
}


@pytest.mark.parametrize('scope', list(SHAPES))
def test_cli_on_detector_and_segmentor(scope, tmp_path):
    """RetinaNet and DeepLabV3 on their synthetic shapes sets: the tool
    reads the config's test set, compares raw head outputs and the task
    loss's gradient; a site with an update moves both, r = 0 moves
    nothing."""
    from mmengine.config import Config

    from repl_mm.apis import init_model
    from repl_mm.datasets import det_seg_writers
    config, writer = SHAPES[scope]
    data_root = tmp_path / 'data'
    getattr(det_seg_writers, writer)(str(data_root), num_train=1, num_val=3)
    opts = {
        'test_dataloader.dataset.data_root': f'{data_root}/',
        # a trained site: its norm's gamma is not zero
        'model.backbone.replacement.zero_init': False
    }
    cfg = Config.fromfile(str(ROOT / config))
    cfg.merge_from_dict(opts)
    model = init_model(cfg)
    model.init_weights()
    ckpt = tmp_path / 'repl.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    result = load_tool().main([
        str(ROOT / config),
        str(ckpt), '--num-images', '3', '--batch-size', '2', '--out-dir',
        str(tmp_path / 'out'), '--cfg-options',
        *[f'{k}={v}' for k, v in opts.items()]
    ])
    assert result['output'] == "raw head outputs (mode='tensor')"
    assert result['sites'] == [4] and result['num_images'] == 3
    r0, r1 = result['rows']
    assert r0['d_fwd'] == 0.0 == r0['d_grad'] and r0['loss'] == result['loss']
    assert r1['d_fwd'] > 0 and r1['d_grad'] > 0 and 0 < r1['rho']
    assert math.isfinite(r1['loss']) and r1['loss'] != r0['loss']
