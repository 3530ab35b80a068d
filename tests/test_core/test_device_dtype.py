"""Every tensor a site creates follows the device and dtype of the block it
replaces (spec §8), proven on the CPU: float64 and bf16 models, ``meta``
builds and surgery, synthesis in fp32 under fp16/bf16 autocast, SyncBN
process groups, EMA copies and static conversion.

The GPU failure (sites created on the CPU in float32 after mmengine moved
the model) has two CPU proxies here: a model cast to float64 or bf16, and
one on the ``meta`` device."""
import copy
import socket
import threading
from contextlib import contextmanager
from itertools import chain

import pytest
import torch
from torch import nn

from repl_mm.core import (ConvNeXtSite, ConvSite, InterpolatedBlock,
                          StaticConvNeXtSite, StaticConvSite,
                          StaticTransformerSite, TransformerSite, cnn_site,
                          synthesis)
from repl_mm.core.surgery import fresh_norm
from repl_mm.models.base import to_repl_backbone
from repl_mm.models.cls_convnext import RepLConvNeXt
from repl_mm.models.cls_resnet import RepLResNet_CIFAR
from repl_mm.models.cls_vit import RepLVisionTransformer
from repl_mm.utils.compat import autocast_disabled, is_autocast_enabled
from ..test_models.test_backbones.cases import TINY_CONVNEXT, TINY_VIT

KINDS = ['conv', 'transformer', 'convnext']
SITES = (ConvSite, TransformerSite, ConvNeXtSite, InterpolatedBlock,
         StaticConvSite, StaticTransformerSite, StaticConvNeXtSite)
# An upstream mmpretrain ResNet_CIFAR shaped like He et al.'s ResNet-20
# (16/32/64 channels), 6 BasicBlocks: the hook route's tiny CNN.
SMALL_CIFAR = dict(
    depth=18,
    num_stages=3,
    stem_channels=16,
    base_channels=16,
    strides=(1, 2, 2),
    dilations=(1, 1, 1),
    out_indices=(2, ))


def upstream(kind, **kwargs):
    """A tiny upstream backbone (the hook route's input)."""
    from mmpretrain.models.backbones import (ConvNeXt, ResNet_CIFAR,
                                             VisionTransformer)
    if kind == 'conv':
        return ResNet_CIFAR(**SMALL_CIFAR, **kwargs)
    if kind == 'convnext':
        return ConvNeXt(**TINY_CONVNEXT, **kwargs)
    return VisionTransformer(**TINY_VIT, **kwargs)


def build(kind, **replacement):
    """A tiny RepL backbone (the registry route)."""
    if kind == 'conv':
        return RepLResNet_CIFAR(depth=20, replacement=replacement)
    if kind == 'convnext':
        return RepLConvNeXt(**TINY_CONVNEXT, replacement=replacement)
    return RepLVisionTransformer(**TINY_VIT, replacement=replacement)


def sites(backbone):
    out = list(backbone.site_modules().values())
    assert out and all(isinstance(s, SITES) for s in out)
    return out


def tensors(module):
    return list(chain(module.parameters(), module.buffers()))


def assert_all(module, dtype=None, device=None):
    """Every floating parameter and buffer of ``module`` has ``dtype``;
    every tensor is on ``device``."""
    for name, t in chain(module.named_parameters(), module.named_buffers()):
        if dtype is not None and t.is_floating_point():
            assert t.dtype == dtype, (name, t.dtype)
        if device is not None:
            assert t.device.type == device, (name, t.device)


def outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def loss_of(outs):
    """A weighted sum of the outputs: the plain sum of a normalised output
    (ViT's final LayerNorm) is constant and has no gradient."""
    return sum((
        o.float() *
        torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum()
               for o in outs)


def cpu_autocasts_to(dtype) -> bool:
    """Whether this torch autocasts the CPU to ``dtype`` (torch 2.1: bf16
    only; fp16 raises)."""
    try:
        with torch.autocast('cpu', dtype=dtype):
            return is_autocast_enabled('cpu')
    except RuntimeError:
        return False


@contextmanager
def cpu_autocast(dtype):
    """CPU autocast to ``dtype``; skip where this torch has none."""
    if not cpu_autocasts_to(dtype):
        pytest.skip(f'no CPU autocast to {dtype} on torch '
                    f'{torch.__version__}')
    with torch.autocast('cpu', dtype=dtype):
        yield


def checkpoint_runs_on_meta() -> bool:
    """Whether non-reentrant checkpointing handles ``meta`` tensors (torch
    2.1 looks for a ``torch.meta`` device module and fails)."""
    from torch.utils.checkpoint import checkpoint
    x = torch.rand(2, device='meta', requires_grad=True)
    try:
        checkpoint(torch.sin, x, use_reentrant=False).sum().backward()
    except (AttributeError, RuntimeError):
        return False
    return True


def meta_recompute(recompute: bool) -> bool:
    """``recompute``, skipping where checkpointing cannot run on meta."""
    if recompute and not checkpoint_runs_on_meta():
        pytest.skip('non-reentrant checkpoint does not run on meta tensors '
                    f'on torch {torch.__version__}')
    return recompute


def record_synthesis(monkeypatch, backbone):
    """Every matrix the sites of ``backbone`` synthesize (also when backward
    recomputes them), and every folded chain, as lists filled while they
    run."""
    seen, folds = [], []

    def keep(out):
        if isinstance(out, dict):
            seen.extend(out.values())
        elif isinstance(out, (list, tuple)):
            seen.extend(out)
        else:
            seen.append(out)
        return out

    for site in sites(backbone):
        for name in ('synthesize', 'interpolate'):
            if hasattr(site, name):
                fn = getattr(site, name)
                monkeypatch.setattr(
                    site, name, lambda *a, _fn=fn, **k: keep(_fn(*a, **k)))
    fold = synthesis.fold_chain

    def folded(mats):
        out = fold(mats)
        folds.append(out)
        return out

    # apply_chain looks fold_chain up in synthesis; the site imports it
    monkeypatch.setattr(synthesis, 'fold_chain', folded)
    monkeypatch.setattr(cnn_site, 'fold_chain', folded, raising=False)
    return seen, folds


def test_autocast_disabled():
    x = torch.rand(2, 2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
        with autocast_disabled('cpu', 'meta', 'cpu'):
            assert not is_autocast_enabled('cpu')
            assert (x @ x).dtype == torch.float32
        assert is_autocast_enabled('cpu')
    with autocast_disabled('meta'):  # nothing to turn off
        assert (x @ x).dtype == torch.float32


# -- casts of a built model ------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
@pytest.mark.parametrize('kind', KINDS)
def test_registry_model_cast_after_build(kind, mode, dtype):
    model = build(kind, mode=mode, zero_init=False).to(dtype).train()
    assert_all(model, dtype)
    x = torch.rand(2, 3, 32, 32, dtype=dtype, requires_grad=True)
    outs = outputs(model(x))
    assert outs and all(o.dtype == dtype for o in outs)
    loss_of(outs).backward()
    assert x.grad is not None and x.grad.dtype == dtype
    # synthesis in at least fp32: bf16 is promoted, float64 is kept
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for site in sites(model):
        if isinstance(site, ConvSite):
            assert all(m.dtype == want for m in site.synthesize())
        elif isinstance(site, (TransformerSite, ConvNeXtSite)):
            assert all(m.dtype == want for m in site.synthesize().values())
        else:  # given to the block in its weights' dtype
            assert all(w.dtype == dtype for w in site.interpolate())


def test_interpolation_runs_in_fp32_for_a_bf16_model():
    model = build('conv', mode='interpolate').to(torch.bfloat16)
    site = sites(model)[0]
    with torch.no_grad():
        site.alpha.fill_(0.3)
        site.beta.fill_(0.7)
    want = [
        sum(
            getattr(site, 'alpha' if n == 'prev' else 'beta').float() *
            t.weight.float() for n, t in srcs).to(torch.bfloat16)
        for _, srcs in site._targets
    ]
    got = site.interpolate()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# -- meta ----------------------------------------------------------------
@contextmanager
def empty_init():
    """Every parameter and buffer registered while building goes to
    ``meta`` (accelerate's ``init_empty_weights``): upstream's ResNets call
    ``.item()`` while building, which ``torch.device('meta')`` forbids."""
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def parameter(self, name, param):
        register_parameter(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(
                param.to('meta'), requires_grad=param.requires_grad)

    def buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, tensor, persistent)
        if tensor is not None and not tensor.is_meta:
            self._buffers[name] = tensor.to('meta')

    nn.Module.register_parameter = parameter
    nn.Module.register_buffer = buffer
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter
        nn.Module.register_buffer = register_buffer


@pytest.mark.parametrize(
    'kind,on_meta', [
        ('conv', empty_init),
        ('transformer', empty_init),
        ('transformer', lambda: torch.device('meta')),
    ],
    ids=['conv', 'vit', 'vit-device-context'])
def test_meta_build_materialised_with_to_empty(kind, on_meta):
    """FSDP / FlexibleRunner style: build on ``meta``, ``to_empty``, then
    initialise or load. ``scale`` (in no state dict) must come back."""
    options = dict(scale=0.5, zero_init=False)
    ref = build(kind, **options)
    ref.init_weights()
    with on_meta():
        model = build(kind, **options)
    assert all(t.is_meta for t in tensors(model))
    model.to_empty(device='cpu')
    for site in sites(model):
        assert site.scale.item() == 0.5  # before any initialisation
    model.init_weights()
    for site in sites(model):
        assert site.scale.item() == 0.5
        for t in tensors(site):
            assert torch.isfinite(t).all()
        phis = [
            p for n, p in site.named_parameters()
            if n.startswith(('phi', 'alpha', 'beta'))
        ]
        assert phis and all(torch.all(p == 0.5) for p in phis)
    model.load_state_dict(ref.state_dict())  # strict, no scale key
    model.eval(), ref.eval()
    x = torch.rand(2, 3, 32, 32)
    for a, b in zip(outputs(model(x)), outputs(ref(x))):
        assert torch.equal(a, b)


def test_scale_survives_moves_and_casts():
    model = build('conv', scale=0.25)
    site = sites(model)[0]
    site.scale.fill_(0.75)  # set after the build (A.12 diagnostics)
    model.to_empty(device='cpu')
    assert site.scale.item() == 0.75
    model.double()
    assert site.scale.dtype == torch.float64 and site.scale.item() == 0.75
    model.to('meta').to_empty(device='cpu')  # meta holds no value
    assert site.scale.item() == 0.25
    assert 'scale' not in ''.join(model.state_dict())


@pytest.mark.parametrize('mode,recompute', [('synthesize', False),
                                            ('synthesize', True),
                                            ('interpolate', False),
                                            ('static', False)])
@pytest.mark.parametrize('kind', KINDS)
def test_surgery_on_a_meta_model(kind, mode, recompute):
    """The hook route on a model already moved (here to ``meta``): every
    tensor surgery creates is there too; forward and backward run on
    shapes only."""
    backbone = upstream(kind).to('meta')
    to_repl_backbone(
        backbone,
        dict(
            interval=2,
            mode=mode,
            zero_init=False,
            recompute=meta_recompute(recompute)))
    assert_all(backbone, device='meta')
    x = torch.rand(2, 3, 32, 32, device='meta', requires_grad=True)
    backbone.train(mode != 'static')  # static sites are eval-only
    outs = outputs(backbone(x))
    assert all(o.is_meta for o in outs)
    loss_of(outs).backward()
    assert x.grad.shape == x.shape
    for site in sites(backbone):
        trained = [
            p for n, p in site.named_parameters()
            if n.startswith(('phi', 'alpha', 'beta'))
        ]
        assert mode == 'static' or trained
        assert all(p.grad is not None and p.grad.is_meta for p in trained)


# -- autocast ------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
@pytest.mark.parametrize('kind', KINDS)
def test_synthesis_in_fp32_under_autocast(monkeypatch, kind, mode, dtype):
    model = build(kind, mode=mode, zero_init=False).train()
    seen, folds = record_synthesis(monkeypatch, model)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with cpu_autocast(dtype):
        loss = loss_of(outputs(model(x)))
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for site in sites(model):
        assert all(
            p.grad is not None and torch.isfinite(p.grad).all()
            for n, p in site.named_parameters()
            if n.startswith(('phi', 'alpha', 'beta')))
    assert seen and all(m.dtype == torch.float32 for m in seen)
    assert all(m.dtype == torch.float32 for m in folds)
    if kind == 'conv' and mode == 'synthesize':
        # the BasicBlock chains of the sites (16x16 and 8x8 maps of a
        # batch of 2) are folded
        assert len(folds) >= 2


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('kind', KINDS)
def test_static_sites_under_autocast(kind, dtype):
    from repl_mm.converters.to_static import static_replacement, to_static
    options = dict(interval=2, zero_init=False, scale=0.7)
    repl = build(kind, **options).eval()
    ref = build(kind, **static_replacement(options))
    to_static(repl, ref)
    static = build(kind, **static_replacement(options))
    with cpu_autocast(dtype):
        to_static(repl, static)  # the conversion synthesizes in fp32
    for (k, a), b in zip(ref.state_dict().items(),
                         static.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with cpu_autocast(dtype):
        outs = outputs(static.eval()(x))
    loss_of(outs).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _a_buffer_elsewhere(site):
    """Put ``scale`` on another device than the weights and the input,
    as the hook route did (a CPU buffer beside GPU weights); ``meta`` is
    the other device here."""
    site._buffers['scale'] = site.scale.to('meta')


@pytest.mark.parametrize('kind', KINDS)
def test_autocast_decision_follows_the_input_not_the_scale(kind):
    site = sites(build(kind, zero_init=False))[0]
    _a_buffer_elsewhere(site)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for mats in (site.synthesize(), site.synthesize('cpu')):
            mats = mats.values() if isinstance(mats, dict) else mats
            assert all(m.dtype == torch.float32 for m in mats)


# -- fresh norms and process groups --------------------------------------
def _randomized(norm):
    with torch.no_grad():
        for t in tensors(norm):
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    for p in norm.parameters():
        p.requires_grad_(False)
    return norm


@pytest.mark.parametrize(
    'norm', [
        lambda: nn.BatchNorm2d(8, eps=1e-3, momentum=0.03),
        lambda: nn.SyncBatchNorm(8),
        lambda: nn.GroupNorm(2, 8),
        lambda: nn.LayerNorm(8, eps=1e-6),
        lambda: nn.BatchNorm2d(8, affine=False),
    ],
    ids=['bn', 'syncbn', 'gn', 'ln', 'bn-no-affine'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_fresh_norm_is_a_reset_copy(norm, dtype):
    norm = _randomized(norm().to(dtype))
    want = copy.deepcopy(norm)
    want.reset_parameters()
    new = fresh_norm(norm)
    assert type(new) is type(norm) and repr(new) == repr(norm)
    a, b = want.state_dict(), new.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert all(p.requires_grad for p in new.parameters())
    ids = {id(t) for t in tensors(norm)}
    assert not any(id(t) in ids for t in tensors(new))


def test_fresh_norm_shares_a_process_group():
    """A SyncBN that holds a process group (torch's after DDP conversion):
    copying the group raises "cannot pickle 'ProcessGroup'"; a lock stands
    in for it (it cannot be copied either)."""
    group = threading.Lock()
    norm = nn.SyncBatchNorm(8, process_group=group)
    with pytest.raises(TypeError):
        copy.deepcopy(norm)
    new = fresh_norm(norm)
    assert new.process_group is group
    assert list(new.state_dict()) == list(norm.state_dict())


def syncbn_backbone(group):
    backbone = upstream('conv', norm_cfg=dict(type='SyncBN'))
    for m in backbone.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.process_group = group
    return backbone


@pytest.mark.parametrize('mode', ['synthesize', 'static'])
def test_conv_site_from_syncbn_blocks_with_a_process_group(mode):
    group = threading.Lock()
    backbone = syncbn_backbone(group)
    plan = to_repl_backbone(backbone, dict(interval=2, mode=mode))
    assert plan.indices
    for site in sites(backbone):
        # a static site folds its batch norm (built from a fresh norm)
        norm = getattr(site, 'site_norm', None)
        assert norm is not None or mode == 'static'
        if norm is not None:
            assert isinstance(norm, nn.SyncBatchNorm)
            assert norm.process_group is group
    backbone.train(mode != 'static')
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss_of(outputs(backbone(x))).backward()
    assert torch.isfinite(x.grad).all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    """A real process group (gloo, world size 1), destroyed after."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip('torch.distributed is not available')
    if dist.is_initialized():
        pytest.skip('a default process group is already initialised')
    dist.init_process_group(
        'gloo',
        init_method=f'tcp://127.0.0.1:{free_port()}',
        rank=0,
        world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_fresh_norms_of_real_process_groups(gloo_group):
    from mmcv.ops import SyncBatchNorm as MMSyncBN
    torch_bn = nn.SyncBatchNorm(8, process_group=gloo_group)
    mmcv_bn = MMSyncBN(8)  # group: the default (WORLD)
    for norm, attr in ((torch_bn, 'process_group'), (mmcv_bn, 'group')):
        group = getattr(norm, attr)
        assert group is not None
        with pytest.raises(TypeError, match='pickle'):
            copy.deepcopy(norm)
        new = fresh_norm(norm)
        assert type(new) is type(norm) and getattr(new, attr) is group
        assert list(new.state_dict()) == list(norm.state_dict())
    backbone = syncbn_backbone(gloo_group)
    to_repl_backbone(backbone, dict(interval=2))
    for site in sites(backbone):
        assert site.site_norm.process_group is gloo_group
    backbone.eval()  # train mode would synchronise: GPU only
    assert all(
        torch.isfinite(o).all()
        for o in outputs(backbone(torch.rand(2, 3, 32, 32))))


# -- copies and conversions of a float64 model ---------------------------
@pytest.mark.parametrize('kind', KINDS)
def test_ema_copy_of_a_float64_model(kind):
    from mmengine.model import ExponentialMovingAverage
    backbone = upstream(kind).double()
    to_repl_backbone(backbone, dict(interval=2, zero_init=False, scale=0.5))
    assert_all(backbone, torch.float64)
    ema = ExponentialMovingAverage(backbone, momentum=0.5)
    assert_all(ema.module, torch.float64)
    # the copy's sites read the copy's neighbours
    own = {id(p) for p in ema.module.parameters()}
    for site in sites(ema.module):
        assert site.scale.item() == 0.5
        assert all(id(t) in own for t in site.trainable_tensors())
    backbone.train()
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    loss_of(outputs(backbone(x))).backward()
    opt.step()
    ema.update_parameters(backbone)
    assert_all(ema.module, torch.float64)
    ema.module.eval()
    outs = outputs(ema.module(x))
    assert all(o.dtype == torch.float64 and torch.isfinite(o).all()
               for o in outs)


@pytest.mark.parametrize('trained', ['synthesize', 'interpolate'])
@pytest.mark.parametrize('kind', KINDS)
def test_static_conversion_of_a_float64_model(kind, trained):
    from repl_mm.converters.to_static import (max_output_error,
                                              static_replacement, to_static)
    from ..test_converters.test_static import randomize
    options = dict(interval=2, mode=trained, zero_init=False, scale=0.7)
    repl = upstream(kind).double()
    to_repl_backbone(repl, options)
    randomize(repl)
    static = upstream(kind).double()
    to_repl_backbone(static, static_replacement(options))
    assert_all(static, torch.float64)  # the static sites too
    to_static(repl, static)
    assert_all(static, torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    # float64 end to end: a conversion through fp32 would be ~1e-7 off
    assert max_output_error(repl, static, x) < 1e-12
