"""The upstream projects' own ResNeXt backbone tests (mmdet, mmseg and
mmpretrain ``tests/test_models/test_backbones/test_resnext.py``), run
against the RepL classes with ``replacement=dict(mode='none')``: the E2E
twin keeps upstream's model, so upstream's assertions hold as they are.
Upstream's tests of its ``Bottleneck`` block alone test upstream's class,
which RepL does not change; where RepL differs (blocks with ``dcn`` or
``plugins`` are refused) the test says so."""
import pytest
import torch

from repl_mm.models.cls_resnext import RepLResNeXt as ClsResNeXt
from repl_mm.models.det_resnext import RepLResNeXt as DetResNeXt
from repl_mm.models.seg_resnext import RepLResNeXt as SegResNeXt

NONE = dict(mode='none')
# (class, its Bottleneck, the keyword of the per-group width)
BACKBONES = {
    'mmdet': (DetResNeXt, 'mmdet.models.backbones.resnext', 'base_width'),
    'mmseg': (SegResNeXt, 'mmseg.models.backbones.resnext', 'base_width'),
    'mmpretrain':
    (ClsResNeXt, 'mmpretrain.models.backbones.resnext', 'width_per_group'),
}


def _bottleneck(codebase):
    import importlib
    return importlib.import_module(BACKBONES[codebase][1]).Bottleneck


def _build(codebase, **kwargs):
    cls, _, width = BACKBONES[codebase]
    kwargs.setdefault('groups', 32)
    kwargs[width] = kwargs.pop('width', 4)
    return cls(depth=kwargs.pop('depth', 50), replacement=NONE, **kwargs)


@pytest.mark.parametrize('codebase', sorted(BACKBONES))
def test_depth_must_be_50_101_or_152(codebase):
    with pytest.raises(KeyError):
        _build(codebase, depth=18)


@pytest.mark.parametrize('codebase', sorted(BACKBONES))
def test_groups_and_output_shapes(codebase):
    """Upstream's 32x4d ResNeXt-50 (mmdet's 32x32 input for all three, in
    a batch of 2: train-mode BN of mmseg and mmpretrain, whose norms
    train, needs more than one value on the last 1x1 map): every
    bottleneck's conv2 has 32 groups, four stages out."""
    out = {} if codebase == 'mmdet' else dict(out_indices=(0, 1, 2, 3))
    model = _build(codebase, **out)
    blocks = [
        m for m in model.modules() if isinstance(m, _bottleneck(codebase))
    ]
    assert len(blocks) == 16
    assert all(m.conv2.groups == 32 for m in blocks)
    model.init_weights()
    model.train()
    feats = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 256, 8, 8), (2, 512, 4, 4),
                                               (2, 1024, 2, 2),
                                               (2, 2048, 1, 1)]


def test_mmpretrain_last_stage_only():
    model = _build('mmpretrain', out_indices=(3, ))
    model.init_weights()
    model.train()
    feats = model(torch.randn(2, 3, 32, 32))
    assert len(feats) == 1 and feats[0].shape == (2, 2048, 1, 1)


def test_conv2_widths_of_upstream_bottlenecks():
    """Upstream's block test: a 32x4d bottleneck of 64 planes has a
    128-wide grouped conv2 (mmdet and mmseg count planes, mmpretrain
    output channels); the RepL backbone's first stage has the same."""
    for codebase in sorted(BACKBONES):
        block = _build(codebase).layer1[0]
        assert block.conv2.groups == 32
        assert block.conv2.out_channels == 128


@pytest.mark.parametrize('codebase', ['mmdet', 'mmseg'])
def test_dcn_is_refused(codebase):
    """Upstream builds a ResNeXt with DCN; RepL refuses it in every mode
    (a site has no counterpart of the offsets), naming the option."""
    dcn = dict(type='DCN', deform_groups=1, fallback_on_stride=False)
    with pytest.raises(ValueError, match='dcn='):
        _build(
            codebase,
            groups=4,
            dcn=dcn,
            stage_with_dcn=(False, True, True, True))


def test_plugins_are_refused():
    """Upstream's mmdet block test runs a bottleneck with a plugin after
    conv2; RepL refuses plugins, naming the option."""
    plugins = [
        dict(
            cfg=dict(type='ContextBlock', ratio=1. / 4),
            stages=(False, False, True, True),
            position='after_conv3')
    ]
    with pytest.raises(ValueError, match='plugins='):
        _build('mmdet', groups=4, plugins=plugins)


@pytest.mark.parametrize('path', [
    'repl_mm.models.det_resnet:RepLResNet',
    'repl_mm.models.seg_resnet:RepLResNetV1c'
])
def test_dcn_is_refused_by_the_resnets_too(path):
    """The same rule holds for the plain ResNets of mmdet and mmseg: every
    ResNet family is described by one function."""
    import importlib
    mod, name = path.split(':')
    cls = getattr(importlib.import_module(mod), name)
    dcn = dict(type='DCN', deform_groups=1, fallback_on_stride=False)
    with pytest.raises(ValueError, match='dcn='):
        cls(depth=50, dcn=dcn, stage_with_dcn=(False, True, True, True))
