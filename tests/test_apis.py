"""The one way in (``repl_mm.apis``): scopes, model builds, checkpoint
loads (training, published, hook-route) and dataloaders, on tiny CIFAR
ResNets; every error names the option, the value or the file."""
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging.history_buffer import HistoryBuffer

from repl_mm.apis import (SCOPES, build_dataloader, build_model, check_output,
                          init_model, load_checkpoint_state, read_checkpoint,
                          repl_backbones, scope_of)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / 'configs/demo/resnet32-repl_1xb64_15e_mnist5k.py'

# CIFAR ResNet-20 at width 8: k = 4 -> sites 5, 8
TINY = dict(depth=20, stem_channels=8, base_channels=8)
# upstream ResNet_CIFAR has no depth 20: ResNet-18 (8 blocks) at width 8,
# k = 4 -> sites 4, 8 shifted to 5 (block 5 down-samples), ...
TINY18 = dict(depth=18, stem_channels=8, base_channels=8)


def model_cfg(backbone_type='RepLResNet_CIFAR', **backbone):
    arch = TINY18 if backbone.pop('depth', 20) == 18 else TINY
    return dict(
        type='ImageClassifier',
        backbone=dict(type=backbone_type, **arch, **backbone),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=3,
            in_channels=arch['base_channels'] * 2**(2 if arch is TINY else 3)))


def config(**kwargs):
    return Config(
        dict(
            default_scope='mmpretrain',
            model=model_cfg(replacement=dict(interval=4)),
            data_preprocessor=dict(mean=[1.0] * 3, std=[2.0] * 3),
            **kwargs))


def save(model, path, **meta):
    torch.save(dict(state_dict=model.state_dict(), meta=meta), path)
    return str(path)


# -- scopes and builds ------------------------------------------------------
def test_scopes_and_scope_of():
    assert SCOPES == ('mmdet', 'mmseg', 'mmpretrain')
    for scope in SCOPES:
        assert scope_of(Config(dict(default_scope=scope))) == scope
    with pytest.raises(
            ValueError,
            match=r"default_scope must be one of "
            r"\('mmdet', 'mmseg', 'mmpretrain'\).*'mmcls'"):
        scope_of(Config(dict(default_scope='mmcls')))
    with pytest.raises(ValueError, match='default_scope.*None'):
        scope_of(Config(dict()))


def test_build_model_registers_repl_and_leaves_the_config_alone():
    cfg = model_cfg(replacement=dict(interval=4))
    before = repr(cfg)
    model = build_model(cfg, 'mmpretrain')
    assert repr(cfg) == before
    assert type(model.backbone).__name__ == 'RepLResNet_CIFAR'
    assert model.backbone.replacement_plan.indices == (5, 8)
    assert model.training
    with pytest.raises(ValueError, match=r"scope must be one of .*'mmcv'"):
        build_model(cfg, 'mmcv')


# -- init_model -------------------------------------------------------------
def test_init_model_from_config_or_path(tmp_path):
    cfg = config()
    model = init_model(cfg)
    assert not model.training
    assert model.cfg is not cfg and model.cfg.default_scope == 'mmpretrain'
    assert 'data_preprocessor' not in cfg.model  # the caller's config kept
    # the top-level data_preprocessor is the model's, as in mmengine's Runner
    assert model.data_preprocessor.mean.flatten().tolist() == [1.0] * 3
    assert next(model.parameters()).device.type == 'cpu'
    path = tmp_path / 'tiny.py'
    cfg.dump(str(path))
    model = init_model(
        str(path), cfg_options={'model.backbone.replacement.interval': 2})
    assert model.backbone.replacement_plan.indices == (2, 5, 6, 8)
    assert model.cfg.filename == str(path)
    with pytest.raises(FileNotFoundError, match=r"config '.*nope\.py'"):
        init_model(str(tmp_path / 'nope.py'))
    with pytest.raises(TypeError, match='a file path or a Config.*dict'):
        init_model(dict(cfg))
    with pytest.raises(ValueError, match="default_scope.*'mmengine'"):
        init_model(Config(dict(cfg, default_scope='mmengine')))


def test_init_model_loads_a_checkpoint_strictly(tmp_path):
    torch.manual_seed(0)
    trained = build_model(
        model_cfg(replacement=dict(interval=4)), 'mmpretrain')
    with torch.no_grad():
        trained.backbone.layer2[1].phi2_prev.fill_(0.25)
    ckpt = save(trained, tmp_path / 'repl.pth', epoch=1)
    model = init_model(config(), ckpt)
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # another plan: the error names the file and the plan
    with pytest.raises(
            ValueError,
            match=r"repl\.pth' does not fit the "
            r'model of the config.*another RepL plan'):
        init_model(
            config(),
            ckpt,
            cfg_options={'model.backbone.replacement.interval': 2})
    e2e = save(
        build_model(model_cfg(replacement=dict(mode='none')), 'mmpretrain'),
        tmp_path / 'e2e.pth')
    with pytest.raises(
            ValueError, match=r"e2e\.pth' does not fit.*does "
            'not match'):
        init_model(config(), e2e)
    with pytest.raises(
            FileNotFoundError, match=r"no checkpoint at "
            r"'.*missing\.pth'"):
        init_model(config(), str(tmp_path / 'missing.pth'))


def test_init_model_builds_the_repl_model_of_a_hook_run(tmp_path):
    """A config that switches RepL on with ReplacementHook names the
    upstream backbone; its checkpoints record the RepL model in
    meta['repl_model'], which is what is built."""
    repl_cfg = model_cfg(depth=18, replacement=dict(interval=4))
    trained = build_model(repl_cfg, 'mmpretrain')
    plan = trained.backbone.replacement_plan.indices
    ckpt = save(trained, tmp_path / 'hook.pth', repl_model=repl_cfg)
    hook_cfg = Config(
        dict(
            default_scope='mmpretrain',
            model=model_cfg('ResNet_CIFAR', depth=18),
            custom_hooks=[dict(type='ReplacementHook', interval=4)]))
    model = init_model(hook_cfg, ckpt)
    assert type(model.backbone).__name__ == 'RepLResNet_CIFAR'
    assert model.backbone.replacement_plan.indices == plan
    # without the hook the config's own (upstream) model is built
    plain = Config(
        dict(
            default_scope='mmpretrain',
            model=model_cfg('ResNet_CIFAR', depth=18)))
    with pytest.raises(ValueError, match=r"hook\.pth' does not fit"):
        init_model(plain, ckpt)
    # a hook config and a checkpoint that does not record the RepL model
    bare = save(trained, tmp_path / 'bare.pth')
    with pytest.raises(
            ValueError,
            match=r"bare\.pth' does not fit.*no "
            r"meta\['repl_model'\]"):
        init_model(hook_cfg, bare)


# -- checkpoints ------------------------------------------------------------
def test_load_checkpoint_state_of_training_and_plain_files(tmp_path):
    lin = torch.nn.Linear(2, 3)
    history = HistoryBuffer()
    history.update(0.5)
    training = tmp_path / 'epoch_1.pth'
    torch.save(
        dict(
            state_dict=lin.state_dict(),
            meta=dict(epoch=1, lr=np.float64(0.1)),
            message_hub=dict(log_scalars=dict(loss=history))), training)
    state = load_checkpoint_state(str(training))
    assert sorted(state) == ['bias', 'weight']
    assert torch.equal(state['weight'], lin.weight)
    assert read_checkpoint(str(training))['meta']['epoch'] == 1
    bare = tmp_path / 'bare.pth'
    torch.save(lin.state_dict(), bare)
    assert sorted(load_checkpoint_state(str(bare))) == ['bias', 'weight']


@pytest.mark.parametrize('content, match', [
    (b'not a checkpoint', 'cannot be loaded'),
    (b'', 'cannot be loaded'),
])
def test_malformed_checkpoints_name_the_file(tmp_path, content, match):
    path = tmp_path / 'broken.pth'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"'.*broken\.pth' {match}"):
        load_checkpoint_state(str(path))


def test_checkpoint_that_is_not_a_dict(tmp_path):
    path = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"list\.pth' holds a list"):
        load_checkpoint_state(str(path))
    path = tmp_path / 'odd.pth'
    torch.save(dict(state_dict=[torch.zeros(1)]), path)
    with pytest.raises(
            ValueError, match=r"odd\.pth': its state_dict is a "
            'list'):
        load_checkpoint_state(str(path))
    with pytest.raises(FileNotFoundError, match=r"'.*none\.pth'"):
        load_checkpoint_state(str(tmp_path / 'none.pth'))


# -- dataloaders ------------------------------------------------------------
@pytest.fixture(scope='module')
def cifar_cfg(tmp_path_factory):
    from repl_mm.datasets.writers import synthetic_images, write_cifar
    root = tmp_path_factory.mktemp('apis') / 'data'
    imgs, labels, classes = synthetic_images(
        num_per_class=1, num_classes=10, img_size=8)
    write_cifar(str(root), (imgs, labels), (imgs, labels), classes)
    cfg = Config.fromfile(str(DEMO))
    for split in ('train', 'val', 'test'):
        cfg.merge_from_dict({
            f'{split}_dataloader.dataset.data_root': str(root),
            f'{split}_dataloader.num_workers': 0,
            f'{split}_dataloader.persistent_workers': False
        })
    return cfg


def test_build_dataloader_of_each_split(cifar_cfg):
    for split in ('train', 'val', 'test'):
        loader = build_dataloader(cifar_cfg, split, seed=0, batch_size=3)
        assert loader.batch_size == 3
        batch = next(iter(loader))
        assert len(batch['inputs']) == 3
    # the config itself is left as it was
    assert cifar_cfg.test_dataloader.batch_size != 3


def test_build_dataloader_errors_name_the_split(cifar_cfg):
    with pytest.raises(
            ValueError,
            match=r"split must be one of "
            r"\('train', 'val', 'test'\).*'valid'"):
        build_dataloader(cifar_cfg, 'valid')
    cfg = cifar_cfg.copy()
    cfg.val_dataloader = None
    with pytest.raises(ValueError, match=r"no val_dataloader \(split='val'"):
        build_dataloader(cfg, 'val')


# -- helpers of the tools ---------------------------------------------------
def test_repl_backbones():
    model = build_model(model_cfg(replacement=dict(interval=4)), 'mmpretrain')
    assert list(repl_backbones(model)) == ['backbone']
    assert repl_backbones(
        build_model(model_cfg('ResNet_CIFAR', depth=18), 'mmpretrain')) == {}


def test_check_output(tmp_path):
    src = tmp_path / 'in.pth'
    src.write_bytes(b'x')
    link = tmp_path / 'link.pth'
    link.symlink_to(src)
    for path in (src, link):
        with pytest.raises(
                ValueError,
                match=r"--out '.*' is the input "
                r"checkpoint '.*in\.pth'"):
            check_output(
                '--out', str(path), dict(checkpoint=str(src)), force=True)
    with pytest.raises(ValueError, match='is a directory'):
        check_output('--out', str(tmp_path), {})
    other = tmp_path / 'other.pth'
    other.write_bytes(b'y')
    with pytest.raises(
            FileExistsError, match=r"'.*other\.pth' already "
            'exists.*--force'):
        check_output('--out', str(other), dict(checkpoint=str(src)))
    check_output('--out', str(other), dict(checkpoint=str(src)), force=True)
    check_output('--out', str(tmp_path / 'new.pth'), dict(cfg=Config()))
