"""mmpretrain's own ResNetV1c / ResNetV1d backbone checks (its
``test_resnet.py``: deep stem, frozen first stage, V1d's average-pool
shortcuts), run against the RepL classes with ``replacement=dict(
mode='none')``, and mmdet's ResNetV1d likewise; 32x32 inputs."""
import pytest
import torch
from mmcv.cnn import ConvModule
from torch import nn

from repl_mm.models.cls_resnet import RepLResNetV1c, RepLResNetV1d
from repl_mm.models.det_resnet import RepLResNetV1d as DetResNetV1d

NONE = dict(mode='none')
CLASSES = {
    'cls-v1c': RepLResNetV1c,
    'cls-v1d': RepLResNetV1d,
    'det-v1d': DetResNetV1d
}


@pytest.mark.parametrize('name', sorted(CLASSES))
def test_deep_stem_and_output_shapes(name):
    model = CLASSES[name](depth=50, out_indices=(0, 1, 2, 3), replacement=NONE)
    model.init_weights()
    model.train()
    stem = list(model.stem)
    convs = [m for m in stem if isinstance(m, (ConvModule, nn.Conv2d))]
    assert len(convs) == 3
    x = torch.randn(2, 3, 32, 32)
    assert model.stem(x).shape == (2, 64, 16, 16)
    assert [tuple(f.shape) for f in model(x)] == [(2, 256, 8, 8),
                                                  (2, 512, 4, 4),
                                                  (2, 1024, 2, 2),
                                                  (2, 2048, 1, 1)]


@pytest.mark.parametrize('name', sorted(CLASSES))
def test_frozen_first_stage(name):
    model = CLASSES[name](depth=50, frozen_stages=1)  # sites 5, 9, 12
    model.init_weights()
    model.train()
    for m in (model.stem, model.layer1):
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not bn.training for bn in m.modules()
                   if isinstance(bn, nn.BatchNorm2d))
    assert all(p.requires_grad for p in model.layer2.parameters())


@pytest.mark.parametrize('name', ['cls-v1d', 'det-v1d'])
def test_v1d_shortcuts_average_pool(name):
    model = CLASSES[name](depth=50, replacement=NONE)
    for layer in (model.layer2, model.layer3, model.layer4):
        down = layer[0].downsample
        assert isinstance(down[0], nn.AvgPool2d)
        assert down[1].stride == (1, 1)
