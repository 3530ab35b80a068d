"""Deepcopy, checkpoints (spec §6, §8)."""
import copy

import pytest
import torch

from repl_mm.core import ConvSite, TransformerSite

from .cases import CASES, IDS
from .test_contract import neighbour_weights, outputs


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_deepcopy_reads_the_copys_neighbours(case):
    model = case.build(zero_init=False).eval()
    clone = copy.deepcopy(model)
    x = torch.rand(case.shape)
    before = [o.clone() for o in outputs(model, x)]
    site = next(m for m in clone.modules()
                if isinstance(m, (ConvSite, TransformerSite)))
    own = dict(clone.named_parameters())
    for _, w in neighbour_weights(site):
        # the copy's site reads the copy's parameters, not the original's
        assert any(w is p for p in own.values())
        with torch.no_grad():
            w.mul_(3.0)
    after_orig = outputs(model, x)
    after_clone = outputs(clone, x)
    assert all(torch.equal(a, b) for a, b in zip(before, after_orig))
    assert any(not torch.allclose(a, b) for a, b in zip(before, after_clone))


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_roundtrip_and_plan_mismatch(case):
    model = case.build(zero_init=False)
    sd = model.state_dict()
    assert 'replacement_plan' in sd
    twin = case.build(zero_init=False)
    twin.load_state_dict(sd)  # same plan: loads strictly
    x = torch.rand(case.shape)
    model.eval(), twin.eval()
    assert all(torch.equal(a, b)
               for a, b in zip(outputs(model, x), outputs(twin, x)))
    other = case.build(interval=2)
    with pytest.raises(ValueError, match=r'another RepL plan[\s\S]*site'):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match='mode'):
        case.build(mode='interpolate').load_state_dict(sd, strict=False)
    # an E2E model refuses a RepL checkpoint too
    with pytest.raises(ValueError, match='another RepL plan'):
        case.build(mode='none').load_state_dict(sd, strict=False)


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_e2e_checkpoint_loads_kept_blocks(case, monkeypatch):
    ref = case.build_upstream()
    model = case.build()
    logged = []
    monkeypatch.setattr('repl_mm.models.base.print_log',
                        lambda msg, **kw: logged.append(msg))
    missing, unexpected = model.load_state_dict(ref.state_dict(),
                                                strict=False)
    prefixes = tuple(model._site_prefixes.values())
    # only the sites' own new weights are missing; the replaced blocks'
    # weights are reported unused; everything else loaded
    assert missing and all(k.startswith(prefixes) for k in missing)
    assert unexpected and all(k.startswith(prefixes) for k in unexpected)
    sd = model.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith(prefixes):
            assert torch.equal(sd[k], v), k
    log = '\n'.join(logged)
    assert 'without a RepL plan' in log
    assert all(k in log for k in unexpected)


def test_pretrained_init_cfg_loads_upstream(tmp_path):
    from mmdet.models.backbones import ResNet

    from repl_mm.models.det_resnet import RepLResNet
    ref = ResNet(depth=18)
    path = tmp_path / 'r18.pth'
    torch.save({'state_dict': ref.state_dict()}, path)
    model = RepLResNet(
        depth=18, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    assert torch.equal(model.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert torch.equal(model.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    site = model.layer2[1]
    assert isinstance(site, ConvSite)
    assert torch.all(site.phi2_prev == 0.5)
    assert torch.all(site.site_norm.weight == 0)  # zero_init survives


def test_init_weights_keeps_site_init():
    from repl_mm.models.cls_resnet import RepLResNet
    model = RepLResNet(depth=18)
    model.init_weights()  # Kaiming / Constant(1) on every BN, then sites
    site = model.layer2[1]
    assert torch.all(site.site_norm.weight == 0)
    assert torch.all(site.phi2_prev == 0.5)
    model = RepLResNet(depth=18, replacement=dict(zero_init=False))
    model.init_weights()
    assert torch.all(model.layer2[1].site_norm.weight == 1)


def test_ema_copy_reads_its_own_neighbours():
    """mmengine's EMAHook deep-copies the model (spec §8)."""
    from mmengine.model import ExponentialMovingAverage

    from repl_mm.models.cls_resnet import RepLResNet_CIFAR
    model = RepLResNet_CIFAR(depth=20, replacement=dict(zero_init=False))
    ema = ExponentialMovingAverage(model, momentum=0.5)
    site = ema.module.layer2[1]
    own = {id(p) for p in ema.module.parameters()}
    assert all(id(w) in own for _, w in neighbour_weights(site))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    # the average moved the copy's neighbours, and its site follows them
    prev_conv2 = ema.module.layer2[0].conv2.weight
    assert any(w is prev_conv2 for _, w in neighbour_weights(site))
