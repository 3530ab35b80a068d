"""2-process training on this CPU (gloo) through tools/dist_train.sh, both
routes (registry backbone, ReplacementHook): no unused-parameter errors
without find_unused_parameters, and both ranks end with identical weights
(issue 6 §2)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

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


def dist_train(tmp_path, cfg_text, port):
    from repl_mm.datasets import synthetic_images, write_cifar
    from repl_mm.datasets.writers import split_train_test
    data = tmp_path / 'data'
    imgs, labels, classes = synthetic_images(num_per_class=4)
    split = split_train_test(imgs, labels, 0.25, seed=0)
    write_cifar(str(data), split['train'], split['test'], classes=classes)
    (tmp_path / 'dumper.py').write_text(textwrap.dedent(DUMPER))
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(cfg_text.format(root=ROOT, data=data))
    env = {
        **os.environ, 'PYTHON': sys.executable, 'PORT': str(port),
        'PYTHONPATH': str(tmp_path), 'OMP_NUM_THREADS': '1'
    }
    work = tmp_path / 'work'
    out = subprocess.run(
        ['bash', 'tools/dist_train.sh', str(cfg), '2', '--work-dir',
         str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return work


@pytest.mark.parametrize('route,cfg,port', [
    ('registry', CLS, 29611),
    ('hook', CLS_HOOK, 29612),
])
def test_two_process_training_keeps_ranks_identical(tmp_path, route, cfg,
                                                    port):
    work = dist_train(tmp_path, cfg, port)
    r0 = torch.load(work / 'rank0.pth', weights_only=True)
    r1 = torch.load(work / 'rank1.pth', weights_only=True)
    assert list(r0) == list(r1)
    assert any('phi' in k for k in r0)  # RepL sites were trained
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    log = next(work.rglob('*.log')).read_text()
    assert 'gloo' in log or 'Distributed training: True' in log
