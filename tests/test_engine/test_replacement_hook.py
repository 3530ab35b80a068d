"""ReplacementHook gives what the registry backbone gives: same parameter
names, shapes, initial values and plan, and the same training run."""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from repl_mm.engine.hooks.replacement_hook import META_KEY
from repl_mm.models.base import to_repl_backbone
from ..test_models.test_backbones.cases import CASES, IDS


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_same_model_as_the_registry_backbone(case):
    if case.upstream == case.repl:
        pytest.skip('no upstream class (He et al. depths)')
    torch.manual_seed(0)
    stock = case.cls('upstream')(**case.kwargs)
    plan = to_repl_backbone(stock, dict(interval=2))
    torch.manual_seed(0)
    repl = case.build(interval=2)
    assert plan == repl.replacement_plan
    assert type(stock) is type(repl)
    a, b = stock.state_dict(), repl.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(case.shape)
    stock.eval(), repl.eval()
    for p, q in zip(stock(x), repl(x)):
        assert torch.equal(p, q)


def test_refuses_a_repl_backbone_and_unknown_ones():
    from torch import nn

    from repl_mm.models.cls_resnet import RepLResNet
    with pytest.raises(ValueError, match='already a RepL backbone'):
        to_repl_backbone(RepLResNet(depth=18), {})
    with pytest.raises(ValueError, match='no RepL backbone extends.*Linear'):
        to_repl_backbone(nn.Linear(2, 2), {})


def tiny_cfg(tmp_path, route, data):
    """ResNet-18 (mmpretrain ResNet_CIFAR) on a few synthetic images."""
    backbone = dict(
        type='ResNet_CIFAR',
        depth=18,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch')
    cfg = Config(
        dict(
            default_scope='mmpretrain',
            model=dict(
                type='ImageClassifier',
                backbone=backbone,
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead',
                    num_classes=10,
                    in_channels=512,
                    loss=dict(type='CrossEntropyLoss'))),
            data_preprocessor=dict(
                num_classes=10, mean=[127.5] * 3, std=[64.0] * 3),
            train_dataloader=dict(
                batch_size=8,
                num_workers=0,
                dataset=dict(
                    type='CIFARFormat',
                    data_root=str(data),
                    split='train',
                    pipeline=[dict(type='PackInputs')]),
                sampler=dict(type='DefaultSampler', shuffle=True)),
            train_cfg=dict(by_epoch=True, max_epochs=1),
            test_dataloader=dict(
                batch_size=8,
                num_workers=0,
                dataset=dict(
                    type='CIFARFormat',
                    data_root=str(data),
                    split='test',
                    pipeline=[dict(type='PackInputs')]),
                sampler=dict(type='DefaultSampler', shuffle=False)),
            test_cfg=dict(),
            test_evaluator=dict(type='Accuracy'),
            optim_wrapper=dict(
                optimizer=dict(
                    type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
                paramwise_cfg=dict(
                    custom_keys={
                        k: dict(decay_mult=0.0)
                        for k in ('.phi', '.alpha', '.beta', '.site_norm.')
                    })),
            param_scheduler=dict(
                type='CosineAnnealingLR',
                T_max=1,
                by_epoch=True,
                convert_to_iter_based=True),
            default_hooks=dict(
                checkpoint=dict(type='CheckpointHook', interval=1)),
            randomness=dict(seed=0),
            work_dir=str(tmp_path / route),
            custom_imports=dict(imports=['repl_mm'])))
    if route == 'hook':
        cfg.custom_hooks = [dict(type='ReplacementHook', interval=4)]
    else:
        cfg.model.backbone.type = 'RepLResNet_CIFAR'
        cfg.model.backbone.replacement = dict(interval=4)
    return cfg


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from repl_mm.datasets import synthetic_images, write_cifar
    from repl_mm.datasets.writers import split_train_test
    root = tmp_path_factory.mktemp('syn')
    imgs, labels, classes = synthetic_images(num_per_class=4)
    split = split_train_test(imgs, labels, 0.25, seed=0)
    write_cifar(str(root), split['train'], split['test'], classes=classes)
    return root


def train(cfg):
    from repl_mm.engine import RepLRunner
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        runner = RepLRunner.from_cfg(copy.deepcopy(cfg))
        runner.train()
    return runner


def test_hook_route_trains_like_the_backbone_route(tmp_path, data):
    hook = train(tiny_cfg(tmp_path, 'hook', data))
    reg = train(tiny_cfg(tmp_path, 'registry', data))
    a, b = hook.model.state_dict(), reg.model.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the new parameters are optimised, with the shipped no-decay rule;
    # the removed ones are gone from the optimizer
    names = {id(p): n for n, p in hook.model.named_parameters()}
    groups = {
        names[id(p)]: g['weight_decay']
        for g in hook.optim_wrapper.optimizer.param_groups
        for p in g['params']
    }
    assert set(groups) == set(names.values())
    phis = [n for n in groups if '.phi' in n]
    assert phis and all(groups[n] == 0 for n in phis)
    assert groups['backbone.layer1.0.conv1.weight'] == pytest.approx(1e-4)
    # the LR schedule drives the rebuilt optimizer
    assert hook.param_schedulers[0].optimizer is hook.optim_wrapper
    ckpt = torch.load(tmp_path / 'hook' / 'epoch_1.pth', weights_only=False)
    assert ckpt['meta'][META_KEY]['backbone']['type'] == 'RepLResNet_CIFAR'
    assert ckpt['meta'][META_KEY]['backbone']['replacement']['interval'] == 4


def test_hook_route_keeps_auto_scale_lr(tmp_path, data):
    cfg = tiny_cfg(tmp_path, 'hook', data)
    cfg.auto_scale_lr = dict(enable=True, base_batch_size=4)  # batch 8: x2
    runner = train(cfg)
    assert runner.param_schedulers[0].base_values[0] == pytest.approx(0.2)


def test_published_hook_checkpoint_builds_without_the_hook(tmp_path, data):
    """Tools that never run hooks get the RepL model from the config that
    publish_model.py writes beside the weights."""
    import importlib.util

    from mmpretrain.registry import MODELS
    runner = train(tiny_cfg(tmp_path, 'hook', data))
    spec = importlib.util.spec_from_file_location(
        'publish_model',
        Path(__file__).resolve().parents[2] / 'tools' / 'model_converters' /
        'publish_model.py')
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    final = publish.publish(
        str(tmp_path / 'hook' / 'epoch_1.pth'), str(tmp_path / 'pub.pth'))
    cfg = Config.fromfile(final[:-4] + '.py')
    assert not any(h['type'] == 'ReplacementHook'
                   for h in cfg.get('custom_hooks', []))
    assert cfg.model.backbone.type == 'RepLResNet_CIFAR'
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    weights = torch.load(final, weights_only=True)['state_dict']
    model.load_state_dict(weights)  # strict: same keys, same plan
    ref = runner.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    # and the upstream inferencer, which runs no hooks
    import numpy as np
    from mmpretrain import ImageClassificationInferencer
    inferencer = ImageClassificationInferencer(
        model=final[:-4] + '.py', pretrained=final, device='cpu')
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    assert 0 <= inferencer(img)[0]['pred_label'] < 10


@pytest.mark.parametrize('route', ['hook', 'registry'])
def test_mixing_weights_are_logged(tmp_path, data, route):
    cfg = tiny_cfg(tmp_path, route, data)
    cfg.custom_hooks = cfg.get('custom_hooks',
                               []) + [dict(type='RepLLoggerHook', interval=1)]
    runner = train(cfg)
    scalars = runner.message_hub.log_scalars
    site = runner.model.backbone.replacement_plan.indices[0]
    summary = runner.model.backbone.site_modules()[site].mixing_summary()
    assert summary  # ResNet-18's site 4 draws conv2 from prev only
    for name, value in summary.items():
        buf = scalars[f'train/repl_site{site}_{name}']
        assert len(buf.data[0]) == runner.iter  # one record per iteration
        assert buf.current() == pytest.approx(value)


def test_hook_route_resumes_and_tests(tmp_path, data):
    """A hook-route checkpoint resumes (the hook converts the model before
    loading) and evaluates (``test()`` runs ``before_run`` first too)."""
    from repl_mm.engine import RepLRunner
    train(tiny_cfg(tmp_path, 'hook', data))
    cfg = tiny_cfg(tmp_path, 'hook', data)
    cfg.train_cfg.max_epochs = 2
    cfg.resume = True  # from the latest checkpoint of the work dir
    runner = train(cfg)
    assert runner._has_loaded  # resumed from epoch_1.pth, not from scratch
    assert runner.epoch == 2
    assert (tmp_path / 'hook' / 'epoch_2.pth').exists()
    cfg = tiny_cfg(tmp_path, 'hook', data)
    cfg.load_from = str(tmp_path / 'hook' / 'epoch_2.pth')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        metrics = RepLRunner.from_cfg(cfg).test()
    assert 0 <= metrics['accuracy/top1'] <= 100


def test_train_then_test_on_one_runner(tmp_path, data, monkeypatch):
    """``test()`` runs ``before_run`` again: the hook finds the backbone it
    converted and leaves model, optimizer and schedulers alone."""
    from repl_mm.engine import RepLRunner
    logged = []
    monkeypatch.setattr('repl_mm.engine.hooks.replacement_hook.print_log',
                        lambda msg, **kw: logged.append(msg))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        runner = RepLRunner.from_cfg(tiny_cfg(tmp_path, 'hook', data))
        runner.train()
        assert logged == [
            'ReplacementHook: RepLResNet_CIFAR built from the config, '
            'optimizer rebuilt, schedulers rebuilt'
        ]
        model, optim = runner.model, runner.optim_wrapper
        schedulers = runner.param_schedulers
        state = {k: v.clone() for k, v in model.state_dict().items()}
        metrics = runner.test()
    assert 0 <= metrics['accuracy/top1'] <= 100
    assert runner.model is model and runner.optim_wrapper is optim
    assert runner.param_schedulers is schedulers
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert len(logged) == 2 and 'left as they are' in logged[1]
    assert 'rebuilt' not in logged[1]


def test_test_only_runner_logs_what_it_did(tmp_path, data, monkeypatch):
    from repl_mm.engine import RepLRunner
    train(tiny_cfg(tmp_path, 'hook', data))
    logged = []
    monkeypatch.setattr('repl_mm.engine.hooks.replacement_hook.print_log',
                        lambda msg, **kw: logged.append(msg))
    cfg = tiny_cfg(tmp_path, 'hook', data)
    cfg.load_from = str(tmp_path / 'hook' / 'epoch_1.pth')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        RepLRunner.from_cfg(cfg).test()
    assert logged == [
        'ReplacementHook: RepLResNet_CIFAR built from the '
        'config, no optimizer built yet, none rebuilt'
    ]


def test_hook_refuses_a_backbone_it_did_not_convert():
    from types import SimpleNamespace

    from repl_mm.engine.hooks.replacement_hook import ReplacementHook
    from repl_mm.models.cls_resnet import RepLResNet_CIFAR
    model = SimpleNamespace(backbone=RepLResNet_CIFAR(depth=20))
    runner = SimpleNamespace(
        model=model,
        optim_wrapper=None,
        cfg=Config(dict(model=dict(backbone=dict()))))
    with pytest.raises(ValueError, match='already a RepL backbone'):
        ReplacementHook(interval=4).before_run(runner)
    # a hook that converted another backbone refuses this one too
    hook = ReplacementHook(interval=2)
    from mmpretrain.models.backbones import ResNet_CIFAR
    other = SimpleNamespace(backbone=ResNet_CIFAR(depth=18))
    hook.before_run(
        SimpleNamespace(
            model=other,
            optim_wrapper=None,
            cfg=Config(dict(model=dict(backbone=dict())))))
    with pytest.raises(ValueError, match='already a RepL backbone'):
        hook.before_run(runner)


@pytest.mark.parametrize(
    'scope,path,size',
    [
        ('mmdet', 'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', 64),
        ('mmseg', 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_'
         '8xb2-160k_ade20k-512x512.py', 64),
        # no padding of small maps in mmpretrain: 224 keeps them >= window 7
        ('mmpretrain', 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
         224),
    ])
def test_hook_route_on_a_stock_swin_config(scope, path, size):
    """A stock upstream Swin-T config with the hook added gives the model of
    the same config with ``RepLSwinTransformer``: same plan (sites 4, 8),
    parameters, values and outputs. Nothing is downloaded (no
    ``init_weights``)."""
    import importlib
    from types import SimpleNamespace

    from mmengine.hub import get_config

    from repl_mm.engine.hooks import ReplacementHook
    cfg = get_config(path)
    cfg.custom_hooks = [dict(type='ReplacementHook', interval=4)]
    models = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(0)
        stock = models.build(cfg.model)
        hook_cfg = dict(cfg.custom_hooks[0])
        hook_cfg.pop('type')
        hook = ReplacementHook(**hook_cfg)
        hook.before_run(
            SimpleNamespace(model=stock, cfg=cfg, optim_wrapper=None))
        repl_cfg = copy.deepcopy(cfg.model)
        repl_cfg.backbone.type = 'RepLSwinTransformer'
        repl_cfg.backbone.replacement = dict(interval=4)
        torch.manual_seed(0)
        repl = models.build(repl_cfg)
    assert type(stock.backbone) is type(repl.backbone)
    assert stock.backbone.replacement_plan == repl.backbone.replacement_plan
    assert repl.backbone.replacement_plan.indices == (4, 8)
    assert hook.model_cfg['backbone']['type'] == 'RepLSwinTransformer'
    a, b = stock.state_dict(), repl.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 3, size, size)
    stock.eval(), repl.eval()
    for p, q in zip(stock.backbone(x), repl.backbone(x)):
        assert torch.equal(p, q)
