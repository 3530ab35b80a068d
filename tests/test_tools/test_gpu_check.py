"""tools/gpu_check.py: its options, ``--list``, the exit without CUDA, the
tables and the JSON, the check runner (a failing check fails the run and
stops no other), the configs of the two routes, the verifiers, and one
real training check on the CPU end to end (``--allow-cpu``)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from repl_mm.analysis import gpu_check as gc
from repl_mm.analysis.gpu_check import (Check, CheckFailed, Context,
                                        build_checks, run_checks, select)
from repl_mm.analysis.gpu_probe import probe_path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def load_cli():
    spec = importlib.util.spec_from_file_location('gpu_check_cli',
                                                  ROOT / 'tools/gpu_check.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def cli():
    return load_cli()


# -- options ---------------------------------------------------------------
def test_defaults_and_out_follows_the_work_dir(cli):
    args = cli.parse_args([])
    assert args.work_dir == 'work_dirs/gpu_check'
    assert args.out == os.path.join('work_dirs/gpu_check', 'result.json')
    assert args.iters is None and args.only is None
    assert not args.allow_cpu and not args.list
    args = cli.parse_args([
        '--work-dir', 'w', '--only', 'train-*-hook', 'bench-deit-s', '--iters',
        '5'
    ])
    assert args.out == os.path.join('w', 'result.json')
    assert args.only == ['train-*-hook', 'bench-deit-s'] and args.iters == 5
    assert cli.parse_args(['--out', 'r.json']).out == 'r.json'


@pytest.mark.parametrize('argv, message', [
    (['--iters', '0'], '--iters must be >= 1, got 0'),
    (['--timeout', '0'], '--timeout must be > 0, got 0'),
    (['--only', 'train-nope'], "--only: 'train-nope' matches no check"),
    (['--only', 'data-mnist5k', 'bench-*', 'x?'], "--only: 'x?' matches"),
])
def test_bad_options_name_option_and_value(cli, argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_list_prints_every_check_and_runs_nothing(cli, tmp_path, monkeypatch,
                                                  capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['--list']) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == gc.check_names()
    assert len(names) == len(set(names)) == 36
    models = ('resnet32', 'vit-tiny', 'retinanet', 'deeplabv3')
    assert {
        f'train-{m}-{r}{a}'
        for m in models
        for r in ('registry', 'hook')
        for a in ('', '-amp')
    } | {f'train-{m}-registry-compile'
         for m in models} <= set(names)
    for name in ('resume-resnet32', 'test-deeplabv3', 'infer-retinanet',
                 'dist-resnet32-registry', 'dist-resnet32-hook',
                 'dist-resnet32-registry-norecompute', 'bench-resnet50',
                 'bench-deit-s', 'bench-retinanet-r50'):
        assert name in names
    assert list(tmp_path.iterdir()) == []


def test_no_cuda_says_so_and_exits_0(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    work = tmp_path / 'w'
    assert cli.main(['--work-dir', str(work)]) == 0
    out = capsys.readouterr().out
    assert 'found no CUDA device' in out and '--allow-cpu' in out
    assert not work.exists()  # nothing ran, nothing written


def test_a_failing_check_makes_main_exit_1(cli, tmp_path, monkeypatch, capsys):
    checks = [
        Check('fine', 'passes', [[PY, '-c', 'pass']]),
        Check('broken', 'fails', [[PY, '-c', 'raise SystemExit(2)']]),
    ]
    monkeypatch.setattr(cli, 'build_checks', lambda ctx: checks)
    monkeypatch.setattr(cli, 'cuda_devices', lambda: 0)
    out = tmp_path / 'r.json'
    argv = ['--allow-cpu', '--work-dir', str(tmp_path), '--out', str(out)]
    assert cli.main(argv) == 1
    res = json.loads(out.read_text())
    assert not res['passed']
    assert [(c['name'], c['result'])
            for c in res['checks']] == [('fine', 'PASS'), ('broken', 'FAIL')]
    assert '| broken | FAIL |' in capsys.readouterr().out
    monkeypatch.setattr(cli, 'build_checks', lambda ctx: checks[:1])
    assert cli.main(argv) == 0
    assert json.loads(out.read_text())['passed']


# -- the runner ------------------------------------------------------------
def test_runner_reports_each_check_and_goes_on(tmp_path):
    ctx = Context(str(tmp_path), gpus=0, iters=1, timeout=2)
    stale = Path(ctx.run_dir('ok')) / 'stale.pth'
    stale.parent.mkdir(parents=True)
    stale.write_text('from an earlier run')
    seen = []
    checks = [
        Check(
            'ok',
            'passes', [[PY, '-c', 'print("hello")']],
            verify=lambda: seen.append(stale.exists()) or 'fine'),
        Check('bad', 'exits 3',
              [[PY, '-c', 'print("boom"); raise SystemExit(3)'],
               [PY, '-c', 'print("never")']]),
        Check('after-bad', 'needs bad', [[PY, '-c', 'pass']], needs=('bad', )),
        Check(
            'wrong',
            'runs, but its output is wrong', [[PY, '-c', 'pass']],
            verify=lambda: gc.expect(False, 'not what it should be')),
        Check('slow', 'times out',
              [[PY, '-c', 'import time; '
                'time.sleep(30)']]),
        Check(
            'crash',
            'verify raises', [],
            verify=lambda: open(tmp_path / 'missing.json')),
        Check(
            'n/a',
            'does not apply', [[PY, '-c', 'raise SystemExit(1)']],
            skip='needs a GPU'),
        Check('late', 'runs after the failures', lambda: [[PY, '-c', 'pass']]),
    ]
    lines = []
    results = run_checks(checks, ctx, echo=lines.append)
    got = {r['name']: (r['result'], r['note']) for r in results}
    assert got['ok'] == ('PASS', 'fine') and seen == [False]  # run dir fresh
    assert got['bad'] == ('FAIL', 'command 1 of 2 exited with 3')
    assert got['after-bad'] == ('SKIP', 'needs bad (FAIL)')
    assert got['wrong'] == ('FAIL', 'not what it should be')
    assert got['slow'] == ('FAIL', 'timed out after 2 s')
    assert got['crash'][0] == 'FAIL' and 'FileNotFoundError' in got['crash'][1]
    assert got['n/a'] == ('SKIP', 'needs a GPU')
    assert got['late'] == ('PASS', '')
    assert gc.exit_code(results) == 1
    assert gc.exit_code([r for r in results if r['result'] != 'FAIL']) == 0
    log = Path(ctx.log_path('bad')).read_text()
    assert 'boom' in log and 'never' not in log and '$ ' in log
    assert 'Traceback' in Path(ctx.log_path('crash')).read_text()
    assert any(line.startswith('[2/8] bad: FAIL') for line in lines)


def test_only_adds_what_a_check_needs_in_run_order():
    checks = build_checks(Context('w', gpus=1, iters=20))
    names = [c.name for c in select(checks, ['test-retinanet'])]
    assert names == [
        'data-coco-shapes', 'train-retinanet-registry', 'test-retinanet'
    ]
    names = [c.name for c in select(checks, ['resume-*', 'dist-*'])]
    assert names == [
        'data-mnist5k', 'train-resnet32-registry-amp', 'resume-resnet32',
        'dist-resnet32-registry', 'dist-resnet32-hook',
        'dist-resnet32-registry-norecompute'
    ]
    cpu = build_checks(Context('w', gpus=0, iters=2))
    assert [c.name for c in select(cpu, ['resume-resnet32'])
            ][-2:] == ['train-resnet32-registry', 'resume-resnet32']
    with pytest.raises(ValueError, match="--only: 'nope'"):
        select(checks, ['nope'])


@pytest.mark.parametrize('gpus, amp_skip, dist_skip', [
    (0, 'fp16 AMP needs CUDA', 'no distributed run on the CPU'),
    (1, None, 'needs 2+ CUDA devices, found 1'),
    (2, None, None),
])
def test_what_is_skipped_where(gpus, amp_skip, dist_skip):
    checks = {c.name: c for c in build_checks(Context('w', gpus, 20))}
    amp = [c for n, c in checks.items() if n.endswith('-amp')]
    assert len(amp) == 8 and all(c.skip == amp_skip for c in amp)
    compiled = [c for n, c in checks.items() if n.endswith('-compile')]
    assert len(compiled) == 4
    assert all((c.skip is None) == (gpus > 0) for c in compiled)
    dist = [c for n, c in checks.items() if n.startswith('dist-')]
    assert len(dist) == 3
    assert all((c.skip or None) == dist_skip or c.skip.startswith(dist_skip)
               for c in dist)
    others = [
        c for n, c in checks.items()
        if not n.endswith(('-amp', '-compile')) and not n.startswith('dist-')
    ]
    assert all(c.skip is None for c in others)


def test_compile_checks_set_the_config_key():
    checks = {c.name: c for c in build_checks(Context('w', 1, 20))}
    cmd = checks['train-vit-tiny-registry-compile'].commands()[0]
    assert cmd[-1] == 'compile=True'
    assert 'compile' not in ' '.join(
        checks['train-vit-tiny-registry'].commands()[0])


def test_recompute_cost_run_turns_recompute_off():
    checks = {c.name: c for c in build_checks(Context('w', 2, 20))}
    off = checks['dist-resnet32-registry-norecompute']
    on = checks['dist-resnet32-registry']
    assert 'model.backbone.replacement.recompute=False' in off.commands()[0]
    assert not any('recompute' in a for a in on.commands()[0])
    assert 'recompute=False' in off.description


# -- configs and schedules -------------------------------------------------
def test_schedules_cut_the_data_or_the_iterations():
    ctx = Context('w', gpus=1, iters=20)
    cls, seg = gc.MODELS['resnet32'], gc.MODELS['deeplabv3']
    assert gc.schedule(ctx, cls, 20)[:3] == [
        'train_dataloader.dataset.indices=1280', 'train_cfg.max_epochs=1',
        'train_cfg.val_interval=1'
    ]
    assert 'train_dataloader.dataset.indices=2560' in gc.schedule(
        ctx, cls, 20, length=2, world=2, batch=64) and \
        'train_cfg.max_epochs=2' in gc.schedule(ctx, cls, 20, length=2)
    assert gc.schedule(ctx, seg, 20, length=2)[0] == 'train_cfg.max_iters=40'
    with pytest.raises(
            ValueError,
            match='--iters 100: .* 6400 samples, but '
            'the mnist5k training set has 4000'):
        gc.schedule(ctx, cls, 100)
    # the shapes sets grow with --iters
    assert gc.shapes_sizes(Context('w', 1, 500), 'coco-shapes') == (4000, 100)
    assert gc.shapes_sizes(Context('w', 0, 2), 'coco-shapes') == (8, 8)


def load_check_config(ctx, name, route):
    return Config.fromfile(gc.write_config(ctx, name, route))


@pytest.mark.parametrize('name, scope, stock', [
    ('vit-tiny', 'mmpretrain', 'VisionTransformer'),
    ('retinanet', 'mmdet', 'ResNet'),
    ('deeplabv3', 'mmseg', 'ResNetV1c'),
])
def test_hook_route_config_builds_the_registry_model(tmp_path, name, scope,
                                                     stock):
    """The hook route's config has the stock backbone and the hook of the
    RepL config's options: converted, it has the registry route's plan."""
    import importlib

    import repl_mm  # noqa: F401
    from repl_mm.models.base import to_repl_backbone
    ctx = Context(str(tmp_path), gpus=0, iters=2)
    reg, hook = (load_check_config(ctx, name, r) for r in gc.ROUTES)
    backbone = hook.model.backbone
    assert backbone.type == stock and 'replacement' not in backbone
    kinds = [h['type'] for h in hook.custom_hooks]
    assert kinds == ['ReplacementHook', 'GpuCheckProbe']
    assert [h['type'] for h in reg.custom_hooks] == ['GpuCheckProbe']
    options = {k: v for k, v in hook.custom_hooks[0].items() if k != 'type'}
    assert options == reg.model.backbone.replacement.to_dict()
    data = ctx.data_dir(gc.MODELS[name].data) + '/'
    for cfg in (hook, reg):
        assert 'repl_mm.analysis.gpu_probe' in cfg.custom_imports.imports
        assert cfg.train_dataloader.dataset.data_root == data
        assert cfg.test_dataloader.dataset.data_root == data
        assert cfg.train_dataloader.batch_size == gc.MODELS[name].cpu_batch
    if name == 'retinanet':
        assert hook.test_evaluator.ann_file.startswith(data)
        assert hook.model.test_cfg.score_thr == 0.0
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        built = registry.build(hook.model.backbone)
        plan = to_repl_backbone(built, options)
        ref = registry.build(reg.model.backbone).replacement_plan
    assert plan.indices == ref.indices and plan.indices


def test_cifar_hook_route_stands_in_resnet18(tmp_path):
    ctx = Context(str(tmp_path), gpus=1, iters=20)
    cfg = load_check_config(ctx, 'resnet32', 'hook')
    assert cfg.model.backbone.to_dict() == gc.CIFAR_HOOK_BACKBONE
    assert cfg.model.head.in_channels == 512
    assert cfg.custom_hooks[0] == dict(type='ReplacementHook', interval=4)
    assert cfg.train_dataloader.batch_size == 64
    assert 'indices' not in cfg.val_dataloader.dataset  # all on a GPU
    with pytest.raises(ValueError, match="'MobileNetV2' has no stock"):
        gc.stock_backbone(dict(type='MobileNetV2'))


# -- verifiers -------------------------------------------------------------
def probe(**kw):
    p = dict(
        rank=0,
        world_size=1,
        backend=None,
        device='cpu',
        optim_wrapper='OptimWrapper',
        iter=2,
        epoch=1,
        loss=1.5,
        syncbn=0,
        backbone='RepLResNet_CIFAR',
        sites=[4, 8, 12],
        finite=True,
        params_start='a',
        params_end='b')
    p.update(kw)
    return p


def write_run(work, probes, ckpt='epoch_1.pth'):
    for p in probes:
        path = Path(probe_path(str(work), 'train', p['rank']))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(p))
    (work / ckpt).write_text('weights')


@pytest.mark.parametrize('change, message', [
    (dict(iter=3), 'ended at iteration 3, expected 2'),
    (dict(device='cuda:0'), 'parameters on cuda:0, expected cpu'),
    (dict(sites=[]), 'RepL is not on'),
    (dict(backbone='ResNet_CIFAR'), 'RepL is not on'),
    (dict(params_end='a'), 'did not change'),
    (dict(finite=False), 'non-finite'),
    (dict(loss=float('nan')), 'last training loss nan'),
])
def test_verify_train_fails_on_a_wrong_run(tmp_path, change, message):
    ctx = Context(str(tmp_path), gpus=0, iters=2)
    write_run(tmp_path, [probe()])
    assert 'iter 2 on cpu' in gc.verify_train(ctx, str(tmp_path), 2,
                                              'epoch_1.pth')
    write_run(tmp_path, [probe(**change)])
    with pytest.raises(CheckFailed, match=message):
        gc.verify_train(ctx, str(tmp_path), 2, 'epoch_1.pth')


def test_verify_train_needs_checkpoint_probe_and_amp(tmp_path):
    ctx = Context(str(tmp_path), gpus=1, iters=2)
    with pytest.raises(CheckFailed, match='no probe file'):
        gc.verify_train(ctx, str(tmp_path), 2, 'epoch_1.pth')
    write_run(tmp_path, [probe(device='cuda:0')])
    with pytest.raises(CheckFailed, match='no checkpoint epoch_2.pth'):
        gc.verify_train(ctx, str(tmp_path), 2, 'epoch_2.pth')
    with pytest.raises(CheckFailed, match='expected AmpOptimWrapper'):
        gc.verify_train(ctx, str(tmp_path), 2, 'epoch_1.pth', amp=True)


def test_verify_dist_compares_every_rank(tmp_path):
    ctx = Context(str(tmp_path), gpus=2, iters=2)

    def ranks(**kw):
        return [
            probe(
                **{
                    **dict(
                        rank=r,
                        world_size=2,
                        backend='nccl',
                        syncbn=20,
                        device=f'cuda:{r}'),
                    **kw
                }) for r in range(2)
        ]

    write_run(tmp_path, ranks())
    assert 'equal parameters' in gc.verify_dist(ctx, str(tmp_path), 2, 2,
                                                'epoch_1.pth')
    bad = ranks()
    bad[1]['params_end'] = 'c'
    write_run(tmp_path, bad)
    with pytest.raises(CheckFailed, match='different parameters'):
        gc.verify_dist(ctx, str(tmp_path), 2, 2, 'epoch_1.pth')
    for change, message in ((dict(backend='gloo'), 'backend gloo'),
                            (dict(syncbn=0), 'no SyncBatchNorm'),
                            (dict(device='cuda:0'), 'ranks share devices')):
        write_run(tmp_path, ranks(**change))
        with pytest.raises(CheckFailed, match=message):
            gc.verify_dist(ctx, str(tmp_path), 2, 2, 'epoch_1.pth')
    os.remove(probe_path(str(tmp_path), 'train', 1))
    with pytest.raises(CheckFailed, match='train_rank1.json'):
        gc.verify_dist(ctx, str(tmp_path), 2, 2, 'epoch_1.pth')


# -- outputs ---------------------------------------------------------------
def bench_json(path, device='cuda:0'):

    def method(ms, ratio):
        return dict(
            time_ms=dict(median=ms),
            peak_bytes=2**20 * ms,
            saved_bytes=2**20 * ms / 2,
            mem_ratio=ratio,
            peak_ratio=ratio,
            S_time=None if ratio == 1 else 0.5,
            S_mem=None if ratio == 1 else 0.7,
            time_ratio=dict(median=ratio, q1=ratio, q3=ratio))

    case = dict(
        name='resnet50',
        device=device,
        batch_size=64,
        input_size=[224, 224],
        methods=dict(
            e2e=method(100.0, 1.0),
            repl=method(90.0, 0.9),
            drop=method(85.0, 0.85)))
    path.mkdir(parents=True, exist_ok=True)
    (path / 'benchmark.json').write_text(json.dumps(dict(cases=[case])))


def test_tables_and_result_json(tmp_path):
    ctx = Context(str(tmp_path), gpus=1, iters=20)
    bench_json(Path(ctx.run_dir('bench-resnet50')))
    assert gc.verify_bench(
        ctx,
        ctx.run_dir('bench-resnet50')).startswith('repl x E2E: time 0.900')
    results = [
        dict(name='train-x', result='PASS', seconds=1.54, note='a | b'),
        dict(name='dist-y', result='SKIP', seconds=0.0, note='needs 2'),
        dict(name='bench-resnet50', result='PASS', seconds=3.0, note=''),
        dict(name='test-z', result='FAIL', seconds=2.0, note='exited'),
    ]
    table = gc.format_table(results)
    assert table.splitlines()[:2] == [
        '| check | result | seconds | note |', '|---|---|---|---|'
    ]
    assert '| train-x | PASS | 1.5 | a / b |' in table
    assert table.splitlines()[-1] == '2 PASS, 1 FAIL, 1 SKIP'
    rows = gc.benchmark_rows(ctx, results)
    assert [r['method'] for r in rows] == ['e2e', 'repl', 'drop']
    bench = gc.format_benchmark(rows)
    assert '| resnet50 | cuda:0 | 64 x 224x224 | repl | 90.0 | 0.900 ' \
        '[0.900, 0.900] | 90 | 0.900 | 45 | 0.900 | 0.500 | 0.700 |' in bench
    assert gc.format_benchmark([]) == '(no benchmark ran)'
    out = gc.write_result(
        str(tmp_path / 'sub' / 'r.json'), dict(x=1), results, rows)
    res = json.loads(Path(out).read_text())
    assert res['passed'] is False and res['meta'] == dict(x=1)
    assert res['checks'] == results and res['benchmark'] == rows
    assert res['table'] == table and res['benchmark_table'] == bench
    # a benchmark on the wrong device does not pass
    bench_json(Path(ctx.run_dir('bench-resnet50')), device='cpu')
    with pytest.raises(CheckFailed, match='measured on cpu, expected cuda'):
        gc.verify_bench(ctx, ctx.run_dir('bench-resnet50'))


# -- a real check, on the CPU ----------------------------------------------
def test_allow_cpu_runs_a_training_check_end_to_end(tmp_path):
    """data-mnist5k and train-resnet32-registry for real: the tools run in
    subprocesses, the probe reports the run, the outputs are checked."""
    env = {
        **os.environ, 'CUDA_VISIBLE_DEVICES': '',
        'OMP_NUM_THREADS': '1',
        'PYTHONPATH': str(ROOT)
    }
    work = tmp_path / 'w'
    out = subprocess.run([
        PY, 'tools/gpu_check.py', '--allow-cpu', '--only',
        'train-resnet32-registry', '--iters', '2', '--work-dir',
        str(work)
    ],
                         cwd=ROOT,
                         env=env,
                         capture_output=True,
                         text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '| train-resnet32-registry | PASS |' in out.stdout
    res = json.loads((work / 'result.json').read_text())
    assert res['passed'] and res['meta']['device'] == 'cpu'
    assert [(c['name'], c['result'])
            for c in res['checks']] == [('data-mnist5k', 'PASS'),
                                        ('train-resnet32-registry', 'PASS')]
    note = res['checks'][1]['note']
    assert note.startswith('iter 2 on cpu, OptimWrapper, RepLResNet_CIFAR '
                           'sites [4, 8, 12]')
    run = work / 'runs' / 'train-resnet32-registry'
    assert (run / 'epoch_1.pth').is_file()
    p = json.loads(Path(probe_path(str(run), 'train')).read_text())
    assert p['iter'] == 2 and p['world_size'] == 1
    log = (work / 'logs' / 'train-resnet32-registry.log').read_text()
    assert 'train_dataloader.dataset.indices=16' in log  # 2 x batch 8
    assert 'Exp name' in log or 'Epoch(train)' in log
