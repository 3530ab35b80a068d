"""Registration into the three codebases, and loud failure when one is
missing."""
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.config import Config


@pytest.mark.parametrize(
    'registry,cfg',
    [
        ('mmdet', dict(type='RepLResNet', depth=18)),
        ('mmseg', dict(type='RepLResNetV1c', depth=18)),
        ('mmpretrain', dict(type='RepLResNet', depth=18)),
        ('mmpretrain', dict(type='RepLResNet_CIFAR', depth=20)),
        ('mmdet', dict(type='RepLResNeXt', depth=50, groups=4)),
        ('mmdet', dict(type='RepLResNetV1d', depth=18)),
        ('mmseg', dict(type='RepLResNeXt', depth=50, groups=4)),
        ('mmpretrain', dict(type='RepLResNeXt', depth=50, groups=4)),
        ('mmpretrain', dict(type='RepLResNetV1c', depth=18)),
        ('mmpretrain', dict(type='RepLResNetV1d', depth=18)),
        ('mmpretrain',
         dict(
             type='RepLVisionTransformer',
             arch='deit-tiny',
             img_size=32,
             patch_size=8)),
        ('mmdet',
         dict(
             type='RepLSwinTransformer',
             embed_dims=16,
             num_heads=(1, 2, 2, 4),
             window_size=2)),
        ('mmseg',
         dict(
             type='RepLSwinTransformer',
             embed_dims=16,
             num_heads=(1, 2, 2, 4),
             window_size=2)),
        ('mmpretrain',
         dict(
             type='RepLSwinTransformer',
             arch=dict(
                 embed_dims=16, depths=[2, 2, 6, 2], num_heads=[1, 2, 2, 4]),
             img_size=32,
             window_size=2)),
        ('mmpretrain', dict(type='RepLConvNeXt', arch='atto')),
        # mmdet and mmseg configs name mmpretrain's ConvNeXt by its scope
        ('mmdet', dict(type='mmpretrain.RepLConvNeXt', arch='atto')),
        ('mmseg', dict(type='mmpretrain.RepLConvNeXt', arch='atto')),
    ])
def test_build_from_registry(registry, cfg):
    import importlib

    from mmengine.registry import DefaultScope

    import repl_mm  # noqa: F401
    models = importlib.import_module(f'{registry}.registry').MODELS
    # under the codebase's own scope, whatever scope earlier tests left
    with DefaultScope.overwrite_default_scope(registry):
        model = models.build(dict(cfg, replacement=dict(interval=4)))
    assert model.replacement_plan.indices
    assert type(model).__module__.startswith('repl_mm.models')


def test_custom_imports_in_a_config(tmp_path):
    cfg_file = tmp_path / 'cfg.py'
    cfg_file.write_text(
        textwrap.dedent("""
        custom_imports = dict(imports=['repl_mm'],
                              allow_failed_imports=False)
        model = dict(type='RepLResNet', depth=18,
                     replacement=dict(mode='drop'))
    """))
    cfg = Config.fromfile(str(cfg_file))
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    assert model.replacement_plan.mode == 'drop'
    model.eval()  # batch 1 reaches a 1x1 map: train-mode BN would refuse
    assert model(torch.rand(1, 3, 32, 32))[-1].shape == (1, 512, 1, 1)


def test_bad_replacement_option_names_it():
    from mmdet.registry import MODELS
    with pytest.raises(ValueError, match="mode.*'fold'"):
        MODELS.build(
            dict(type='RepLResNet', depth=18, replacement=dict(mode='fold')))
    with pytest.raises(ValueError, match='on_invalid'):
        MODELS.build(
            dict(
                type='RepLResNet',
                depth=50,
                replacement=dict(on_invalid='error')))


def test_missing_codebase_fails_loudly():
    code = textwrap.dedent("""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = (
            lambda name, *a: None if name == 'mmseg' else real(name, *a))
        import repl_mm
        from mmdet.registry import MODELS
        try:
            MODELS.build(dict(type='RepLResNetV1c', depth=50))
        except ImportError as e:
            print('ERR', e)
    """)
    out = subprocess.run([sys.executable, '-c', code],
                         capture_output=True,
                         text=True,
                         timeout=300)
    assert 'ERR RepLResNetV1c' in out.stdout, out.stderr[-2000:]
    assert 'pip install mmsegmentation' in out.stdout
