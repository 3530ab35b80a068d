"""The efficiency benchmark: method configs, derived statistics, compiled
variants, and an end-to-end run on a tiny CIFAR ResNet-20. Behaviour only:
nothing here asserts a speed. The memory and time primitives are tested in
test_profiling.py, the rendering in test_report.py."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from repl_mm.analysis import benchmark
from repl_mm.analysis.benchmark import (METHODS, method_model_cfg,
                                        run_benchmark, run_case,
                                        saving_efficiency)
from repl_mm.analysis.cases import (Case, build_model, make_batch, make_case,
                                    training_loss)

ROOT = Path(__file__).resolve().parents[2]
RETINANET = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
DEEPLAB = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py'


def test_saving_efficiency():
    assert saving_efficiency(100, 80, 60) == pytest.approx(0.5)
    assert saving_efficiency(100, 60, 60) == pytest.approx(1.0)
    assert saving_efficiency(1.0, 1.1, 0.8) == pytest.approx(-0.5)
    assert saving_efficiency(100, 90, 100) is None


def test_method_configs_of_upstream_detector():
    case = make_case(RETINANET, input_size=64, batch_size=1)
    assert case.task == 'det' and case.input_size == (64, 64)
    assert case.backbone_type == 'RepLResNet'  # mmdet ResNet -> twin
    assert case.model['backbone']['init_cfg'] is None  # offline
    assert method_model_cfg(case, 'sd') is None  # no drop_path_rate
    cp = method_model_cfg(case, 'repl+cp')['backbone']
    assert cp['with_cp'] and cp['replacement'] == dict(interval=4)
    assert method_model_cfg(
        case, 'e2e')['backbone']['replacement'] == dict(mode='none')
    assert method_model_cfg(
        case, 'repl-norecompute')['backbone']['replacement'] == dict(
            interval=4, recompute=False)


def test_upstream_convnext_detector_keeps_the_backbone_scope():
    """mmdet's ConvNeXt configs name mmpretrain's backbone with its scope:
    the twin keeps it (mmdet has no RepLConvNeXt of its own)."""
    case = make_case(
        'mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_'
        'coco.py',
        input_size=64,
        batch_size=1)
    assert case.backbone_type == 'mmpretrain.RepLConvNeXt'
    assert case.model['backbone']['init_cfg'] is None  # offline
    sd = method_model_cfg(case, 'sd')['backbone']
    assert sd['drop_path_rate'] > 0
    assert method_model_cfg(case, 'repl')['backbone']['drop_path_rate'] == 0
    from repl_mm.analysis.cases import SUITE
    assert SUITE['convnext-t']['config']['model']['neck'] is None


def test_config_plan_keeps_the_config_sites():
    case = make_case('configs/demo/vit-tiny-p8-repl_1xb64_15e_mnist5k.py')
    assert method_model_cfg(case, 'repl')['backbone']['replacement'] == dict(
        interval=4)  # the paper's k = 4 rule by default
    case.config_plan = True
    for m, mode in (('repl', {}), ('drop', dict(mode='drop'))):
        rep = method_model_cfg(case, m)['backbone']['replacement']
        assert rep == dict(indices=[3, 7, 11], **mode)
    assert method_model_cfg(case, 'repl-k2')['backbone']['replacement'] == \
        dict(interval=2)  # an explicit k still wins


def test_segmentor_config_offline_and_batch():
    case = make_case(DEEPLAB, input_size=(32, 48), batch_size=2)
    assert case.backbone_type == 'RepLResNetV1c'
    assert 'SyncBN' not in json.dumps(case.model)
    assert case.model.get('pretrained') is None
    # our shipped config: already a RepL twin, replacement options kept
    ours = make_case(
        str(ROOT / 'configs/deeplabv3/deeplabv3_repl-r50-d8_'
            '4xb2-80k_cityscapes-512x1024.py'))
    assert ours.input_size == (256, 256)
    assert method_model_cfg(ours, 'drop')['backbone']['replacement'] == dict(
        mode='drop', interval=4)


def test_sd_only_where_the_backbone_has_drop_path():
    case = make_case(
        dict(
            default_scope='mmpretrain',
            model=dict(
                type='ImageClassifier',
                backbone=dict(
                    type='VisionTransformer',
                    arch='deit-tiny',
                    drop_path_rate=0.1),
                head=dict(
                    type='VisionTransformerClsHead',
                    num_classes=10,
                    in_channels=192))))
    assert case.backbone_type == 'RepLVisionTransformer'
    assert case.input_size == (224, 224)
    sd = method_model_cfg(case, 'repl+sd')['backbone']
    assert sd['drop_path_rate'] == 0.1 and not sd['with_cp']
    # every other method runs without stochastic depth
    assert method_model_cfg(case, 'e2e')['backbone']['drop_path_rate'] == 0


def test_unsupported_backbone_raises():
    cfg = dict(
        default_scope='mmpretrain',
        model=dict(type='ImageClassifier', backbone=dict(type='MobileNetV2')))
    with pytest.raises(ValueError, match='MobileNetV2'):
        make_case(cfg)


def r20_case(batch_size=2, repeats=2):
    """A CIFAR ResNet-20 classifier case (upstream backbone), tiny."""
    return make_case(
        dict(
            default_scope='mmpretrain',
            model=dict(
                type='ImageClassifier',
                backbone=dict(type='ResNet_CIFAR', depth=20),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead', num_classes=10, in_channels=64))),
        name='r20',
        batch_size=batch_size,
        repeats=repeats)


def test_end_to_end_tiny(tmp_path):
    methods = ['e2e', 'repl', 'drop', 'cp', 'repl+cp', 'repl-norecompute']
    acc = {'r20': {'e2e': 91.0, 'repl': 91.5, 'drop': 90.0}}
    res = run_benchmark([r20_case()], str(tmp_path), methods, accuracies=acc)
    for name in ('benchmark.json', 'benchmark.md', 'ratios.png',
                 'accuracy_memory.png'):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / 'benchmark.json').read_text()) == \
        json.loads(json.dumps(res))
    assert '| repl+cp |' in (tmp_path / 'benchmark.md').read_text()

    (case, ) = res['cases']
    r = case['methods']
    assert list(r) == methods
    mem = {m: r[m]['saved_bytes'] for m in methods}
    # activation memory: drop < repl < e2e; checkpointing saves more, and
    # RepL on top of it more still
    assert mem['drop'] < mem['repl'] < mem['e2e']
    assert mem['repl+cp'] < mem['cp'] < mem['repl']
    assert mem['repl'] <= mem['repl-norecompute']
    assert r['repl']['sites'] == r['drop']['sites'] == [5, 8]
    assert r['e2e']['sites'] == [] and r['e2e']['plan_sites'] == [5, 8]
    assert r['drop']['params'] < r['repl']['params'] < r['e2e']['params']
    # derived figures follow from the measured ones
    assert r['repl']['S_mem'] == pytest.approx(
        saving_efficiency(mem['e2e'], mem['repl'], mem['drop']))
    assert r['repl']['S_time'] == pytest.approx(
        saving_efficiency(1, r['repl']['time_ratio']['median'],
                          r['drop']['time_ratio']['median']))
    assert r['e2e']['time_ratio'] == dict(median=1.0, q1=1.0, q3=1.0)
    # synthesis: weight-space only, apart from the per-sample FLOPs
    f = {m: r[m]['flops'] for m in methods}
    assert f['e2e']['synthesis'] == 0 < f['repl']['synthesis']
    assert f['drop']['step'] < f['repl']['step'] < f['e2e']['step']
    # the backward of checkpointed blocks and recomputing sites re-runs
    # their forward; without recompute or checkpointing, nothing does
    assert f['e2e']['recompute'] == f['repl-norecompute']['recompute'] == 0
    assert 0 < f['repl']['recompute'] < f['repl+cp']['recompute']
    assert f['cp']['step'] == 3 * f['cp']['forward'] + f['cp']['recompute']
    assert f['cp']['recompute'] > f['cp']['forward'] / 2
    # every site keeps its synthesized matrices for backward (synthesis
    # runs once per step), whether it recomputes or checkpoints or not
    kept = {m: r[m]['synthesis_kept_bytes'] for m in methods}
    assert kept['e2e'] == kept['drop'] == 0
    assert kept['repl'] == kept['repl+cp'] == kept['repl-norecompute'] > 0
    # the large-batch limit leaves them out of the activation memory
    assert r['repl']['mem_ratio_large_batch'] == pytest.approx(
        (mem['repl'] - kept['repl']) / mem['e2e'])
    targets = {t['target']: t for t in res['targets']}
    assert targets['act. mem repl+cp / cp < 1']['met']
    # S_mem at the batch and in its large-batch limit, against one goal
    for name, key in (('repl S_mem >= 0.70', 'S_mem'),
                      ('repl S_mem, large-batch limit >= 0.70',
                       'S_mem_large_batch')):
        assert targets[name]['value'] == r['repl'][key]
        assert targets[name]['met'] == (r['repl'][key] >= 0.70)


@pytest.mark.parametrize('config, size, batch', [(RETINANET, 64, 1),
                                                 (DEEPLAB, 32, 2)])
def test_task_loss_on_synthetic_batch(config, size, batch):
    case = make_case(config, input_size=size, batch_size=batch)
    model = build_model(case.scope, method_model_cfg(case, 'repl'))
    assert model.backbone.replacement_plan.indices == (5, 9, 12)
    inputs, samples = make_batch(case, model)
    assert inputs.shape == (batch, 3, size, size)
    if case.task == 'det':  # boxes inside the image
        boxes = samples[0].gt_instances.bboxes
        assert boxes.shape == (4, 4)
        assert 0 <= boxes.min() <= boxes.max() <= size
    else:
        assert samples[0].gt_sem_seg.data.shape == (1, size, size)
    loss = training_loss(model, (inputs, samples))
    loss.backward()
    assert torch.isfinite(loss)


def test_swin_t_suite_case():
    """The swin-t case: upstream's Swin-T ImageNet config, its backbone
    switched to RepLSwinTransformer (sites 4, 8); stochastic depth applies
    (Swin has drop_path_rate)."""
    from repl_mm.analysis.cases import suite_cases
    case = suite_cases(['swin-t'], quick=True)[0]
    assert case.backbone_type == 'RepLSwinTransformer'
    assert method_model_cfg(case, 'sd') is not None
    model = build_model(case.scope, method_model_cfg(case, 'repl'))
    assert model.backbone.replacement_plan.indices == (4, 8)
    loss = training_loss(model, make_batch(case, model))
    loss.backward()
    assert torch.isfinite(loss)


def load_cli():
    spec = importlib.util.spec_from_file_location(
        'benchmark_cli', ROOT / 'tools/analysis/benchmark.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize('argv, message', [
    ([], 'give config files or --suite'),
    (['--suite', '--from-json', 'x.json'], 'give no configs and no'),
    (['--suite', 'cifar-r33'], "unknown case(s) ['cifar-r33']"),
    (['--suite', '--methods', 'repl', 'drop'], 'must include e2e'),
    (['--suite', '--methods', 'e2e', 'magic'], "unknown method(s) ['magic']"),
    (['--suite', '--repeats', '0'], '--repeats must be >= 1, got 0'),
    (['--suite', '--input-size', '1', '2', '3'], '--input-size takes'),
    (['nope.py'], "config 'nope.py' does not exist"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    cli = load_cli()
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cli_accepts_suite_and_methods():
    args = load_cli().parse_args(['--suite', 'cifar-r32', '--quick'])
    assert args.suite == ['cifar-r32'] and args.methods == list(METHODS)
    assert isinstance(r20_case(), Case)


def test_cli_compile_and_blocks_options(capsys):
    cli = load_cli()
    args = cli.parse_args(['--suite', 'cifar-r32', '--compile'])
    assert args.compile and args.compile_backend == 'inductor'
    args = cli.parse_args(
        ['--suite', 'cifar-r32', '--compile', '--compile-backend', 'eager'])
    assert args.compile_backend == 'eager'
    assert cli.parse_args(['--suite', 'cifar-r32', '--blocks']).blocks
    args = cli.parse_args(['--suite', 'cifar-r32', '--blocks', '--compile'])
    assert args.blocks and args.compile
    with pytest.raises(SystemExit):
        cli.parse_args(
            ['--suite', 'cifar-r32', '--blocks', '--accuracies', 'a.json'])
    assert '--blocks measures single blocks: it takes no --accuracies' in \
        capsys.readouterr().err
    assert cli.parse_args(['--suite', 'cifar-r32', '--blocks',
                           '--profile']).profile == 3
    assert cli.parse_args(['--suite', 'cifar-r32']).profile is None
    for argv, err in ((['--profile'], '--profile profiles single blocks: '
                       'give --blocks too'),
                      (['--blocks', '--profile',
                        '0'], '--profile: ROUNDS must be at least 1, got 0')):
        with pytest.raises(SystemExit):
            cli.parse_args(['--suite', 'cifar-r32', *argv])
        assert err in capsys.readouterr().err


def test_compiled_variants(monkeypatch):
    """Every method also runs compiled (here with the 'eager' backend:
    dynamo's tracing without inductor's code generation, seconds instead
    of minutes); a compile that fails at its first step, or later during
    the timing, is recorded as failed with the first line of the error and
    the other methods are measured."""
    real = torch.compile
    calls = {}

    def fake_compile(model, backend):
        mode = model.backbone.replacement_plan.mode
        cfg = model.backbone.replacement_plan.config
        compiled = real(model, backend=backend)

        def run(*args, **kwargs):
            calls[mode] = calls.get(mode, 0) + 1
            if mode == 'drop':
                raise RuntimeError('boom\nsecond line')
            if not cfg.recompute and calls[mode] > 3:  # after warm-up
                raise ValueError('late')
            return compiled(*args, **kwargs)

        return run

    monkeypatch.setattr(benchmark.torch, 'compile', fake_compile)
    methods = ['e2e', 'drop', 'repl-norecompute']
    res = run_case(r20_case(), methods, compile_backend='eager')
    comp = res['compiled']
    assert comp['backend'] == 'eager' and list(comp['methods']) == methods
    r = comp['methods']
    assert r['drop']['failed'] == 'RuntimeError: boom'
    assert r['repl-norecompute']['failed'] == 'ValueError: late'
    e2e = r['e2e']
    assert 'failed' not in e2e and e2e['compile_seconds'] > 0
    assert e2e['time_ratio'] == dict(median=1.0, q1=1.0, q3=1.0)
    assert e2e['flops'] == res['methods']['e2e']['flops']
    # the eager methods are all measured
    assert all('time_ratio' in m for m in res['methods'].values())
    results = benchmark.finalize(dict(cases=[res]))
    assert results['cases'][0]['compiled']['methods']['e2e']['S_time'] \
        is None  # no compiled drop to compare with
    md = benchmark.to_markdown(results)
    assert '| drop | failed: RuntimeError: boom |' in md


def test_compiled_eager_backend_end_to_end():
    """A real torch.compile of E2E, drop and RepL without recompute;
    derived figures against the compiled E2E and drop."""
    methods = ['e2e', 'drop', 'repl-norecompute']
    res = benchmark.finalize(
        dict(cases=[run_case(r20_case(), methods, compile_backend='eager')]))
    r = res['cases'][0]['compiled']['methods']
    assert not any(m.get('failed') for m in r.values()), r
    assert r['repl-norecompute']['S_time'] == pytest.approx(
        saving_efficiency(1, r['repl-norecompute']['time_ratio']['median'],
                          r['drop']['time_ratio']['median']))
    assert r['drop']['saved_bytes'] < r['e2e']['saved_bytes']
    assert r['drop']['S_mem'] == pytest.approx(1.0)
