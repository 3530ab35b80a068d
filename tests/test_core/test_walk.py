"""The one walk over RepL backbones and sites (repl_mm.core.walk)."""
import pytest
from torch import nn

from repl_mm.core import (SITE_TYPES, ConvSite, DroppedBlock,
                          InterpolatedBlock, SiteRef, is_repl_backbone,
                          iter_repl_backbones, iter_sites)


def cifar(**replacement):
    from repl_mm.models.cls_resnet import RepLResNet_CIFAR
    return RepLResNet_CIFAR(depth=20, replacement=replacement)


class Net(nn.Module):

    def __init__(self, *backbones):
        super().__init__()
        self.backbone = backbones[0]
        self.heads = nn.ModuleList(backbones[1:])


def test_sites_of_a_nested_backbone_in_index_order():
    pytest.importorskip('mmpretrain')
    net = Net(cifar(interval=2))
    refs = list(iter_sites(net))
    plan = net.backbone.replacement_plan
    assert [r.index for r in refs] == list(plan.indices)
    modules = dict(net.named_modules())
    for r in refs:
        assert isinstance(r, SiteRef) and r.backbone == 'backbone'
        assert modules[r.name] is r.module
        assert isinstance(r.module, ConvSite)
    assert refs[0].name == 'backbone.layer1.1'
    # the same walk from the backbone itself: names relative to it
    own = list(iter_sites(net.backbone))
    assert [(r.name, r.backbone) for r in own][0] == ('layer1.1', '')


def test_every_backbone_and_every_mode():
    pytest.importorskip('mmpretrain')
    net = Net(cifar(), cifar(mode='interpolate'), cifar(mode='none'),
              cifar(mode='drop'))
    assert [n for n, _ in iter_repl_backbones(net)
            ] == ['backbone', 'heads.0', 'heads.1', 'heads.2']
    by_bb = {}
    for r in iter_sites(net):
        by_bb.setdefault(r.backbone, []).append(type(r.module))
    assert by_bb['backbone'] == [ConvSite] * 2
    assert by_bb['heads.0'] == [InterpolatedBlock] * 2
    # mode='none': the original blocks; 'drop': identities
    assert all(t not in SITE_TYPES for t in by_bb['heads.1'])
    assert by_bb['heads.2'] == [DroppedBlock] * 2


def test_no_backbone_no_site():
    assert not is_repl_backbone(nn.Linear(2, 2))
    assert list(iter_repl_backbones(nn.Sequential(nn.Linear(2, 2)))) == []
    assert list(iter_sites(nn.Sequential(nn.Linear(2, 2)))) == []

    class Fake(nn.Module):  # a plan of another type is not a plan
        replacement_plan = 'plan'

        def site_modules(self):
            return {}

    assert not is_repl_backbone(Fake())
