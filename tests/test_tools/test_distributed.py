"""2-process training on this CPU (gloo) through tools/dist_train.sh, both
routes (registry backbone, ReplacementHook): no unused-parameter errors
without find_unused_parameters, and both ranks end with identical weights
(DDP keeps the replicas in step); each rank's random state saved and
restored on resume."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from repl_mm.utils.compat import torch_version

ROOT = Path(__file__).resolve().parents[2]

DUMPER = '''
import os
import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpRankWeights(Hook):
    def after_run(self, runner):
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        assert is_model_wrapper(runner.model), 'not distributed'
        # parameters only: BN running statistics are per rank (mmengine's
        # DDP has broadcast_buffers=False; SyncBN is a GPU option)
        params = {k: v.detach() for k, v in model.named_parameters()}
        torch.save(params, os.path.join(
            runner.work_dir, f"rank{os.environ['RANK']}.pth"))
'''

CLS = '''
_base_ = '{root}/configs/demo/resnet32-repl_1xb64_15e_mnist5k.py'
custom_imports = dict(imports=['repl_mm', 'dumper'])
model = dict(backbone=dict(depth=20))
train_dataloader = dict(batch_size=8, dataset=dict(data_root='{data}'))
val_dataloader = dict(dataset=dict(data_root='{data}'))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=1, val_interval=1)
custom_hooks = [dict(type='DumpRankWeights')]
'''

# the unmodified upstream backbone, RepL switched on by the hook
CLS_HOOK = CLS + '''
model = dict(
    backbone=dict(_delete_=True, type='ResNet_CIFAR', depth=18),
    head=dict(in_channels=512))
custom_hooks = [dict(type='ReplacementHook', interval=4),
                dict(type='DumpRankWeights')]
'''


def cls_data(tmp_path):
    from repl_mm.datasets import synthetic_images, write_cifar
    from repl_mm.datasets.writers import split_train_test
    data = tmp_path / 'data'
    imgs, labels, classes = synthetic_images(num_per_class=4)
    split = split_train_test(imgs, labels, 0.25, seed=0)
    write_cifar(str(data), split['train'], split['test'], classes=classes)
    return data


def dist_run(tmp_path, port, *args):
    """``bash tools/dist_*.sh args`` with the venv's Python, one thread a
    process, and ``tmp_path`` importable (the dumper hook)."""
    env = {
        **os.environ, 'PYTHON': sys.executable,
        'PORT': str(port),
        'PYTHONPATH': str(tmp_path),
        'OMP_NUM_THREADS': '1'
    }
    out = subprocess.run(['bash', *map(str, args)],
                         cwd=ROOT,
                         env=env,
                         capture_output=True,
                         text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


def dist_train(tmp_path, cfg, port):
    """``tools/dist_train.sh cfg 2``; returns the work dir holding each
    rank's parameters (``DumpRankWeights``)."""
    (tmp_path / 'dumper.py').write_text(textwrap.dedent(DUMPER))
    work = tmp_path / 'work'
    dist_run(tmp_path, port, 'tools/dist_train.sh', cfg, 2, '--work-dir', work)
    return work


def assert_ranks_identical(work):
    r0 = torch.load(work / 'rank0.pth', weights_only=True)
    r1 = torch.load(work / 'rank1.pth', weights_only=True)
    assert list(r0) == list(r1)
    assert any('phi' in k for k in r0)  # RepL sites were trained
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


# mmengine's ``compile`` key: the DDP-wrapped train_step compiled (the
# aot_eager backend: dynamo and AOTAutograd, which RepL must get through,
# without inductor's code generation, minutes on this CPU)
CLS_COMPILE = CLS + '''
compile = dict(backend='aot_eager')
'''


@pytest.mark.parametrize('route,cfg,port', [
    ('registry', CLS, 29611),
    ('hook', CLS_HOOK, 29612),
    pytest.param(
        'registry-compile',
        CLS_COMPILE,
        29613,
        marks=pytest.mark.skipif(
            torch_version() < (2, 2),
            reason="mmengine's compile=True fails on torch 2.1 in "
            "mmpretrain's data preprocessor (dynamo cannot trace "
            'stack_batch), before any backbone runs')),
])
def test_two_process_classification(tmp_path, route, cfg, port):
    path = tmp_path / 'cfg.py'
    path.write_text(cfg.format(root=ROOT, data=cls_data(tmp_path)))
    work = dist_train(tmp_path, path, port)
    assert_ranks_identical(work)
    if route.endswith('compile'):
        log = next(work.rglob('*.log')).read_text()
        assert 'Model has been "compiled"' in log
    if route == 'registry':  # and evaluate on 2 processes
        dist_run(tmp_path, port, 'tools/dist_test.sh', path,
                 work / 'epoch_1.pth', 2, '--work-dir', tmp_path / 'test',
                 '--out', tmp_path / 'm.json')
        assert 'accuracy/top1' in (tmp_path / 'm.json').read_text()


# Detection and segmentation: the tiny user configs of the det/seg
# pipeline test; the hook route puts the stock backbone back.
STOCK = {
    'retinanet':
    "dict(_delete_=True, type='ResNet', depth=18, "
    "num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1, "
    "norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, "
    "style='pytorch')",
    'deeplabv3plus':
    "dict(_delete_=True, type='ResNetV1c', depth=18, "
    "num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4), "
    "strides=(1, 2, 1, 1), norm_cfg=dict(type='BN', requires_grad=True), "
    "norm_eval=False, style='pytorch', contract_dilation=True)",
}


@pytest.mark.parametrize('name', sorted(STOCK))
@pytest.mark.parametrize('route', ['registry', 'hook'])
def test_two_process_detection_segmentation(tmp_path, name, route):
    from repl_mm.datasets import make_cityscapes_shapes, make_coco_shapes
    from .test_det_seg_pipeline import tiny_config
    data = tmp_path / 'data'
    make = make_coco_shapes if name == 'retinanet' else make_cityscapes_shapes
    make(str(data), num_train=4, num_val=2)
    base = tiny_config(name, tmp_path / 'base', {name: data}, 2)
    hooks = "dict(type='DumpRankWeights')"
    text = f"_base_ = '{base}'\n" \
        "custom_imports = dict(imports=['repl_mm', 'dumper'])\n"
    if route == 'hook':
        text += f'model = dict(backbone={STOCK[name]})\n'
        hooks = "dict(type='ReplacementHook', interval=4), " + hooks
    text += f'custom_hooks = [{hooks}]\n'
    path = tmp_path / 'cfg.py'
    path.write_text(text)
    port = 29620 + 2 * sorted(STOCK).index(name) + (route == 'hook')
    assert_ranks_identical(dist_train(tmp_path, path, port))


PROBE = '''
import os
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from repl_mm.engine.hooks.rng_state_hook import get_rng_state


@HOOKS.register_module()
class DumpRankRNG(Hook):
    priority = 'HIGHEST'  # the state as train() leaves it after resuming

    def before_train(self, runner):
        torch.save(get_rng_state(), os.path.join(
            runner.work_dir, f"rng{os.environ.get('RANK', '0')}.pth"))
'''

# one random stream per rank; no fixed seed (mmdet's and mmseg's default:
# mmengine's resume then re-seeds after loading)
CLS_RNG = CLS.replace("'dumper'", "'probe'") + '''
randomness = dict(seed=None, diff_rank_seed=True)
custom_hooks = [dict(type='DumpRankRNG')]
'''


def assert_same_rng_state(got, want):
    assert torch.equal(got['torch'], want['torch'])
    assert got['numpy']['state'] == want['numpy']['state']
    assert list(got['python'][1]) == list(want['python'][1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_rng_state_per_rank(tmp_path):
    """Each rank saves its own random state and restores it on resume; a
    resume on one process restores rank 0's and says the rest are unused.
    """
    from .test_cls_pipeline import load
    port = free_port()
    (tmp_path / 'probe.py').write_text(textwrap.dedent(PROBE))
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(CLS_RNG.format(root=ROOT, data=cls_data(tmp_path)))
    work = tmp_path / 'work'
    dist_run(tmp_path, port, 'tools/dist_train.sh', cfg, 2, '--work-dir', work)
    states = load(work / 'epoch_1.pth')['rng_state']
    assert isinstance(states, list) and len(states) == 2
    assert not torch.equal(states[0]['torch'], states[1]['torch'])
    assert states[0]['numpy'] != states[1]['numpy']

    resume = ('--resume', work / 'epoch_1.pth', '--cfg-options',
              'train_cfg.max_epochs=2')
    two = tmp_path / 'two'
    dist_run(tmp_path, port, 'tools/dist_train.sh', cfg, 2, '--work-dir', two,
             *resume)
    for rank in range(2):
        assert_same_rng_state(
            torch.load(two / f'rng{rank}.pth', weights_only=True),
            states[rank])

    one = tmp_path / 'one'
    env = {**os.environ, 'PYTHONPATH': str(tmp_path), 'OMP_NUM_THREADS': '1'}
    env = {
        k: v
        for k, v in env.items()
        if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')
    }
    out = subprocess.run([
        sys.executable, 'tools/train.py',
        str(cfg), '--work-dir',
        str(one), *map(str, resume)
    ],
                         cwd=ROOT,
                         env=env,
                         capture_output=True,
                         text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert_same_rng_state(
        torch.load(one / 'rng0.pth', weights_only=True), states[0])
    log = next(one.rglob('*.log')).read_text()
    assert 'the state of rank 1 is unused' in log
