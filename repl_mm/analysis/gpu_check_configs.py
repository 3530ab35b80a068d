"""What ``tools/gpu_check.py`` trains and where: the models of the checks
(:data:`MODELS`), the work dir and machine of a run (:class:`Context`), and
the configs and schedules of the runs (:func:`config_text`,
:func:`schedule`).

A check's config is the model's RepL config (the registry route) or its
E2E twin with the stock upstream backbone and ``ReplacementHook`` of the
RepL config's options (the hook route), with the data sets in the work dir
and :class:`~repl_mm.analysis.gpu_probe.GpuCheckProbe`; the schedule cuts
an epoch-based run's training set or an iteration-based run's iterations
to ``--iters``.

Only the standard library is imported at module level; mmengine when a
config is written.
"""
import os
import os.path as osp
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(ROOT, 'tools')


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


__all__ = [
    'ROOT', 'TOOLS', 'Model', 'MODELS', 'ROUTES', 'MNIST5K_TRAIN',
    'DIST_BATCH', 'CIFAR_HOOK_BACKBONE', 'BENCH', 'BENCH_METHODS', 'Context',
    'stock_backbone', 'config_text', 'write_config', 'schedule',
    'shapes_sizes', 'train_size', 'checkpoint_name'
]
