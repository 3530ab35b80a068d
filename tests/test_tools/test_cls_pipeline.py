"""Classification end to end through the tools, as a user runs them:
train -> test from the checkpoint, exact kill-and-resume, publish ->
weights_only load -> test and inferencer, AMP and EMA."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CFG = 'configs/demo/resnet32-repl_1xb64_15e_mnist5k.py'


def run(*args, env=None, check=True):
    out = subprocess.run([sys.executable, *args],
                         cwd=ROOT,
                         env=env,
                         capture_output=True,
                         text=True,
                         timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f'{args} failed:\n{out.stderr[-4000:]}')
    return out


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data') / 'syn'
    run('tools/dataset_converters/make_datasets.py', 'synthetic-cifar',
        '--out', str(root), '--num-per-class', '8')
    return root


def tiny_config(folder, data, epochs=2, extra=''):
    """A user's config: the demo config, shrunk to seconds on this CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'tiny.py'
    path.write_text(
        textwrap.dedent(f"""
        _base_ = '{ROOT / CFG}'
        model = dict(backbone=dict(depth=20))
        # random augmentation on, to test the RNG state across a resume
        train_pipeline = [
            dict(type='RandomCrop', crop_size=32, padding=4),
            dict(type='RandomFlip', prob=0.5),
            dict(type='PackInputs'),
        ]
        train_dataloader = dict(
            batch_size=16,
            dataset=dict(data_root='{data}', pipeline=train_pipeline))
        val_dataloader = dict(dataset=dict(data_root='{data}'))
        test_dataloader = val_dataloader
        train_cfg = dict(max_epochs={epochs}, val_interval=1)
        default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=5))
    """) + textwrap.dedent(extra))
    return str(path)


def load(path):
    from repl_mm.engine import load_mmengine_checkpoint
    return load_mmengine_checkpoint(path)


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    work = tmp_path_factory.mktemp('work') / 'r20'
    cfg = tiny_config(work.parent / 'cfg', data, epochs=3)
    run('tools/train.py', cfg, '--work-dir', str(work))
    return work


def test_train_then_test_reports_top1(trained, data, tmp_path):
    ckpt = load(trained / 'epoch_3.pth')
    assert 'rng_state' in ckpt and ckpt['meta']['epoch'] == 3
    sd = ckpt['state_dict']
    assert 'backbone.replacement_plan' in sd
    assert 'backbone.layer2.1.phi2_prev' in sd  # site 5 of ResNet-20
    out = tmp_path / 'metrics.json'
    run('tools/test.py', tiny_config(tmp_path, data),
        str(trained / 'epoch_3.pth'), '--work-dir', str(tmp_path), '--out',
        str(out))
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics['accuracy/top1'] <= 100.0


KILLER = '''
import os, signal
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillAfterEpoch(Hook):
    priority = 'LOWEST'  # after CheckpointHook has saved

    def __init__(self, epoch):
        self.epoch = epoch

    def after_train_epoch(self, runner):
        if runner.epoch + 1 == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def test_kill_and_resume_is_exact(trained, data, tmp_path):
    (tmp_path / 'killer.py').write_text(textwrap.dedent(KILLER))
    env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
    work = tmp_path / 'killed'
    killed = tiny_config(
        tmp_path / 'killed_cfg',
        data,
        epochs=3,
        extra='''
        custom_imports = dict(imports=['repl_mm', 'killer'])
        custom_hooks = [dict(type='KillAfterEpoch', epoch=2)]
    ''')
    out = run(
        'tools/train.py',
        killed,
        '--work-dir',
        str(work),
        env=env,
        check=False)
    assert out.returncode == -9, out.stderr[-2000:]  # SIGKILLed
    assert (work / 'epoch_2.pth').exists()
    assert not (work / 'epoch_3.pth').exists()
    run('tools/train.py', tiny_config(tmp_path, data, epochs=3), '--work-dir',
        str(work), '--resume')
    resumed = load(work / 'epoch_3.pth')['state_dict']
    straight = load(trained / 'epoch_3.pth')['state_dict']
    assert list(resumed) == list(straight)
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k


def test_publish_loads_weights_only_and_infers(trained, data, tmp_path):
    out = run('tools/model_converters/publish_model.py',
              str(trained / 'epoch_3.pth'), str(tmp_path / 'r20.pth'))
    published = Path(out.stdout.strip().splitlines()[-1])
    assert published.name.startswith('r20-') and published.exists()
    ckpt = torch.load(published, weights_only=True)  # no allow-list
    assert set(ckpt) == {'state_dict', 'meta'}
    plan = ckpt['meta']['replacement_plans']['backbone']
    assert plan['indices'] == [5, 8]  # ResNet-20: 4 shifts to 5
    metrics = tmp_path / 'm.json'
    cfg = tiny_config(tmp_path, data)
    run('tools/test.py', cfg, str(published), '--work-dir', str(tmp_path),
        '--out', str(metrics))
    assert 'accuracy/top1' in json.loads(metrics.read_text())

    import numpy as np
    from mmpretrain import ImageClassificationInferencer
    inferencer = ImageClassificationInferencer(
        model=cfg, pretrained=str(published), device='cpu')
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    result = inferencer(img)[0]
    assert 0 <= result['pred_label'] < 10
    assert result['pred_class'] == f"class_{result['pred_label']}"


def test_amp_and_ema_train(data, tmp_path):
    work = tmp_path / 'amp'
    cfg = tiny_config(
        tmp_path,
        data,
        epochs=1,
        extra='''
        custom_hooks = [dict(type='EMAHook', momentum=0.01)]
    ''')
    run('tools/train.py', cfg, '--work-dir', str(work), '--amp')
    log = next(work.rglob('*.log')).read_text()
    assert 'AutocastOptimWrapper' in log
    ckpt = load(work / 'epoch_1.pth')
    assert 'ema_state_dict' in ckpt
    ema = ckpt['ema_state_dict']
    assert 'module.backbone.layer2.1.phi2_prev' in ema
    assert all(
        torch.isfinite(v).all() for v in ckpt['state_dict'].values()
        if v.is_floating_point())


def test_checkpoints_on_the_meta_device(trained, data, tmp_path):
    """A GPU run loads checkpoints onto the GPU (``resume``: get_device());
    the meta device stands in for another device here. The training and
    the published checkpoint, loaded onto it through RepLRunner, fail with
    an error naming ``map_location`` and a tensor, before any hook or the
    model sees them; the RNG hook, reached directly, names its entry."""
    from types import SimpleNamespace

    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.registry import DefaultScope

    from repl_mm.engine import ReplacementHook, RNGStateHook, build_runner
    out = run('tools/model_converters/publish_model.py',
              str(trained / 'epoch_3.pth'), str(tmp_path / 'r20.pth'))
    published = out.stdout.strip().splitlines()[-1]
    cfg = Config.fromfile(tiny_config(tmp_path, data, epochs=4))
    cfg.work_dir, cfg.launcher = str(tmp_path / 'run'), 'none'
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        runner = build_runner(cfg, train=True)
    ckpt = str(trained / 'epoch_3.pth')
    meta = r"map_location='meta': .* the meta device \(first meta tensor: " \
        r"checkpoint\['"
    for path in (ckpt, published):
        with pytest.raises(ValueError, match=meta):
            runner.load_checkpoint(path, map_location='meta')
    with pytest.raises(ValueError, match=meta):
        runner.resume(ckpt, map_location='meta')
    # the hooks' after_load_checkpoint paths, reached directly
    on_meta = torch.load(ckpt, map_location='meta', weights_only=False)
    with pytest.raises(
            ValueError,
            match=r"checkpoint\['rng_state'\]\[0\]"
            r"\['torch'\] is on the meta device"):
        RNGStateHook().after_load_checkpoint(
            SimpleNamespace(resuming=True), on_meta)
    assert ReplacementHook.after_load_checkpoint is \
        Hook.after_load_checkpoint  # it has none
    # the backbones' _load_from_state_dict reads the plan's bytes: fine on
    # any device with data, torch's own error on meta
    state = {
        k[len('backbone.'):]: v
        for k, v in on_meta['state_dict'].items() if k.startswith('backbone.')
    }
    with pytest.raises(NotImplementedError, match='meta tensor'):
        runner.model.backbone.load_state_dict(state)
    # the same files load and resume on the CPU
    runner.load_checkpoint(published)
    runner.resume(ckpt)
    assert runner.epoch == 3


def test_resume_without_a_fixed_seed_restores_the_rng_state(
        trained, data, tmp_path):
    """mmengine's resume re-seeds after loading when the config has no
    fixed seed (mmdet's and mmseg's default); the saved state wins."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from repl_mm.engine import build_runner
    cfg = Config.fromfile(tiny_config(tmp_path, data, epochs=4))
    cfg.work_dir, cfg.launcher = str(tmp_path / 'run'), 'none'
    cfg.randomness = dict(seed=None)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        runner = build_runner(cfg, train=True)
    runner.resume(str(trained / 'epoch_3.pth'))
    assert runner.seed == 0  # the checkpoint's, set by mmengine's resume
    saved = load(trained / 'epoch_3.pth')['rng_state'][0]
    assert torch.equal(torch.get_rng_state(), saved['torch'])
