"""Library half of ``tools/gpu_check.py``: the acceptance checks a person
with GPUs runs from a clean clone, each a subprocess with its own log.

This module is the entry: the list of checks (:func:`build_checks`) and
the inferencer step they run (``python -m repl_mm.analysis.gpu_check
infer``, :func:`run_inferencer`); it re-exports the names the tool and the
tests use from the modules it is split into, by concern:

- :mod:`.gpu_check_configs`: the models (:data:`MODELS`), the work dir
  (:class:`Context`), the configs and schedules of the runs;
- :mod:`.gpu_check_runner`: :class:`Check`, :func:`select`, running the
  checks (:func:`run_checks`: in order, a check whose ``needs`` did not
  pass is skipped, one failure never stops the others);
- :mod:`.gpu_check_verify`: what each check reads back from its run
  (checkpoints, metrics, the per-rank files of
  :class:`~repl_mm.analysis.gpu_probe.GpuCheckProbe`);
- :mod:`.gpu_check_report`: the tables and the result JSON.

:func:`build_checks` makes the real list:

- ``data-*``: the bundled MNIST-5k and the synthetic shapes sets, written
  by ``tools/dataset_converters/make_datasets.py`` under the work dir;
- ``train-<model>-<route>[-amp]``: ``tools/train.py`` for ``--iters``
  iterations of CIFAR ResNet-32 and ViT-Tiny/8 (MNIST-5k), RetinaNet-R18
  and DeepLabV3-R18 (shapes), by the registry route (the RepL config) and
  the hook route (the E2E twin's config with the stock upstream backbone
  and ``ReplacementHook``), with and without ``--amp``;
- ``resume-resnet32``: ``--resume`` of a ResNet-32 run for one more epoch;
- ``test-<model>``: ``tools/test.py`` on a trained checkpoint;
- ``infer-<model>``: ``publish_model.py``, then the upstream inferencer on
  the device (``python -m repl_mm.analysis.gpu_check infer ...``);
- ``dist-resnet32-<route>``: ``tools/dist_train.sh`` on every GPU (2+)
  with SyncBN, every rank's parameters compared by digest;
- ``bench-<case>``: ``tools/analysis/benchmark.py --device`` for E2E /
  RepL / drop.

Only the standard library, torch and mmengine are imported at module
level; the inferencer driver imports its codebase.
"""
import argparse
import glob
import json
import os
import os.path as osp
import socket
from typing import List

from .gpu_check_configs import (BENCH, BENCH_METHODS, CIFAR_HOOK_BACKBONE,
                                DIST_BATCH, MNIST5K_TRAIN, MODELS, ROUTES,
                                TOOLS, Context, checkpoint_name, config_text,
                                schedule, shapes_sizes, stock_backbone,
                                write_config)
from .gpu_check_report import (benchmark_rows, format_benchmark, format_table,
                               write_result)
from .gpu_check_runner import (Check, CheckFailed, clear_folder, exit_code,
                               expect, run_check, run_checks, select)
from .gpu_check_verify import (verify_bench, verify_dist, verify_infer,
                               verify_metric, verify_resume, verify_train)

INFER_IMAGE = {'cls': (32, 32), 'det': (72, 96), 'seg': (64, 128)}


# -- the checks ------------------------------------------------------------
def _tool(ctx: Context, *parts) -> List[str]:
    return [ctx.python, osp.join(TOOLS, *parts)]


def data_checks(ctx: Context) -> List[Check]:
    out = []
    for data in ('mnist5k', 'coco-shapes', 'cityscapes-shapes'):
        cmd = _tool(ctx, 'dataset_converters', 'make_datasets.py') + [
            data, '--out', ctx.data_dir(data)
        ]
        if data != 'mnist5k':
            train, val = shapes_sizes(ctx, data)
            cmd += ['--num-train', str(train), '--num-val', str(val)]
            if data == 'coco-shapes':  # configs/shapes/README.md's size
                cmd += ['--height', '72', '--width', '96']
        folder = ctx.data_dir(data)
        out.append(
            Check(
                f'data-{data}',
                f'write {data} with make_datasets.py', [cmd],
                prepare=lambda d=folder: clear_folder(ctx, d),
                verify=lambda d=folder: _verify_data(d)))
    return out


def _verify_data(folder: str) -> str:
    n = sum(len(files) for _, _, files in os.walk(folder))
    expect(n > 0, f'nothing written to {folder}')
    return f'{n} files in {folder}'


def train_check(ctx: Context,
                name: str,
                route: str,
                amp: bool,
                compiled: bool = False) -> Check:
    model = MODELS[name]
    check = f'train-{name}-{route}' + ('-amp' if amp else
                                       '') + ('-compile' if compiled else '')
    work = ctx.run_dir(check)
    cfg = ctx.config_path(name, route)
    ckpt = checkpoint_name(model, ctx.iters)
    what = ('RepL config' if route == 'registry' else
            'E2E twin + stock backbone + ReplacementHook')
    if name == 'resnet32' and route == 'hook':
        what += ' (stock ResNet_CIFAR-18: upstream has no depth 32)'
    skip = None
    if amp and ctx.cpu:
        skip = 'fp16 AMP needs CUDA'
    elif compiled and ctx.cpu:
        skip = ('inductor takes minutes per network on a CPU (the test '
                'suite compiles every RepL path there)')

    def commands():
        return [
            _tool(ctx, 'train.py') + [cfg, '--work-dir', work] +
            (['--amp'] if amp else []) + ['--cfg-options'] +
            schedule(ctx, model, ctx.iters) +
            (['compile=True'] if compiled else [])
        ]

    return Check(
        check,
        f'{model.label}, {what}, {ctx.iters} iterations' +
        (', --amp (fp16)' if amp else '') +
        (", compile=True (mmengine's torch.compile of train_step, "
         'inductor)' if compiled else ''),
        commands,
        verify=lambda: verify_train(ctx, work, ctx.iters, ckpt, amp),
        needs=(f'data-{model.data}', ),
        skip=skip,
        prepare=lambda: write_config(ctx, name, route))


def resume_check(ctx: Context) -> Check:
    model = MODELS['resnet32']
    amp = not ctx.cpu  # the AMP run's loss-scaler state too
    source = 'train-resnet32-registry' + ('-amp' if amp else '')
    work = ctx.run_dir('resume-resnet32')
    src = ctx.run_dir(source)

    def commands():
        return [
            _tool(ctx, 'train.py') + [
                ctx.config_path('resnet32', 'registry'), '--work-dir', work,
                '--resume',
                osp.join(src, checkpoint_name(model, ctx.iters))
            ] + (['--amp'] if amp else []) + ['--cfg-options'] +
            schedule(ctx, model, ctx.iters, length=2)
        ]

    return Check(
        'resume-resnet32', f'--resume {source} for one more epoch '
        f'({ctx.iters} iterations)',
        commands,
        verify=lambda: verify_resume(ctx, work, src, 2 * ctx.iters,
                                     checkpoint_name(model, ctx.iters, 2),
                                     ctx.log_path('resume-resnet32'), amp),
        needs=(source, ))


def test_check(ctx: Context, name: str) -> Check:
    model = MODELS[name]
    source = f'train-{name}-registry'
    work = ctx.run_dir(f'test-{name}')
    ckpt = osp.join(ctx.run_dir(source), checkpoint_name(model, ctx.iters))
    cmd = _tool(ctx, 'test.py') + [
        ctx.config_path(name, 'registry'), ckpt, '--work-dir', work, '--out',
        osp.join(work, 'metrics.json')
    ]
    return Check(
        f'test-{name}', f'tools/test.py on the {source} checkpoint '
        f'({model.metric})', [cmd],
        verify=lambda: verify_metric(ctx, work, model.metric),
        needs=(source, ))


def infer_check(ctx: Context, name: str) -> Check:
    model = MODELS[name]
    source = f'train-{name}-registry'
    work = ctx.run_dir(f'infer-{name}')
    ckpt = osp.join(ctx.run_dir(source), checkpoint_name(model, ctx.iters))
    cmds = [
        _tool(ctx, 'model_converters', 'publish_model.py') +
        [ckpt, osp.join(work, 'model.pth')],
        [
            ctx.python, '-m', 'repl_mm.analysis.gpu_check', 'infer',
            model.task, work, '--device', ctx.device, '--out',
            osp.join(work, 'infer.json')
        ],
    ]
    kind = dict(
        cls='ImageClassificationInferencer',
        det='DetInferencer',
        seg='MMSegInferencer')[model.task]
    return Check(
        f'infer-{name}', f'publish_model.py, then {kind} on '
        f'{ctx.device}',
        cmds,
        verify=lambda: verify_infer(ctx, work),
        needs=(source, ))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def dist_check(ctx: Context, route: str, recompute: bool = True) -> Check:
    """``recompute=False``: the same run with the sites' recompute off,
    whose seconds beside the default run's show what re-running each
    site's SyncBN forward in backward (one more all-gather per site and
    step) costs."""
    model = MODELS['resnet32']
    check = f'dist-resnet32-{route}' + ('' if recompute else '-norecompute')
    work = ctx.run_dir(check)
    world = ctx.gpus
    iters = max(1, min(ctx.iters,
                       MNIST5K_TRAIN // (DIST_BATCH * max(world, 1))))
    skip = None
    if ctx.cpu:
        skip = 'no distributed run on the CPU (--allow-cpu)'
    elif world < 2:
        skip = f'needs 2+ CUDA devices, found {world}'

    def commands():
        return [[
            'bash',
            osp.join(TOOLS, 'dist_train.sh'),
            ctx.config_path('resnet32', route),
            str(world), '--work-dir', work, '--cfg-options',
            'model.backbone.norm_cfg.type=SyncBN',
            f'train_dataloader.batch_size={DIST_BATCH}'
        ] + ([] if recompute else
             ['model.backbone.replacement.recompute=False']) +
                schedule(ctx, model, iters, world=world, batch=DIST_BATCH)]

    return Check(
        check,
        f'tools/dist_train.sh on every GPU (NCCL, SyncBN), '
        f'{route} route' + ('' if recompute else ', recompute=False') +
        ', ranks compared by parameter digest',
        commands,
        verify=lambda: verify_dist(ctx, work, world, iters,
                                   checkpoint_name(model, iters)),
        needs=('data-mnist5k', ),
        skip=skip,
        prepare=lambda: write_config(ctx, 'resnet32', route),
        env=lambda: dict(PYTHON=ctx.python, PORT=str(free_port())))


def bench_check(ctx: Context, case: str) -> Check:
    work = ctx.run_dir(f'bench-{case}')
    batch = BENCH[case][1 if ctx.cpu else 0]
    cmd = _tool(ctx, 'analysis', 'benchmark.py') + [
        '--suite', case, '--methods', *BENCH_METHODS, '--batch-size',
        str(batch), '--repeats', '2' if ctx.cpu else '10', '--warmup',
        '0' if ctx.cpu else '3', '--device', ctx.device, '--out-dir', work
    ]
    if ctx.cpu:
        cmd.append('--quick')
    return Check(
        f'bench-{case}', f'benchmark.py --suite {case}, batch '
        f'{batch}, E2E / RepL / drop on {ctx.device}', [cmd],
        verify=lambda: verify_bench(ctx, work))


def build_checks(ctx: Context) -> List[Check]:
    """Every check, in the order they run (module doc)."""
    checks = data_checks(ctx)
    for name in MODELS:
        for route in ROUTES:
            for amp in (False, True):
                checks.append(train_check(ctx, name, route, amp))
    checks += [
        train_check(ctx, name, 'registry', False, compiled=True)
        for name in MODELS
    ]
    checks.append(resume_check(ctx))
    for name in ('resnet32', 'retinanet', 'deeplabv3'):
        checks.append(test_check(ctx, name))
    for name in ('resnet32', 'retinanet', 'deeplabv3'):
        checks.append(infer_check(ctx, name))
    checks += [dist_check(ctx, route) for route in ROUTES]
    checks.append(dist_check(ctx, 'registry', recompute=False))
    checks += [bench_check(ctx, case) for case in BENCH]
    return checks


def check_names() -> List[str]:
    """The names of :func:`build_checks`, whatever the machine."""
    return [c.name for c in build_checks(Context('.', gpus=0, iters=1))]


# -- the inferencer step (python -m repl_mm.analysis.gpu_check infer) ------
def run_inferencer(task: str, folder: str, device: str) -> dict:
    """The upstream inferencer of ``task`` on the published model in
    ``folder`` (``*.pth`` and its ``.py`` from ``publish_model.py``), on
    ``device``, for one random image; checks the prediction's form."""
    import numpy as np

    import repl_mm  # noqa: F401  (the RepL backbones)
    weights = sorted(glob.glob(osp.join(folder, '*.pth')))
    expect(
        len(weights) == 1, f'expected one published .pth in {folder}, '
        f'found {weights}')
    weights = weights[0]
    config = weights[:-len('.pth')] + '.py'
    expect(osp.isfile(config), f'no config {config} beside the weights')
    h, w = INFER_IMAGE[task]
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)
    if task == 'cls':
        from mmpretrain import ImageClassificationInferencer
        inferencer = ImageClassificationInferencer(
            model=config, pretrained=weights, device=device)
        pred = inferencer(img)[0]
        expect(0 <= pred['pred_label'] < 10, f'prediction {pred}')
        summary = f"label {pred['pred_label']} ({pred['pred_score']:.3f})"
    elif task == 'det':
        from mmdet.apis import DetInferencer
        inferencer = DetInferencer(
            model=config, weights=weights, device=device, show_progress=False)
        pred = inferencer(img, return_vis=False)['predictions'][0]
        boxes = np.asarray(pred['bboxes']).reshape(-1, 4)
        expect(
            len(boxes) == len(pred['labels']) == len(pred['scores']),
            'boxes, labels and scores differ in number')
        expect(set(pred['labels']) <= {0, 1, 2}, f"labels {pred['labels']}")
        summary = f'{len(boxes)} boxes'
    elif task == 'seg':
        from mmseg.apis import MMSegInferencer
        inferencer = MMSegInferencer(
            model=config, weights=weights, device=device)
        pred = np.asarray(inferencer(img, return_vis=False)['predictions'])
        expect(pred.shape == (h, w), f'label map {pred.shape}, expected '
               f'{(h, w)}')
        summary = f'label map {h}x{w}, classes {np.unique(pred).tolist()}'
    else:
        raise ValueError(f'task must be cls, det or seg, got {task!r}')
    param = next(inferencer.model.parameters())
    return dict(
        inferencer=type(inferencer).__name__,
        device=str(param.device),
        weights=weights,
        summary=summary)


def _main(argv=None):
    parser = argparse.ArgumentParser(
        description='gpu_check step: the upstream inferencer on a '
        'published model')
    sub = parser.add_subparsers(dest='step', required=True)
    infer = sub.add_parser('infer')
    infer.add_argument('task', choices=['cls', 'det', 'seg'])
    infer.add_argument('folder', help='holds the published .pth and .py')
    infer.add_argument('--device', default='cpu')
    infer.add_argument('--out', required=True, help='result JSON')
    args = parser.parse_args(argv)
    out = run_inferencer(args.task, args.folder, args.device)
    with open(args.out, 'w') as f:
        json.dump(out, f, indent=1)
    from mmengine.logging import print_log
    print_log(json.dumps(out), logger='current')


__all__ = [
    'Check', 'CheckFailed', 'Context', 'MODELS', 'ROUTES',
    'CIFAR_HOOK_BACKBONE', 'build_checks', 'check_names', 'select',
    'run_check', 'run_checks', 'exit_code', 'expect', 'format_table',
    'benchmark_rows', 'format_benchmark', 'write_result', 'config_text',
    'write_config', 'schedule', 'shapes_sizes', 'stock_backbone',
    'verify_train', 'verify_dist', 'verify_bench', 'run_inferencer'
]

if __name__ == '__main__':
    _main()
