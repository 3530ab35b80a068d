"""Deepcopy, pickling, checkpoints (spec §6, §8)."""
import copy
import io
import json
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch

from repl_mm.core import (ConvNeXtSite, ConvSite, InterpolatedBlock,
                          NonReentrantCheckpoint, TransformerSite)
from repl_mm.models.base import decode_plan
from .cases import CASES, IDS
from .test_contract import neighbour_weights, outputs


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_deepcopy_reads_the_copys_neighbours(case):
    model = case.build(zero_init=False).eval()
    clone = copy.deepcopy(model)
    x = torch.rand(case.shape)
    before = [o.clone() for o in outputs(model, x)]
    site = next(m for m in clone.modules()
                if isinstance(m, (ConvSite, TransformerSite, ConvNeXtSite)))
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
    assert all(
        torch.equal(a, b) for a, b in zip(outputs(model, x), outputs(twin, x)))
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
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
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


INTERPOLATE = [c for c in CASES if c.name in ('det-r18', 'cls-vit')]


@pytest.mark.parametrize(
    'case', INTERPOLATE, ids=[c.name for c in INTERPOLATE])
def test_e2e_checkpoint_loads_strict_into_interpolate(case, monkeypatch):
    """An ``interpolate`` site is the replaced block: an E2E checkpoint
    fills what it keeps (norms, the conv no neighbour serves, the ViT MLP
    and LNs); the interpolated weights come from the neighbours (spec
    §2), alpha and beta keep their values."""
    torch.manual_seed(1)
    e2e = case.build(mode='none')
    g = torch.Generator().manual_seed(2)
    # values no fresh model has (BN and LN start at ones and zeros)
    sd = {
        k: v +
        torch.rand(v.shape, generator=g) if v.is_floating_point() else v + 7
        for k, v in e2e.state_dict().items()
    }
    assert 'replacement_plan' not in sd
    torch.manual_seed(0)
    model = case.build(mode='interpolate')
    logged = []
    monkeypatch.setattr('repl_mm.models.base.print_log',
                        lambda msg, **kw: logged.append(msg))
    model.load_state_dict(sd)  # strict: nothing missing, nothing unexpected
    sites = model.site_modules()
    assert sites and all(
        isinstance(m, InterpolatedBlock) for m in sites.values())
    unused = []
    for i, site in sites.items():
        prefix = model._site_prefixes[i]
        kept = site.block.state_dict()
        assert kept
        for k, v in kept.items():  # the trainable parts: the E2E values
            assert torch.equal(v, sd[prefix + k]), prefix + k
        assert all(
            float(p) == 0.5 for p in (getattr(site, n)
                                      for n in ('alpha', 'beta')
                                      if hasattr(site, n)))
        # the interpolated weights are synthesized from the (loaded)
        # neighbours, not loaded from the replaced block's keys
        coef = {
            'prev': getattr(site, 'alpha', None),
            'next': getattr(site, 'beta', None)
        }
        for key, w, (_, srcs) in zip(site.target_keys(), site.interpolate(),
                                     site._targets):
            unused.append(prefix + key)
            assert prefix + key in sd
            assert not torch.allclose(w, sd[prefix + key])
            assert torch.allclose(w, sum(coef[n] * t.weight for n, t in srcs))
        if case.kind == 'conv':  # ResNet-18 site 4: conv1 is its own
            assert site.sources == [('prev', )]
            assert torch.equal(site.block.conv1.weight,
                               sd[prefix + 'conv1.weight'])
        else:
            assert torch.equal(site.block.ffn.layers[1].weight,
                               sd[prefix + 'ffn.layers.1.weight'])
    prefixes = tuple(model._site_prefixes.values())
    state = model.state_dict()
    for k, v in sd.items():
        if not k.startswith(prefixes):
            assert torch.equal(state[k], v), k
    log = '\n'.join(logged)
    assert 'without a RepL plan' in log and all(k in log for k in unused)
    # the model's own (RepL) checkpoint loads strictly as before
    twin = case.build(mode='interpolate')
    twin.load_state_dict(model.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(twin.state_dict().values(),
                                          model.state_dict().values()))
    with torch.no_grad():
        site = next(iter(sites.values()))
        site.alpha.fill_(0.25)
    twin.load_state_dict(model.state_dict())
    assert float(next(iter(twin.site_modules().values())).alpha) == 0.25


def test_pretrained_init_cfg_loads_upstream(tmp_path):
    from mmdet.models.backbones import ResNet

    from repl_mm.models.det_resnet import RepLResNet
    ref = ResNet(depth=18)
    path = tmp_path / 'r18.pth'
    torch.save({'state_dict': ref.state_dict()}, path)
    model = RepLResNet(
        depth=18, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    assert torch.equal(model.layer1[0].conv1.weight,
                       ref.layer1[0].conv1.weight)
    assert torch.equal(model.layer3[1].conv2.weight,
                       ref.layer3[1].conv2.weight)
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


def _site_by_hand(site, neighbours, h):
    """A BasicBlock site's eval-mode output from the explicit formula of
    spec §3, reading the convs of ``neighbours`` (name -> block)."""
    mats = []
    for j, names in enumerate(site.sources, 1):
        if names == ('own', ):
            mats.append(getattr(site, f'weight{j}'))
            continue
        mats.append(
            sum(
                getattr(site, f'phi{j}_{n}')[:, None] *
                getattr(neighbours[n], f'conv{j}').weight.sum((2, 3))
                for n in names))
    x = h
    for m in mats:
        x = torch.einsum('oc,bchw->bohw', m, x)
    return torch.relu(site.scale * site.site_norm(x) + h)


@torch.no_grad()
def test_ema_copy_reads_its_own_neighbours():
    """mmengine's EMAHook deep-copies the model (spec §8): the copy's
    sites follow the copy's neighbours as they move, not the source's."""
    from mmengine.model import ExponentialMovingAverage

    from repl_mm.models.cls_resnet import RepLResNet_CIFAR
    model = RepLResNet_CIFAR(depth=20, replacement=dict(zero_init=False))
    model.eval()
    ema = ExponentialMovingAverage(model, momentum=0.5)
    ema.module.eval()
    record = model.replacement_plan.sites[0]
    assert (record.index, record.prev, record.next) == (5, 4, 6)
    src_site, site = model.layer2[1], ema.module.layer2[1]
    assert site.sources == [('next', ), ('prev', 'next')]
    own = {id(p) for p in ema.module.parameters()}
    assert all(id(w) in own for _, w in neighbour_weights(site))
    h = torch.rand(2, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in range(3):  # the first update copies, the next ones average
        for p in model.parameters():
            p.add_(0.1 * (step + 1))
        ema.update_parameters(model)
    ema_nbrs = {'prev': ema.module.layer2[0], 'next': ema.module.layer2[2]}
    src_nbrs = {'prev': model.layer2[0], 'next': model.layer2[2]}
    conv2 = ema_nbrs['prev'].conv2.weight
    assert not torch.allclose(conv2, src_nbrs['prev'].conv2.weight)
    src_out = src_site(h)
    out = site(h)
    assert torch.allclose(out, _site_by_hand(site, ema_nbrs, h), atol=1e-5)
    assert not torch.allclose(out, _site_by_hand(site, src_nbrs, h))
    # move the copy's neighbours: its site follows them, the source's
    # site does not
    for block in ema_nbrs.values():
        block.conv1.weight.mul_(-2.0)
        block.conv2.weight.add_(0.5)
    moved = site(h)
    assert not torch.allclose(moved, out)
    assert torch.allclose(moved, _site_by_hand(site, ema_nbrs, h), atol=1e-5)
    assert torch.equal(src_site(h), src_out)


def _cifar(**kwargs):
    from repl_mm.models.cls_resnet import RepLResNet_CIFAR
    torch.manual_seed(0)
    return RepLResNet_CIFAR(depth=20, **kwargs)


def _set_plan(sd, edit):
    """``sd`` with its recorded plan edited by ``edit(dict)``."""
    plan = decode_plan(sd['replacement_plan'])
    edit(plan)
    data = json.dumps(plan, sort_keys=True).encode()
    return {
        **sd, 'replacement_plan': torch.tensor(list(data), dtype=torch.uint8)
    }


def test_function_options_must_match():
    sd = _cifar(replacement=dict(residual=False)).state_dict()
    # same keys, same shapes: only the recorded plan tells them apart
    with pytest.raises(
            ValueError, match='residual: checkpoint False, '
            'model True'):
        _cifar().load_state_dict(sd)
    # options that do not change the function load
    _cifar(replacement=dict(residual=False, zero_init=False,
                            recompute=False)).load_state_dict(sd)
    _cifar(with_cp=True, replacement=dict(residual=False)).load_state_dict(sd)
    with pytest.raises(ValueError, match='neighbors'):
        _cifar(replacement=dict(residual=False,
                                neighbors='prev')).load_state_dict(
                                    sd, strict=False)


def test_vit_function_options_must_match():
    case = next(c for c in CASES if c.kind == 'transformer')
    sd = case.build(num_scalars=1).state_dict()  # alpha only: no beta key
    with pytest.raises(
            ValueError, match='num_scalars: checkpoint 1, '
            'model 2'):
        case.build().load_state_dict(sd, strict=False)
    sd = case.build(vit_weights='attn').state_dict()
    with pytest.raises(ValueError, match="vit_weights: checkpoint 'attn'"):
        case.build().load_state_dict(sd, strict=False)
    case.build(
        num_scalars=1, residual=False).load_state_dict(
            case.build(num_scalars=1).state_dict())  # residual: CNN only


def test_scale_loads_with_a_warning(monkeypatch):
    logged = []
    monkeypatch.setattr('repl_mm.models.base.print_log',
                        lambda msg, **kw: logged.append((msg, kw)))
    src = _cifar(replacement=dict(zero_init=False))
    model = _cifar(replacement=dict(scale=0.0))
    model.load_state_dict(src.state_dict())
    warnings = [m for m, kw in logged if kw.get('level') == logging.WARNING]
    assert len(warnings) == 1
    assert 'scale: checkpoint 1.0, model 0.0' in warnings[0]
    # loaded: the source's site norm gamma (1), not the model's init (0)
    assert torch.all(model.layer2[1].site_norm.weight == 1)
    # the model keeps its own scale: the sites are their skip paths
    assert float(model.layer2[1].scale) == 0.0


def test_old_plan_without_an_option_loads_with_its_default():
    sd = _cifar().state_dict()

    def drop_options(plan):
        for name in ('residual', 'num_scalars', 'vit_weights', 'neighbors',
                     'scale', 'static_from', 'recompute'):
            del plan['config'][name]

    old = _set_plan(sd, drop_options)
    _cifar().load_state_dict(old)
    with pytest.raises(
            ValueError, match='residual: checkpoint True, '
            'model False'):
        _cifar(replacement=dict(residual=False)).load_state_dict(old)


def test_with_cp_second_backward_adds_up():
    """A with_cp segment (a kept block with its fused site) recomputes in
    every backward; two passes give twice one pass, as without
    checkpointing."""

    def grads(with_cp, recompute, n):
        model = _cifar(
            with_cp=with_cp,
            replacement=dict(zero_init=False, recompute=recompute)).train()
        x = torch.rand(
            2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        out = model(x)[-1]
        loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
        for i in range(n):
            loss.backward(retain_graph=i < n - 1)
        return [p.grad for p in model.parameters()], model

    once, _ = grads(True, True, 1)
    twice, model = grads(True, True, 2)
    plain, _ = grads(False, False, 2)
    assert any(
        isinstance(m, NonReentrantCheckpoint) and m.tail
        for m in model.modules())  # a fused segment ran
    for a, b, c in zip(once, twice, plain):
        assert torch.allclose(2 * a, b, rtol=1e-4, atol=1e-6)
        assert torch.allclose(b, c, rtol=1e-4, atol=1e-6)
    assert int(model.layer2[1].site_norm.num_batches_tracked) == 1


WITH_CP = [
    c for c in CASES
    if c.name in ('det-r18', 'cls-cifar-r20', 'det-swin', 'cls-swin')
]


def _with_cp(case):
    torch.manual_seed(0)
    return case.cls('repl')(
        **case.kwargs, with_cp=True, replacement=dict(zero_init=False)).eval()


@pytest.mark.parametrize('case', WITH_CP, ids=[c.name for c in WITH_CP])
def test_with_cp_model_pickles(case):
    model = _with_cp(case)
    x = torch.rand(case.shape)
    ref = outputs(model, x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [
        torch.load(buf, weights_only=False),
        pickle.loads(pickle.dumps(model)),
        copy.deepcopy(model)
    ]
    for clone in copies:
        assert [type(m) for m in clone.modules()
                ] == [type(m) for m in model.modules()]
        assert all(torch.equal(a, b) for a, b in zip(outputs(clone, x), ref))


def test_with_cp_classes_are_distinct():
    names = {
        case.name: {
            type(m).__name__
            for m in _with_cp(case).modules()
            if isinstance(m, NonReentrantCheckpoint)
        }
        for case in WITH_CP
    }
    det, cls = names['det-r18'], names['cls-cifar-r20']
    assert det and cls and not det & cls
    assert all('mmdet' in n and n.endswith('BasicBlock') for n in det)
    assert all('mmpretrain' in n and n.endswith('BasicBlock') for n in cls)
    det, cls = names['det-swin'], names['cls-swin']
    assert det and cls and not det & cls
    assert all('mmdet' in n and n.endswith('SwinBlock') for n in det)
    assert all('mmpretrain' in n and n.endswith('SwinBlock') for n in cls)


def test_with_cp_model_loads_in_a_fresh_process(tmp_path):
    """Unpickling where the run-time classes were never made."""
    case = WITH_CP[0]
    model = _with_cp(case)
    x = torch.rand(case.shape)
    torch.save(model, tmp_path / 'model.pth')
    ref = [o.detach() for o in outputs(model, x)]
    torch.save({'x': x, 'out': ref}, tmp_path / 'ref.pth')
    script = (
        'import sys, torch\n'
        "m = torch.load(sys.argv[1], weights_only=False)\n"
        'ref = torch.load(sys.argv[2])\n'
        "out = m(ref['x'])\n"
        "assert all(torch.equal(a, b) for a, b in zip(out, ref['out']))\n"
        "print(sorted({type(b).__name__ for b in m.modules()"
        " if hasattr(b, 'tail')}))\n")
    res = subprocess.run([
        sys.executable, '-c', script,
        str(tmp_path / 'model.pth'),
        str(tmp_path / 'ref.pth')
    ],
                         capture_output=True,
                         text=True,
                         env={
                             **os.environ, 'OMP_NUM_THREADS': '1'
                         })
    assert res.returncode == 0, res.stderr
    assert 'NonReentrant_mmdet_models_backbones_resnet_BasicBlock' in \
        res.stdout
