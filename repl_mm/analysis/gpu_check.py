"""Library half of ``tools/gpu_check.py``: the acceptance checks a person
with GPUs runs from a clean clone, each a subprocess with its own log.

A :class:`Check` is a list of commands (run in order from the repository
root, stdout and stderr into ``<work_dir>/logs/<name>.log``), an optional
``prepare`` step (writes the check's config) and a ``verify`` step that
reads what the run left behind (checkpoints, metrics, the per-rank files
of :class:`~repl_mm.analysis.gpu_probe.GpuCheckProbe`) and raises if
anything is off. :func:`run_checks` runs them in order; a check whose
``needs`` did not pass is skipped, and one failure never stops the
others. :func:`build_checks` makes the real list:

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
import fnmatch
import glob
import json
import math
import os
import os.path as osp
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(ROOT, 'tools')
PASS, FAIL, SKIP = 'PASS', 'FAIL', 'SKIP'


class CheckFailed(Exception):
    """A check's outputs are not what the run should have left."""


def expect(condition: bool, message: str):
    """Raise :class:`CheckFailed` with ``message`` unless ``condition``."""
    if not condition:
        raise CheckFailed(message)


# -- what is checked -------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """One trained model of the checks.

    Args:
        repl (str): Its RepL config (registry route), from the repo root.
        e2e (str): The E2E twin (``mode='none'``), base of the hook route.
        task (str): ``cls``, ``det`` or ``seg``.
        data (str): Data set: ``mnist5k``, ``coco-shapes``,
            ``cityscapes-shapes``.
        loop (str): ``epoch`` or ``iter``: the config's training loop.
        batch (int): Samples per GPU and step on a GPU.
        cpu_batch (int): The same on the CPU (``--allow-cpu``).
        metric (str): What ``tools/test.py`` reports.
        label (str): Name in the outputs.
    """
    repl: str
    e2e: str
    task: str
    data: str
    loop: str
    batch: int
    cpu_batch: int
    metric: str
    label: str


MODELS: Dict[str, Model] = {
    'resnet32':
    Model('configs/demo/resnet32-repl_1xb64_15e_mnist5k.py',
          'configs/demo/resnet32-e2e_1xb64_15e_mnist5k.py', 'cls', 'mnist5k',
          'epoch', 64, 8, 'accuracy/top1', 'CIFAR ResNet-32'),
    'vit-tiny':
    Model('configs/demo/vit-tiny-p8-repl_1xb64_15e_mnist5k.py',
          'configs/demo/vit-tiny-p8-e2e_1xb64_15e_mnist5k.py', 'cls',
          'mnist5k', 'epoch', 64, 8, 'accuracy/top1', 'ViT-Tiny/8'),
    'retinanet':
    Model(
        'configs/shapes/retinanet_repl-r18_fpn_1xb8-scratch-adam-4e_coco-'
        'shapes.py',
        'configs/shapes/retinanet_e2e-r18_fpn_1xb8-scratch-adam-4e_coco-'
        'shapes.py', 'det', 'coco-shapes', 'epoch', 8, 2, 'coco/bbox_mAP',
        'RetinaNet-R18'),
    'deeplabv3':
    Model(
        'configs/shapes/deeplabv3_repl-r18-d8_1xb8-scratch-adam-200it_'
        'cityscapes-shapes.py',
        'configs/shapes/deeplabv3_e2e-r18-d8_1xb8-scratch-adam-200it_'
        'cityscapes-shapes.py', 'seg', 'cityscapes-shapes', 'iter', 8, 2,
        'mIoU', 'DeepLabV3-R18'),
}
ROUTES = ('registry', 'hook')
# The train split of make_datasets.py mnist5k (5,000 digits, 20% test).
MNIST5K_TRAIN = 4000
# The shapes sets as configs/shapes/README.md writes them (GPU); on the CPU
# just enough images for the iterations.
SHAPES_GPU = {'coco-shapes': (1000, 100), 'cityscapes-shapes': (500, 100)}
SHAPES_CPU_VAL = 8
CPU_VAL = 32  # images of the MNIST-5k test split validated on the CPU
DIST_BATCH = 16  # samples per GPU of the distributed checks
# upstream has no ResNet_CIFAR of He et al.'s depths (20, 32, 44, 56, 110):
# the hook route of a CIFAR ResNet-32 trains the stock ResNet_CIFAR-18 (as
# tests/test_tools/test_distributed.py does)
CIFAR_HOOK_BACKBONE = dict(
    type='ResNet_CIFAR',
    depth=18,
    num_stages=4,
    out_indices=(3, ),
    style='pytorch')
HE_DEPTHS = (20, 32, 44, 56, 110)
STOCK = {
    'RepLResNet': 'ResNet',
    'RepLResNetV1c': 'ResNetV1c',
    'RepLResNet_CIFAR': 'ResNet_CIFAR',
    'RepLVisionTransformer': 'VisionTransformer',
    'RepLSwinTransformer': 'SwinTransformer'
}
# benchmark suite case -> (batch on a GPU, batch on the CPU)
BENCH = {'resnet50': (64, 2), 'deit-s': (64, 2), 'retinanet-r50': (4, 1)}
BENCH_METHODS = ('e2e', 'repl', 'drop')
INFER_IMAGE = {'cls': (32, 32), 'det': (72, 96), 'seg': (64, 128)}


@dataclass
class Context:
    """Where and how the checks run.

    Args:
        work_dir (str): Data, configs, runs and logs go under it.
        gpus (int): Visible CUDA devices (0: the CPU, ``--allow-cpu``).
        iters (int): Training iterations of a run.
        timeout (float): Seconds a command may take. Defaults to 1800.
        python (str): Interpreter of the subprocesses.
    """
    work_dir: str
    gpus: int
    iters: int
    timeout: float = 1800.0
    python: str = sys.executable

    @property
    def cpu(self) -> bool:
        return self.gpus == 0

    @property
    def device(self) -> str:
        return 'cpu' if self.cpu else 'cuda'

    def path(self, *parts) -> str:
        return osp.join(osp.abspath(self.work_dir), *parts)

    def run_dir(self, check: str) -> str:
        return self.path('runs', check)

    def log_path(self, check: str) -> str:
        return self.path('logs', f'{check}.log')

    def data_dir(self, name: str) -> str:
        return self.path('data', name)

    def config_path(self, model: str, route: str) -> str:
        return self.path('configs', f'{model}-{route}.py')

    def batch(self, model: Model) -> int:
        return model.cpu_batch if self.cpu else model.batch


@dataclass
class Check:
    """One acceptance check (see the module doc).

    Args:
        name (str): Unique name (``--only``).
        description (str): One line for ``--list``.
        commands (list[list[str]] | callable): Run in order; any
            non-zero exit fails. A callable returning them is called when
            the check runs (after ``prepare``).
        verify (callable, optional): Reads the outputs; returns a short
            note, raises on a failure.
        needs (tuple[str]): Checks that must have passed first.
        skip (str, optional): Why the check does not apply here.
        prepare (callable, optional): Run before the commands (in this
            process), e.g. to write the check's config.
        env (callable, optional): Extra environment variables.
    """
    name: str
    description: str
    commands: Union[List[List[str]], Callable[[], List[List[str]]]] = \
        field(default_factory=list)
    verify: Optional[Callable[[], Optional[str]]] = None
    needs: tuple = ()
    skip: Optional[str] = None
    prepare: Optional[Callable[[], None]] = None
    env: Optional[Callable[[], dict]] = None


# -- configs of the runs ---------------------------------------------------
def _data_overrides(ctx: Context, model: Model, over: dict) -> List[str]:
    """Config lines pointing the model's datasets at the work dir (model
    overrides go into ``over``)."""
    root = ctx.data_dir(model.data) + '/'
    val = f', indices={CPU_VAL}' if ctx.cpu and model.data == 'mnist5k' \
        else ''
    lines = [
        f'train_dataloader = dict(batch_size={ctx.batch(model)}, '
        f'dataset=dict(data_root={root!r}))',
        f'val_dataloader = dict(dataset=dict(data_root={root!r}{val}))',
        f'test_dataloader = dict(dataset=dict(data_root={root!r}{val}))',
    ]
    if model.data == 'coco-shapes':
        ann = root + 'annotations/instances_val2017.json'
        lines += [
            f'val_evaluator = dict(ann_file={ann!r})',
            f'test_evaluator = dict(ann_file={ann!r})',
        ]
        # an untrained detector's scores are ~0.01: keep its boxes, so
        # that the COCO metric has detections to score
        over['test_cfg'] = dict(score_thr=0.0)
    return lines


def stock_backbone(backbone: dict) -> dict:
    """The stock upstream backbone dict of a RepL backbone dict (type
    mapped, ``replacement`` dropped), which ``ReplacementHook`` turns back
    into the RepL one. He et al.'s CIFAR depths have no upstream class:
    :data:`CIFAR_HOOK_BACKBONE` stands in.

    Raises:
        ValueError: If the type is not a RepL backbone.
    """
    backbone = dict(backbone)
    kind = str(backbone['type']).split('.')[-1]
    if kind not in STOCK:
        raise ValueError(f'backbone type {kind!r} has no stock upstream '
                         f'class; known: {sorted(STOCK)}')
    if kind == 'RepLResNet_CIFAR' and backbone.get('depth') in HE_DEPTHS:
        return dict(CIFAR_HOOK_BACKBONE)
    backbone.pop('replacement', None)
    backbone['type'] = STOCK[kind]
    return backbone


def config_text(ctx: Context, name: str, route: str) -> str:
    """The check config of model ``name`` and ``route``: the RepL config
    (registry) or the E2E twin with its stock backbone and
    ``ReplacementHook`` of the RepL config's options (hook), the data in
    the work dir, and :class:`~repl_mm.analysis.gpu_probe.GpuCheckProbe`.
    """
    from mmengine.config import Config
    model = MODELS[name]
    hooks = ["dict(type='GpuCheckProbe')"]
    over: dict = {}
    if route == 'registry':
        base = osp.join(ROOT, model.repl)
    elif route == 'hook':
        base = osp.join(ROOT, model.e2e)
        repl = Config.fromfile(osp.join(ROOT, model.repl)).model.backbone
        options = dict(repl.get('replacement') or {})
        stock = stock_backbone(Config.fromfile(base).model.backbone.to_dict())
        over['backbone'] = dict(stock, _delete_=True)
        if stock == CIFAR_HOOK_BACKBONE:
            over['head'] = dict(in_channels=512)
        kwargs = ''.join(f', {k}={v!r}' for k, v in options.items())
        hooks.insert(0, f"dict(type='ReplacementHook'{kwargs})")
    else:
        raise ValueError(f'route must be one of {ROUTES}, got {route!r}')
    lines = [
        f'# gpu_check: {model.label}, {route} route (written by '
        'tools/gpu_check.py)', f'_base_ = {base!r}',
        "custom_imports = dict(imports=['repl_mm', "
        "'repl_mm.analysis.gpu_probe'], allow_failed_imports=False)",
        f"custom_hooks = [{', '.join(hooks)}]"
    ] + _data_overrides(ctx, model, over)
    if over:
        lines.append(f'model = {over!r}')
    return '\n'.join(lines) + '\n'


def write_config(ctx: Context, name: str, route: str) -> str:
    """Write the check config of ``name`` and ``route``; return its path."""
    path = ctx.config_path(name, route)
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(config_text(ctx, name, route))
    return path


def schedule(ctx: Context,
             model: Model,
             iters: int,
             length: int = 1,
             world: int = 1,
             batch: Optional[int] = None) -> List[str]:
    """``--cfg-options`` for ``length`` runs of ``iters`` iterations each
    (an epoch-based config: ``length`` epochs of ``iters`` batches, the
    training set cut to ``iters x batch x world`` samples; an
    iteration-based one: ``length x iters`` iterations), validation and a
    checkpoint at the end.

    Raises:
        ValueError: If the training set is smaller than the cut.
    """
    batch = batch or ctx.batch(model)
    if model.loop == 'iter':
        total = iters * length
        return [
            f'train_cfg.max_iters={total}', f'train_cfg.val_interval={total}',
            f'default_hooks.checkpoint.interval={total}',
            'default_hooks.logger.interval=1'
        ]
    samples = iters * batch * world
    size = train_size(ctx, model)
    if samples > size:
        raise ValueError(
            f'--iters {iters}: {iters} x batch {batch} x {world} '
            f'process(es) = {samples} samples, but the {model.data} '
            f'training set has {size}')
    return [
        f'train_dataloader.dataset.indices={samples}',
        f'train_cfg.max_epochs={length}', f'train_cfg.val_interval={length}',
        'default_hooks.checkpoint.interval=1',
        'default_hooks.logger.interval=1'
    ]


def shapes_sizes(ctx: Context, data: str) -> tuple:
    """(train, val) images of a shapes set: the documented sizes on a GPU
    (more train images if ``--iters`` needs them), a few on the CPU."""
    need = ctx.iters * max(m.batch if not ctx.cpu else m.cpu_batch
                           for m in MODELS.values() if m.data == data)
    if ctx.cpu:
        return max(need, SHAPES_CPU_VAL), SHAPES_CPU_VAL
    train, val = SHAPES_GPU[data]
    return max(train, need), val


def train_size(ctx: Context, model: Model) -> int:
    if model.data == 'mnist5k':
        return MNIST5K_TRAIN
    return shapes_sizes(ctx, model.data)[0]


def checkpoint_name(model: Model, iters: int, length: int = 1) -> str:
    if model.loop == 'iter':
        return f'iter_{iters * length}.pth'
    return f'epoch_{length}.pth'


# -- verification ----------------------------------------------------------
def _probe(work: str, phase: str = 'train', rank: int = 0) -> dict:
    from .gpu_probe import read_probe
    try:
        return read_probe(work, phase, rank)
    except FileNotFoundError as e:
        raise CheckFailed(str(e)) from None


def verify_train(ctx: Context,
                 work: str,
                 iters: int,
                 ckpt: str,
                 amp: bool = False,
                 probe: Optional[dict] = None) -> str:
    """A training run ended where it should, on the right device, with
    RepL on, finite weights that training changed, and a checkpoint."""
    p = probe if probe is not None else _probe(work)
    expect(p['device'].split(':')[0] == ctx.device,
           f"parameters on {p['device']}, expected {ctx.device}")
    expect(p['iter'] == iters, f"ended at iteration {p['iter']}, expected "
           f'{iters}')
    expect(
        p['backbone'].startswith('RepL') and p['sites'],
        f"backbone {p['backbone']} with sites {p['sites']}: RepL is not "
        'on')
    expect(p['finite'], 'non-finite parameters')
    expect(p['loss'] is None or math.isfinite(p['loss']),
           f"last training loss {p['loss']}")
    expect(p['params_start'] != p['params_end'],
           'the parameters did not change during training')
    wrapper = 'AmpOptimWrapper' if amp and not ctx.cpu else None
    expect(wrapper is None or p['optim_wrapper'] == wrapper,
           f"optim wrapper {p['optim_wrapper']}, expected {wrapper}")
    expect(
        osp.isfile(osp.join(work, ckpt)), f'no checkpoint {ckpt} in '
        f'{work}')
    loss = '-' if p['loss'] is None else f"{p['loss']:.4g}"
    return (f"iter {p['iter']} on {p['device']}, {p['optim_wrapper']}, "
            f"{p['backbone']} sites {p['sites']}, loss {loss}")


def verify_resume(ctx: Context, work: str, source: str, iters: int, ckpt: str,
                  log: str, amp: bool) -> str:
    """The resumed run started from the source run's last weights and its
    iteration count, and went on to the end."""
    first, p = _probe(source), _probe(work)
    with open(log, errors='replace') as f:
        text = f.read()
    expect(
        f"resumed epoch: {first['epoch']}, iter: {first['iter']}" in text,
        f"the log does not say 'resumed epoch: {first['epoch']}, iter: "
        f"{first['iter']}'")
    expect(p['params_start'] == first['params_end'],
           "the resumed run did not start from the source run's weights")
    return verify_train(ctx, work, iters, ckpt, amp, probe=p)


def verify_metric(ctx: Context, work: str, metric: str) -> str:
    """``tools/test.py`` wrote a finite metric in [0, 100], on the device."""
    path = osp.join(work, 'metrics.json')
    expect(osp.isfile(path), f'no metrics file {path}')
    with open(path) as f:
        metrics = json.load(f)
    expect(metric in metrics, f'{metric} not in the metrics {metrics}')
    value = metrics[metric]
    expect(
        isinstance(value, (int, float)) and math.isfinite(value)
        and 0 <= value <= 100, f'{metric} = {value!r}')
    device = _probe(work, 'test')['device']
    expect(
        device.split(':')[0] == ctx.device,
        f'tested on {device}, expected {ctx.device}')
    return f'{metric} {value:.2f} on {device}'


def verify_infer(ctx: Context, work: str) -> str:
    path = osp.join(work, 'infer.json')
    expect(osp.isfile(path), f'no inferencer result {path}')
    with open(path) as f:
        out = json.load(f)
    expect(out['device'].split(':')[0] == ctx.device,
           f"inferencer model on {out['device']}, expected {ctx.device}")
    return f"{out['inferencer']} on {out['device']}: {out['summary']}"


def verify_dist(ctx: Context, work: str, world: int, iters: int,
                ckpt: str) -> str:
    """Every rank trained on its own GPU over NCCL with SyncBN, and all of
    them end with the same parameters."""
    probes = [_probe(work, 'train', r) for r in range(world)]
    for r, p in enumerate(probes):
        expect(p['world_size'] == world,
               f"rank {r}: world size {p['world_size']}, expected {world}")
        expect(p['backend'] == 'nccl', f"rank {r}: backend {p['backend']}")
        expect(p['syncbn'] > 0, f'rank {r}: no SyncBatchNorm layer')
        verify_train(ctx, work, iters, ckpt, probe=p)
    devices = [p['device'] for p in probes]
    expect(len(set(devices)) == world, f'ranks share devices: {devices}')
    digests = {p['params_end'] for p in probes}
    expect(
        len(digests) == 1, f'ranks end with different parameters: '
        f"{[p['params_end'][:12] for p in probes]}")
    return (f'{world} ranks on {", ".join(devices)}, '
            f"{probes[0]['syncbn']} SyncBN layers, equal parameters "
            f"(sha256 {probes[0]['params_end'][:12]})")


def verify_bench(ctx: Context, work: str) -> str:
    path = osp.join(work, 'benchmark.json')
    expect(osp.isfile(path), f'no benchmark result {path}')
    with open(path) as f:
        res = json.load(f)
    (case, ) = res['cases']
    expect(
        case.get('device', 'cpu').split(':')[0] == ctx.device,
        f"measured on {case.get('device', 'cpu')}, expected "
        f'{ctx.device}')
    ms = case['methods']
    expect(set(BENCH_METHODS) <= set(ms), f'methods {sorted(ms)}')
    for m in BENCH_METHODS:
        expect(ms[m]['time_ms']['median'] > 0 and ms[m]['peak_bytes'] > 0,
               f'{m}: no time or peak memory measured')
    r = ms['repl']
    return (f"repl x E2E: time {r['time_ratio']['median']:.3f}, peak "
            f"{r['peak_ratio']:.3f}, act. mem {r['mem_ratio']:.3f}")


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
                prepare=lambda d=folder: _fresh(ctx, d),
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


def select(checks: Sequence[Check], patterns: Sequence[str]) -> List[Check]:
    """The checks matching any of ``patterns`` (names or shell patterns,
    e.g. ``'train-*-hook'``) and those they need, in run order.

    Raises:
        ValueError: If a pattern matches no check (names the pattern).
    """
    if not patterns:
        return list(checks)
    by_name = {c.name: c for c in checks}
    chosen = set()
    for pat in patterns:
        hits = fnmatch.filter(by_name, pat)
        if not hits:
            raise ValueError(f'--only: {pat!r} matches no check; known: '
                             f'{", ".join(by_name)}')
        chosen.update(hits)
    todo = list(chosen)
    while todo:
        for need in by_name[todo.pop()].needs:
            if need not in chosen:
                chosen.add(need)
                todo.append(need)
    return [c for c in checks if c.name in chosen]


# -- running ---------------------------------------------------------------
def _fresh(ctx: Context, folder: str):
    """Remove ``folder`` (inside the work dir only) so that nothing of an
    earlier run can pass for this one's output."""
    root = ctx.path()
    if osp.commonpath([root, osp.abspath(folder)]) != root:
        raise ValueError(f'refusing to clear {folder}: outside the work '
                         f'dir {root}')
    if osp.isdir(folder):
        shutil.rmtree(folder)


def _command_env(check: Check) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, env.get('PYTHONPATH')) if p)
    # The profiler's backend (kineto) logs every start/stop; its USDT lines
    # (torch 2.14) sit above level 5 and go quiet only at 6.
    env.setdefault('KINETO_LOG_LEVEL', '6')
    if check.env is not None:
        env.update(check.env())
    return env


def run_check(check: Check, ctx: Context) -> dict:
    """Run one check; return ``name``, ``result`` (PASS / FAIL), ``seconds``,
    ``note`` and ``log``."""
    log_path = ctx.log_path(check.name)
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    t0 = time.perf_counter()
    result, note = PASS, ''
    with open(log_path, 'w') as log:
        try:
            _fresh(ctx, ctx.run_dir(check.name))
            os.makedirs(ctx.run_dir(check.name), exist_ok=True)
            if check.prepare is not None:
                check.prepare()
            commands = check.commands() if callable(
                check.commands) else check.commands
            env = _command_env(check)
            for i, cmd in enumerate(commands, 1):
                log.write(f'$ {subprocess.list2cmdline(cmd)}\n')
                log.flush()
                rc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=ctx.timeout).returncode
                if rc != 0:
                    raise CheckFailed(f'command {i} of {len(commands)} '
                                      f'exited with {rc}')
            if check.verify is not None:
                note = check.verify() or ''
        except subprocess.TimeoutExpired:
            result, note = FAIL, f'timed out after {ctx.timeout:g} s'
        except CheckFailed as e:
            result, note = FAIL, str(e)
        except Exception as e:  # a bug or a missing output: report it
            result, note = FAIL, f'{type(e).__name__}: {e}'
            log.write(traceback.format_exc())
        log.write(f'\n== {check.name}: {result} {note}\n')
    return dict(
        name=check.name,
        result=result,
        seconds=round(time.perf_counter() - t0, 1),
        note=note,
        log=log_path)


def run_checks(checks: Sequence[Check],
               ctx: Context,
               echo: Callable[[str], None] = print) -> List[dict]:
    """Run ``checks`` in order (module doc); one line each to ``echo``."""
    results: Dict[str, dict] = {}
    for i, check in enumerate(checks, 1):
        failed = [
            n for n in check.needs
            if n in results and results[n]['result'] != PASS
        ]
        missing = [n for n in check.needs if n not in results]
        if check.skip is not None:
            r = dict(
                name=check.name,
                result=SKIP,
                seconds=0.0,
                note=check.skip,
                log=None)
        elif failed or missing:
            why = ', '.join(f"{n} ({results[n]['result']})" for n in failed)
            why = why or ', '.join(f'{n} (not run)' for n in missing)
            r = dict(
                name=check.name,
                result=SKIP,
                seconds=0.0,
                note=f'needs {why}',
                log=None)
        else:
            echo(f'[{i}/{len(checks)}] {check.name} ...')
            r = run_check(check, ctx)
        results[check.name] = r
        echo(f"[{i}/{len(checks)}] {check.name}: {r['result']} "
             f"({r['seconds']:.1f} s) {r['note']}".rstrip())
    return list(results.values())


def exit_code(results: Sequence[dict]) -> int:
    """1 if any check failed, else 0."""
    return int(any(r['result'] == FAIL for r in results))


# -- outputs ---------------------------------------------------------------
def _cell(text) -> str:
    return str(text).replace('|', '/').replace('\n', ' ')


def format_table(results: Sequence[dict]) -> str:
    """The checks as a markdown table: check, result, seconds, note."""
    lines = ['| check | result | seconds | note |', '|---|---|---|---|']
    lines += [
        f"| {r['name']} | {r['result']} | {r['seconds']:.1f} | "
        f"{_cell(r['note'])} |" for r in results
    ]
    counts = {
        k: sum(r['result'] == k for r in results)
        for k in (PASS, FAIL, SKIP)
    }
    lines.append('')
    lines.append(', '.join(f'{v} {k}' for k, v in counts.items()))
    return '\n'.join(lines)


def benchmark_rows(ctx: Context, results: Sequence[dict]) -> List[dict]:
    """One row per case and method of the passed ``bench-*`` checks."""
    rows = []
    for r in results:
        if not r['name'].startswith('bench-') or r['result'] != PASS:
            continue
        with open(osp.join(ctx.run_dir(r['name']), 'benchmark.json')) as f:
            res = json.load(f)
        for case in res['cases']:
            for m, v in case['methods'].items():
                rows.append(
                    dict(
                        case=case['name'],
                        device=case.get('device', 'cpu'),
                        batch=case['batch_size'],
                        input=case['input_size'],
                        method=m,
                        step_ms=v['time_ms']['median'],
                        time_ratio=v['time_ratio'],
                        peak_mb=v['peak_bytes'] / 2**20,
                        peak_ratio=v['peak_ratio'],
                        act_mb=v['saved_bytes'] / 2**20,
                        mem_ratio=v['mem_ratio'],
                        S_time=v['S_time'],
                        S_mem=v['S_mem']))
    return rows


def format_benchmark(rows: Sequence[dict]) -> str:
    """The benchmark rows as a markdown table (ratios to E2E)."""
    if not rows:
        return '(no benchmark ran)'

    def f(v, spec='.3f'):
        return '-' if v is None else format(v, spec)

    lines = [
        '| case | device | batch | method | step (ms) | time x E2E [IQR] | '
        'peak (MB) | peak x E2E | act. mem (MB) | act. x E2E | S_time | '
        'S_mem |', '|---' * 12 + '|'
    ]
    for r in rows:
        t = r['time_ratio']
        h, w = r['input']
        lines.append(
            f"| {r['case']} | {r['device']} | {r['batch']} x {h}x{w} | "
            f"{r['method']} | {r['step_ms']:.1f} | {t['median']:.3f} "
            f"[{t['q1']:.3f}, {t['q3']:.3f}] | {r['peak_mb']:.0f} | "
            f"{r['peak_ratio']:.3f} | {r['act_mb']:.0f} | "
            f"{r['mem_ratio']:.3f} | {f(r['S_time'])} | {f(r['S_mem'])} |")
    return '\n'.join(lines)


def write_result(path: str, meta: dict, results: Sequence[dict],
                 rows: Sequence[dict]) -> str:
    """Write both tables (structured and as markdown) to ``path``."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    out = dict(
        meta=meta,
        passed=not exit_code(results),
        checks=list(results),
        benchmark=list(rows),
        table=format_table(results),
        benchmark_table=format_benchmark(rows))
    with open(path, 'w') as f:
        json.dump(out, f, indent=1)
    return path


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
    'Check', 'CheckFailed', 'Context', 'MODELS', 'build_checks', 'check_names',
    'select', 'run_check', 'run_checks', 'exit_code', 'format_table',
    'benchmark_rows', 'format_benchmark', 'write_result', 'config_text',
    'write_config', 'schedule', 'stock_backbone', 'verify_train',
    'verify_dist', 'run_inferencer'
]

if __name__ == '__main__':
    _main()
