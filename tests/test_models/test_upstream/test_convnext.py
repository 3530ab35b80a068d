"""mmpretrain's own ConvNeXt backbone tests (tests/test_models/
test_backbones/test_convnext.py of open-mmlab/mmpretrain), run against
``RepLConvNeXt`` with ``replacement=dict(mode='none')``: the E2E twin must
pass upstream's tests as upstream's class does.

Ported with smaller sizes (test time): upstream's 'tiny' and 'small' archs
at 224x224 become the 'atto' arch and a 2-3-3-2 custom arch at 64x64
(ConvNeXt's strides 4, 2, 2, 2 keep every assertion's logic: a stage's
width, a map of side 64 / 4 / 2^i). Each assertion is upstream's, with the
sizes it checks computed for these archs.
"""
import pytest
import torch

from repl_mm.models.cls_convnext import RepLConvNeXt

NONE = dict(mode='none')
ATTO = (40, 80, 160, 320)  # ConvNeXt 'atto' widths, depths 2, 2, 6, 2
SMALL = dict(depths=[2, 3, 3, 2], channels=[8, 16, 24, 32])


def ConvNeXt(**kwargs):  # noqa: N802 (upstream's name in the ported body)
    return RepLConvNeXt(**kwargs, replacement=NONE)


def test_assertion():
    with pytest.raises(AssertionError):
        ConvNeXt(arch='unknown')

    with pytest.raises(AssertionError):
        # ConvNeXt arch dict should include 'embed_dims',
        ConvNeXt(arch=dict(channels=[2, 3, 4, 5]))

    with pytest.raises(AssertionError):
        # ConvNeXt arch dict should include 'embed_dims',
        ConvNeXt(arch=dict(depths=[2, 3, 4], channels=[2, 3, 4, 5]))


def test_convnext():

    # Test forward
    model = ConvNeXt(arch='atto', out_indices=-1)
    model.init_weights()
    model.train()

    imgs = torch.randn(1, 3, 64, 64)
    feat = model(imgs)
    assert len(feat) == 1
    assert feat[0].shape == torch.Size([1, ATTO[3]])

    # Test forward with multiple outputs
    model = ConvNeXt(arch=SMALL, out_indices=(0, 1, 2, 3))

    imgs = torch.randn(1, 3, 64, 64)
    feat = model(imgs)
    assert len(feat) == 4
    assert feat[0].shape == torch.Size([1, 8])
    assert feat[1].shape == torch.Size([1, 16])
    assert feat[2].shape == torch.Size([1, 24])
    assert feat[3].shape == torch.Size([1, 32])

    # Test with custom arch
    model = ConvNeXt(
        arch={
            'depths': [2, 3, 4, 5, 6],
            'channels': [4, 8, 12, 16, 20]
        },
        out_indices=(0, 1, 2, 3, 4))
    model.init_weights()
    model.train()

    imgs = torch.randn(1, 3, 64, 64)
    feat = model(imgs)
    assert len(feat) == 5
    assert feat[0].shape == torch.Size([1, 4])
    assert feat[1].shape == torch.Size([1, 8])
    assert feat[2].shape == torch.Size([1, 12])
    assert feat[3].shape == torch.Size([1, 16])
    assert feat[4].shape == torch.Size([1, 20])

    # Test without gap before final norm
    model = ConvNeXt(
        arch=SMALL, out_indices=(0, 1, 2, 3), gap_before_final_norm=False)

    imgs = torch.randn(1, 3, 64, 64)
    feat = model(imgs)
    assert len(feat) == 4
    assert feat[0].shape == torch.Size([1, 8, 16, 16])
    assert feat[1].shape == torch.Size([1, 16, 8, 8])
    assert feat[2].shape == torch.Size([1, 24, 4, 4])
    assert feat[3].shape == torch.Size([1, 32, 2, 2])

    # Test frozen_stages
    model = ConvNeXt(arch=SMALL, out_indices=(0, 1, 2, 3), frozen_stages=2)
    model.init_weights()
    model.train()

    for i in range(2):
        assert not model.downsample_layers[i].training
        assert not model.stages[i].training

    for i in range(2, 4):
        assert model.downsample_layers[i].training
        assert model.stages[i].training

    # Test Activation Checkpointing
    model = ConvNeXt(arch='atto', out_indices=-1, with_cp=True)
    model.init_weights()
    model.train()

    imgs = torch.randn(1, 3, 64, 64)
    feat = model(imgs)
    assert len(feat) == 1
    assert feat[0].shape == torch.Size([1, ATTO[3]])

    # Test linear_pw_conv=False
    model = ConvNeXt(arch='atto', out_indices=-1, linear_pw_conv=False)
    model.init_weights()
    model.train()

    imgs = torch.randn(1, 3, 64, 64)
    feat = model(imgs)
    assert len(feat) == 1
    assert feat[0].shape == torch.Size([1, ATTO[3]])
