"""Static models for deployment (paper A.5.3): the folding
math, static twins equal to trained RepL models (backbones of every kind,
RetinaNet, DeepLabV3), the checkpoint + config tool and an upstream
inferencer on its output, and the errors of mismatched modes."""
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmdet.models.backbones.swin import SwinBlock as DetSwinBlock
from mmengine.config import Config
from mmpretrain.models.backbones import swin_transformer, vision_transformer
from mmpretrain.models.backbones.resnet import BasicBlock, Bottleneck
from torch import nn

from repl_mm.apis import init_model
from repl_mm.converters.to_static import (check_equal, convert_checkpoint,
                                          max_output_error, static_config,
                                          static_replacement, to_static)
from repl_mm.core import (ConvSite, ReplacementConfig, StaticConvSite,
                          StaticTransformerSite)
from repl_mm.core.static import should_fold_static
from repl_mm.core.synthesis import batch_norm_affine, fold_affine
from repl_mm.models.cls_resnet import RepLResNet, RepLResNet_CIFAR
from repl_mm.models.cls_swin import RepLSwinTransformer as RepLClsSwin
from repl_mm.models.cls_vit import RepLVisionTransformer
from repl_mm.models.det_swin import RepLSwinTransformer as RepLDetSwin

ROOT = Path(__file__).resolve().parents[2]
PLAIN_BLOCKS = (BasicBlock, Bottleneck,
                vision_transformer.TransformerEncoderLayer, DetSwinBlock,
                swin_transformer.SwinBlock)
TOL = 1e-5
TINY_SWIN = dict(
    embed_dims=16,
    depths=(2, 6, 1),
    num_heads=(1, 2, 4),
    strides=(4, 2, 2),
    window_size=2,
    out_indices=(0, 1, 2),
    drop_path_rate=0.0)
TINY_CLS_SWIN = dict(
    arch=dict(embed_dims=16, depths=[2, 6, 1], num_heads=[1, 2, 4]),
    img_size=32,
    window_size=2,
    out_indices=(0, 1, 2),
    drop_path_rate=0.0)
TINY_VIT = dict(
    arch=dict(
        embed_dims=32, num_layers=6, num_heads=2, feedforward_channels=128),
    img_size=32,
    patch_size=8)


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.7):
    """Make a freshly built model look trained, so equality can fail:
    random mixing weights, site norms, BN statistics everywhere, and a
    site scale that is not 1."""
    g = torch.Generator().manual_seed(seed)

    def rand_(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.split('.')[-1]
            if last.startswith(('phi', 'alpha', 'beta')):
                rand_(p, -0.2, 1.0)
            elif '.site_norm.' in name or 'bn' in name or 'norm' in name:
                rand_(p, 0.5, 1.5) if last == 'weight' else rand_(p, -.5, .5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                rand_(m.running_mean, -0.3, 0.3)
                rand_(m.running_var, 0.5, 2.0)
            if isinstance(getattr(m, 'scale', None), torch.Tensor):
                m.scale.fill_(scale)
    return model.eval()


def zero_sites(static_model: nn.Module):
    """Zero every weight of the static sites (in place)."""
    with torch.no_grad():
        for m in static_model.modules():
            if hasattr(m, 'site_modules'):
                for site in m.site_modules().values():
                    for p in site.parameters():
                        p.zero_()


def check_twin(repl, static, x):
    """Static twin equal to the RepL model; and the sites matter: the
    same check fails once the static sites are zeroed."""
    to_static(repl, static)
    err = check_equal(repl, static, x, tol=TOL)
    zero_sites(static)
    assert max_output_error(repl, static, x) > 1e-3
    return err


# -- folding math, known answers -------------------------------------------
def test_batch_norm_affine_matches_eval_bn():
    bn = nn.BatchNorm2d(3, eps=1e-3)
    randomize(bn)
    x = torch.randn(2, 3, 8, 8)
    a, b = batch_norm_affine(bn.running_mean, bn.running_var, bn.weight,
                             bn.bias, bn.eps)
    expect = bn(x)
    assert torch.allclose(
        a[:, None, None] * x + b[:, None, None], expect, atol=1e-6)
    # by hand: gamma 2, var 3, eps 1 -> a = 1; mean 4, beta 5 -> b = 1
    a, b = batch_norm_affine(
        torch.tensor([4.]),
        torch.tensor([3.]),
        torch.tensor([2.]),
        torch.tensor([5.]),
        eps=1.)
    assert a.item() == 1. and b.item() == 1.


def test_fold_affine_by_hand():
    w = torch.tensor([[1., 2.], [3., 4.]])
    fw, fb = fold_affine(w, torch.tensor([2., -1.]), torch.tensor([.5, 1.]))
    assert fw.tolist() == [[2., 4.], [-3., -4.]] and fb.tolist() == [.5, 1.]


def test_fold_choice():
    # BasicBlock C->C->C: folded C^2 <= 2 C^2; Bottleneck 4m->m->m->4m:
    # 16 m^2 > 9 m^2 (chain kept); one position: nothing to fold.
    assert should_fold_static([(16, 16), (16, 16)])
    assert not should_fold_static([(4, 16), (4, 4), (16, 4)])
    assert not should_fold_static([(16, 16)])


# -- static twins of backbones ---------------------------------------------
BACKBONES = {
    'cls-r50': (RepLResNet, dict(depth=50, stem_channels=8,
                                 base_channels=8), (2, 3, 32, 32)),
    'cls-r18-own':
    (RepLResNet, dict(depth=18, stem_channels=8,
                      base_channels=8), (2, 3, 32, 32)),
    'cifar-r20': (RepLResNet_CIFAR, dict(depth=20), (2, 3, 16, 16)),
    'cifar-r20-cp': (RepLResNet_CIFAR, dict(depth=20,
                                            with_cp=True), (2, 3, 16, 16)),
    'cifar-r20-gn':
    (RepLResNet_CIFAR, dict(depth=20,
                            norm_cfg=dict(type='GN',
                                          num_groups=4)), (2, 3, 16, 16)),
    'vit': (RepLVisionTransformer, TINY_VIT, (2, 3, 32, 32)),
    # widths 16, 32, 64: site 4 from both neighbours, site 8 from one
    'det-swin': (RepLDetSwin, TINY_SWIN, (2, 3, 32, 32)),
    'cls-swin': (RepLClsSwin, TINY_CLS_SWIN, (2, 3, 32, 32)),
}


@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
@pytest.mark.parametrize('name', list(BACKBONES))
def test_static_backbone_equals_repl(name, mode):
    cls, kwargs, shape = BACKBONES[name]
    opts = dict(mode=mode)
    repl = randomize(cls(**kwargs, replacement=opts))
    static = cls(**kwargs, replacement=static_replacement(opts))
    assert static.replacement_plan.indices == repl.replacement_plan.indices
    assert static.replacement_plan.mode == 'static'
    assert [s.sources for s in static.replacement_plan.sites] == \
        [s.sources for s in repl.replacement_plan.sites]
    check_twin(repl, static, torch.randn(shape))
    sites = static.site_modules().values()
    if mode == 'interpolate':  # the original block type, a plain block
        assert all(isinstance(s, PLAIN_BLOCKS) for s in sites)
    else:
        assert all(
            isinstance(s, (StaticConvSite, StaticTransformerSite))
            for s in sites)
    keys = static.state_dict().keys()
    assert not any(
        k.split('.')[-1].startswith(('phi', 'alpha', 'beta')) for k in keys)


@pytest.mark.parametrize(
    'opts', [
        dict(residual=False, neighbors='prev'),
        dict(scale=0.0),
    ],
    ids=['no-residual', 'scale0'])
def test_static_conv_options(opts):
    repl = randomize(RepLResNet_CIFAR(depth=20, replacement=opts), scale=0.3)
    static = RepLResNet_CIFAR(depth=20, replacement=static_replacement(opts))
    to_static(repl, static)
    check_equal(repl, static, torch.randn(2, 3, 16, 16), tol=TOL)
    site = static.site_modules()[5]
    assert site.folded and site.norm_folded
    assert list(
        site.state_dict()) == ['pointwise.0.weight', 'pointwise.0.bias']


@pytest.mark.parametrize(
    'opts', [
        dict(vit_weights='attn', num_scalars=1),
        dict(indices=[1, 3], neighbors='next'),
    ],
    ids=['own-mlp-tied', 'first-site'])
def test_static_vit_options(opts):
    repl = randomize(RepLVisionTransformer(**TINY_VIT, replacement=opts))
    static = RepLVisionTransformer(
        **TINY_VIT, replacement=static_replacement(opts))
    check_twin(repl, static, torch.randn(2, 3, 32, 32))
    site = next(iter(static.site_modules().values()))
    assert sorted(site.state_dict()) == [
        'attn.weight', 'mlp.weight', 'site_norm.bias', 'site_norm.weight'
    ]


# -- inside RetinaNet and DeepLabV3 ----------------------------------------
DET_SEG = {
    'retinanet': ('configs/retinanet/retinanet_repl-r50_fpn_1x_coco.py', {
        'model.backbone.depth': 18,
        'model.backbone.base_channels': 8,
        'model.neck.in_channels': [8, 16, 32, 64],
        'model.neck.out_channels': 16,
        'model.bbox_head.in_channels': 16,
        'model.bbox_head.feat_channels': 16,
        'model.bbox_head.stacked_convs': 1,
    }),
    'deeplabv3': ('configs/deeplabv3/deeplabv3_repl-r50-d8_4xb2-80k_'
                  'cityscapes-512x1024.py', {
                      'model.backbone.depth': 18,
                      'model.backbone.stem_channels': 8,
                      'model.backbone.base_channels': 8,
                      'model.decode_head.in_channels': 64,
                      'model.decode_head.channels': 16,
                      'model.auxiliary_head.in_channels': 32,
                      'model.auxiliary_head.channels': 16,
                  }),
}


@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
@pytest.mark.parametrize('name', list(DET_SEG))
def test_static_inside_det_seg_models(name, mode):
    path, delta = DET_SEG[name]
    cfg = Config.fromfile(str(ROOT / path))
    cfg.merge_from_dict({**delta, 'model.backbone.replacement.mode': mode})
    scfg = static_config(cfg)
    backbone = scfg.model.backbone
    assert backbone.replacement.mode == 'static'
    assert backbone.replacement.static_from == mode
    assert backbone.get('init_cfg') is None  # no E2E weights into static
    assert scfg.model.get('pretrained') is None
    repl = randomize(init_model(cfg))
    static = init_model(scfg)
    assert static.backbone.replacement_plan.indices == (4, )
    check_twin(repl, static, torch.randn(1, 3, 64, 64))


# -- the tool and an upstream inferencer -----------------------------------
@pytest.fixture(scope='module')
def tiny_repl(tmp_path_factory):
    """A tiny demo config (CIFAR ResNet-20) and a trained-looking RepL
    checkpoint of it, as training writes them."""
    folder = tmp_path_factory.mktemp('repl')
    cfg_path = folder / 'r20-repl_tiny.py'
    cfg_path.write_text(
        f"_base_ = '{ROOT}/configs/demo/resnet32-repl_1xb64_15e_digits.py'\n"
        'model = dict(backbone=dict(depth=20))\n')
    model = randomize(init_model(str(cfg_path)))
    ckpt = folder / 'epoch_1.pth'
    classes = [f'class_{i}' for i in range(10)]
    torch.save(
        dict(
            state_dict=model.state_dict(),
            meta=dict(epoch=1, dataset_meta=dict(classes=classes))), ckpt)
    return cfg_path, ckpt


def test_tool_writes_loadable_checkpoint_and_config(tiny_repl, tmp_path,
                                                    monkeypatch, capsys):
    cfg_path, ckpt = tiny_repl
    monkeypatch.setattr(sys, 'argv', [
        'repl_to_static.py',
        str(cfg_path),
        str(ckpt),
        str(tmp_path), '--batch-size', '2', '--input-size', '16', '--repeats',
        '2'
    ])
    runpy.run_path(
        str(ROOT / 'tools/model_converters/repl_to_static.py'),
        run_name='__main__')
    out = capsys.readouterr().out
    assert 'outputs equal up to' in out
    for what in ('time', 'peak', 'params'):
        line = next(x for x in out.splitlines() if x.strip().startswith(what))
        assert 'static/repl' in line
    saved = torch.load(tmp_path / 'r20-static_tiny.pth', weights_only=True)
    assert set(saved) == {'state_dict', 'meta'}
    plan = saved['meta']['replacement_plans']['backbone']
    assert plan['config']['mode'] == 'static' and plan['indices'] == [5, 8]
    assert saved['meta']['static']['relative_error'] <= 1e-4
    sd = saved['state_dict']
    assert 'backbone.layer2.1.pointwise.0.weight' in sd
    assert not any('phi' in k or 'site_norm' in k for k in sd)
    scfg = Config.fromfile(str(tmp_path / 'r20-static_tiny.py'))
    assert scfg.model.backbone.replacement.to_dict() == dict(
        interval=4, mode='static', static_from='synthesize')
    assert 'repl_mm' in scfg.custom_imports['imports']


def test_static_checkpoint_in_upstream_inferencer(tiny_repl, tmp_path):
    from mmpretrain import ImageClassificationInferencer
    cfg_path, ckpt = tiny_repl
    out = convert_checkpoint(str(cfg_path), str(ckpt), str(tmp_path))
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    results = {}
    for name, (c, w) in dict(
            repl=(cfg_path, ckpt),
            static=(out['config'], out['checkpoint'])).items():
        inferencer = ImageClassificationInferencer(
            model=str(c), pretrained=str(w), device='cpu')
        results[name] = inferencer(img)[0]
        if name == 'static':
            site = inferencer.model.backbone.site_modules()[5]
            assert isinstance(site, StaticConvSite)
    assert results['static']['pred_label'] == results['repl']['pred_label']
    assert results['static']['pred_class'] == \
        f"class_{results['static']['pred_label']}"
    np.testing.assert_allclose(
        results['static']['pred_scores'],
        results['repl']['pred_scores'],
        atol=1e-5)


def _copy(tiny_repl, folder):
    """The tiny config and checkpoint, copied into ``folder`` (so a test
    that would overwrite them cannot spoil the module fixture)."""
    return tuple(Path(shutil.copy(p, folder)) for p in tiny_repl)


def _no_work(monkeypatch):
    """Make any model build fail: the checks must come before it."""
    import repl_mm.converters.to_static as to_static

    def init_model(*args, **kwargs):
        raise AssertionError('work started before the output check')

    monkeypatch.setattr(to_static, 'init_model', init_model)


def test_outputs_never_overwrite_the_sources(tiny_repl, tmp_path, monkeypatch):
    cfg_path, ckpt = _copy(tiny_repl, tmp_path)
    data = ckpt.read_bytes(), cfg_path.read_bytes()
    _no_work(monkeypatch)
    for force in (False, True):
        with pytest.raises(
                ValueError,
                match=r"output checkpoint .*"
                r"'.*epoch_1\.pth' is the input checkpoint"):
            convert_checkpoint(
                str(cfg_path),
                str(ckpt),
                str(tmp_path),
                name='epoch_1',
                force=force)
        with pytest.raises(
                ValueError,
                match=r"output config .*"
                r"'.*r20-repl_tiny\.py' is the input config"):
            convert_checkpoint(
                str(cfg_path),
                str(ckpt),
                str(tmp_path),
                name='r20-repl_tiny',
                force=force)
    assert (ckpt.read_bytes(), cfg_path.read_bytes()) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'epoch_1.pth', 'r20-repl_tiny.py'
    ]


def test_existing_outputs_need_force(tiny_repl, tmp_path, monkeypatch):
    cfg_path, ckpt = tiny_repl
    for suffix in ('.pth', '.py'):
        out = tmp_path / f'r20-static_tiny{suffix}'
        out.write_text('keep me')
        with monkeypatch.context() as m:
            _no_work(m)
            with pytest.raises(
                    FileExistsError,
                    match=r'r20-static_tiny'
                    rf'\{suffix}\' already exists.*--force'):
                convert_checkpoint(str(cfg_path), str(ckpt), str(tmp_path))
        assert out.read_text() == 'keep me'
        out.unlink()
    out = convert_checkpoint(str(cfg_path), str(ckpt), str(tmp_path))
    again = convert_checkpoint(
        str(cfg_path), str(ckpt), str(tmp_path), force=True)
    assert again['checkpoint'] == out['checkpoint']
    assert torch.load(out['checkpoint'], weights_only=True)['meta']['static']


def test_tool_refuses_existing_outputs_without_force(tiny_repl, tmp_path,
                                                     monkeypatch, capsys):
    cfg_path, ckpt = tiny_repl
    out = tmp_path / 'r20-static_tiny.pth'
    out.write_text('keep me')
    argv = [
        'repl_to_static.py',
        str(cfg_path),
        str(ckpt),
        str(tmp_path), '--no-benchmark'
    ]
    tool = str(ROOT / 'tools/model_converters/repl_to_static.py')
    monkeypatch.setattr(sys, 'argv', argv)
    with pytest.raises(FileExistsError, match='--force'):
        runpy.run_path(tool, run_name='__main__')
    assert out.read_text() == 'keep me'
    monkeypatch.setattr(sys, 'argv', argv + ['--force'])
    runpy.run_path(tool, run_name='__main__')
    assert 'outputs equal up to' in capsys.readouterr().out
    assert torch.load(out, weights_only=True)['meta']['static']


# -- errors ----------------------------------------------------------------
def twins(mode='synthesize'):
    opts = dict(mode=mode)
    return (randomize(RepLResNet_CIFAR(depth=20, replacement=opts)),
            RepLResNet_CIFAR(depth=20, replacement=static_replacement(opts)))


def test_mode_mismatch_errors_name_the_mode():
    repl, static = twins()
    to_static(repl, static)
    with pytest.raises(
            ValueError,
            match="mode 'static'.*mode 'synthesize'"
            "(.|\\n)*repl_to_static"):
        RepLResNet_CIFAR(depth=20).load_state_dict(static.state_dict())
    with pytest.raises(ValueError, match="mode 'synthesize'.*mode 'static'"):
        static.load_state_dict(repl.state_dict())
    e2e = RepLResNet_CIFAR(depth=20, replacement=dict(mode='none'))
    with pytest.raises(ValueError, match="mode='static' model loads only"):
        static.load_state_dict(e2e.state_dict(), strict=False)
    _, from_interp = twins('interpolate')
    with pytest.raises(
            ValueError,
            match="static_from: checkpoint "
            "'synthesize', model 'interpolate'"):
        from_interp.load_state_dict(static.state_dict())
    with pytest.raises(
            ValueError, match="mode='synthesize'.*static_from="
            "'interpolate'"):
        to_static(repl, from_interp)
    with pytest.raises(
            ValueError, match="has mode='synthesize', expected "
            "'static'"):
        to_static(repl, RepLResNet_CIFAR(depth=20))


def test_option_errors():
    with pytest.raises(ValueError, match="mode 'drop' cannot be made"):
        static_replacement(dict(mode='drop'))
    with pytest.raises(
            ValueError,
            match="static_from='interpolate' with "
            "mode='synthesize'"):
        ReplacementConfig(static_from='interpolate')
    with pytest.raises(ValueError, match="static_from must be one of.*'x'"):
        ReplacementConfig(mode='static', static_from='x')
    cfg = Config(
        dict(
            model=dict(
                type='ImageClassifier', backbone=dict(type='ResNet',
                                                      depth=18))))
    with pytest.raises(ValueError, match='names no RepL backbone'):
        static_config(cfg)


def test_static_site_is_inference_only():
    _, static = twins()
    static.train()
    with pytest.raises(RuntimeError, match='inference only.*model.eval'):
        static(torch.randn(1, 3, 16, 16))
    conv = static.site_modules()[5]
    with pytest.raises(TypeError, match='expected a ConvSite'):
        conv.load_site(nn.Identity())
    other = ConvSite([(8, 8)], [[]], nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ValueError, match='does not match this static site'):
        conv.load_site(other)


def test_static_config_drops_pretrained_init_cfg():
    pretrained = dict(type='Pretrained', checkpoint='e2e.pth')
    const = dict(type='Constant', layer='Conv2d', val=1)

    def backbone_init(init_cfg):
        cfg = Config(
            dict(
                model=dict(
                    type='ImageClassifier',
                    backbone=dict(
                        type='RepLResNet_CIFAR', depth=20,
                        init_cfg=init_cfg))))
        return static_config(cfg).model.backbone.init_cfg

    assert backbone_init(pretrained) is None
    assert backbone_init([pretrained]) is None
    assert backbone_init([const, pretrained]) == [const]
    assert backbone_init([const]) == [const]
    assert backbone_init(const) == const
