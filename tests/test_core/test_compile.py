"""RepL under ``torch.compile``: every site path traces without a graph
break inside the site, and a compiled training step gives eager's outputs,
gradients and norm statistics.

Most checks compile with the ``aot_eager`` backend: dynamo's tracing and
AOTAutograd's forward/backward partition (where activation checkpointing is
turned into recomputation) are what RepL must get through, and they take
seconds here; inductor's code generation is backend work that RepL does not
touch, checked once on a whole network (about 40 s on 2 CPU cores).
"""
import copy
from pathlib import Path

import pytest
import torch

import repl_mm
from repl_mm.core import (ConvNeXtSite, ConvSite, InterpolatedBlock,
                          TransformerSite)
from repl_mm.utils.compat import compiles_sites
from ..test_models.test_backbones.cases import CASES, IDS
from ..test_models.test_backbones.test_contract import outputs, weighted_loss

CORE = str(Path(repl_mm.__file__).parent / 'core')
SITES = (ConvSite, TransformerSite, ConvNeXtSite, InterpolatedBlock)

VARIANTS = {
    'default': (dict(), dict()),
    'norecompute': (dict(), dict(recompute=False)),
    'with_cp': (dict(with_cp=True), dict()),
    'interpolate': (dict(), dict(mode='interpolate')),
    'interpolate-with_cp': (dict(with_cp=True), dict(mode='interpolate')),
}
# one conv case per block type and the ViT
COMPILE_CASES = [
    c for c in CASES
    if c.name in ('det-r18', 'cls-r50', 'cls-cifar-r20', 'cls-vit')
]


def build(case, variant):
    kwargs, replacement = VARIANTS[variant]
    torch.manual_seed(0)
    model = case.cls('repl')(
        **case.kwargs,
        **kwargs,
        replacement=dict(zero_init=False, **replacement))
    assert any(isinstance(m, SITES) for m in model.modules())
    return model.train()


def step(model, x, compiled=None):
    """Outputs, parameter gradients and buffers of ``model`` after one
    training step (run through ``compiled`` when given)."""
    outs = outputs(model if compiled is None else compiled, x)
    weighted_loss(outs).backward()
    return ([o.detach() for o in outs], {
        n: p.grad
        for n, p in model.named_parameters()
    }, {
        n: b.clone()
        for n, b in model.named_buffers()
    })


def assert_same_step(ref, got, atol):
    """Outputs within ``atol``; each gradient within ``atol`` of the
    reference relative to its norm (compiled graphs may sum in another
    order); norm statistics as eager's, updated once."""
    for a, b in zip(ref[0], got[0]):
        assert torch.allclose(a, b, atol=atol)
    for name, g in ref[1].items():
        assert g is not None and got[1][name] is not None, name
        err = (g - got[1][name]).norm() / g.norm().clamp_min(1e-12)
        assert err < atol, (name, err.item())
    for name, b in ref[2].items():
        if b.is_floating_point():
            assert torch.allclose(b, got[2][name], atol=atol), name
        else:  # num_batches_tracked: updated once, also compiled
            assert torch.equal(b, got[2][name]), name


def breaks_inside_core(model, x):
    """Graph breaks whose Python stack passes through ``repl_mm/core``
    (none expected where torch traces the sites; on older torch they run
    eagerly, a graph break each by design: nothing to count)."""
    if not compiles_sites():
        return []
    explained = torch._dynamo.explain(model)(x)
    inside = []
    for reason in explained.break_reasons:
        frames = [f.filename for f in (reason.user_stack or ())]
        if any(f.startswith(CORE) for f in frames):
            inside.append(reason.reason)
    return inside


# Every variant on the BasicBlock nets and the ViT; the Bottleneck net,
# whose 16 blocks take five times as long to trace, on the two paths where
# its three-conv chain differs (recompute region, fused with_cp segments).
STEP_CASES = [(c, v) for c in COMPILE_CASES for v in sorted(VARIANTS)
              if c.name != 'cls-r50' or v in ('default', 'with_cp')]


@pytest.mark.parametrize(
    'case,variant', STEP_CASES, ids=[f'{c.name}-{v}' for c, v in STEP_CASES])
def test_compiled_step_equals_eager(case, variant):
    torch._dynamo.reset()
    model = build(case, variant)
    compiled_copy = copy.deepcopy(model)
    x = torch.rand(case.shape)
    assert not breaks_inside_core(copy.deepcopy(model), x)
    ref = step(model, x)
    got = step(compiled_copy, x,
               torch.compile(compiled_copy, backend='aot_eager'))
    assert_same_step(ref, got, atol=1e-5)


@pytest.mark.parametrize('variant', ['default', 'with_cp'])
def test_uncompiled_backend_step_equals_eager(variant):
    """``backend='eager'`` (dynamo's graphs run as they are, not
    functionalized): a traced checkpoint region runs as an eager
    checkpoint, whose recomputation would replay the BN statistics'
    in-place updates; the regions mutate copies of the buffers instead, so
    the step matches eager, statistics updated once."""
    torch._dynamo.reset()
    case = next(c for c in CASES if c.name == 'cls-cifar-r20')
    model = build(case, variant)
    compiled_copy = copy.deepcopy(model)
    x = torch.rand(case.shape)
    ref = step(model, x)
    got = step(compiled_copy, x, torch.compile(compiled_copy, backend='eager'))
    assert_same_step(ref, got, atol=1e-5)


def test_compiled_grouped_step_equals_eager():
    """A ResNeXt (grouped-conv sites, spec §9.1: GroupedConvUpdate and
    grouped folds), the default options, compiled with ``aot_eager``."""
    torch._dynamo.reset()
    case = next(c for c in CASES if c.name == 'cls-x50')
    model = build(case, 'default')
    compiled_copy = copy.deepcopy(model)
    x = torch.rand(case.shape)
    ref = step(model, x)
    got = step(compiled_copy, x,
               torch.compile(compiled_copy, backend='aot_eager'))
    assert_same_step(ref, got, atol=1e-5)


@pytest.mark.skipif(
    not compiles_sites(),
    reason='this torch cannot trace the sites: they run eagerly between '
    'compiled graphs (repl_mm.utils.compat.compiles_sites)')
@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_no_graph_break_inside_a_site(case):
    """Over every registered backbone, default options: the only graph
    breaks are upstream's (e.g. mmcv's drop_path on a numpy rate)."""
    torch._dynamo.reset()
    model = build(case, 'default')
    assert not breaks_inside_core(model, torch.rand(case.shape))


def test_inductor_step_equals_eager():
    """The default backend on a CIFAR ResNet with the default options
    (recompute through a checkpoint region)."""
    torch._dynamo.reset()
    case = next(c for c in CASES if c.name == 'cls-cifar-r20')
    model = build(case, 'default')
    compiled_copy = copy.deepcopy(model)
    x = torch.rand(2, 3, 16, 16)
    ref = step(model, x)
    got = step(compiled_copy, x, torch.compile(compiled_copy))
    # inductor fuses and reorders float reductions
    assert_same_step(ref, got, atol=1e-3)


def test_compiled_autocast_step():
    """bf16 autocast on the CPU, compiled: synthesis stays fp32, the step
    matches eager autocast up to bf16 rounding."""
    torch._dynamo.reset()
    case = next(c for c in CASES if c.name == 'cls-cifar-r20')
    model = build(case, 'default')
    twin = copy.deepcopy(model)
    x = torch.rand(case.shape)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = step(model, x)
        got = step(twin, x, torch.compile(twin, backend='aot_eager'))
    for a, b in zip(ref[0], got[0]):
        assert torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2)
    for name, g in ref[1].items():
        rel = (g - got[1][name]).norm() / g.norm().clamp_min(1e-12)
        assert rel < 5e-2, name


@pytest.mark.skipif(
    not compiles_sites(),
    reason="torch 2.1 cannot compile mmpretrain's ViT with drop_path_rate "
    "> 0 at all (AOTAutograd fails on the kept layers' numpy rates)")
def test_compiled_drop_path_trains():
    """Stochastic depth inside sites under compile: finite outputs and a
    gradient for every parameter (the random draws differ from eager's)."""
    torch._dynamo.reset()
    case = next(c for c in CASES if c.name == 'cls-vit')
    torch.manual_seed(0)
    model = case.cls('repl')(
        **case.kwargs, drop_path_rate=0.3,
        replacement=dict(zero_init=False)).train()
    x = torch.rand(case.shape)
    assert not breaks_inside_core(copy.deepcopy(model), x)
    outs, grads, _ = step(model, x, torch.compile(model, backend='aot_eager'))
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(
        g is not None and torch.isfinite(g).all() for g in grads.values())


def saved_bytes(model, x, backend=None):
    """Bytes autograd keeps for backward in one training step of ``model``
    (compiled with ``backend`` when given; the compiling step first,
    unmetered), weights and buffers not counted."""
    from repl_mm.analysis.memory import SavedTensorMeter
    run = model if backend is None else torch.compile(model, backend=backend)
    if backend is not None:
        weighted_loss(outputs(run, x)).backward()
    with SavedTensorMeter([*model.parameters(), *model.buffers()]) as meter:
        outs = outputs(run, x)
    weighted_loss(outs).backward()
    return meter.bytes


# A BasicBlock net (the lean BN update in eager) and the ViT (the lean
# LN/GELU update), at inputs whose update maps are a measurable saving.
MEMORY_CASES = {
    'cls-cifar-r20': (8, 3, 32, 32),
    'cls-vit': (8, 3, 32, 32),
}


@pytest.mark.parametrize('name', sorted(MEMORY_CASES))
def test_compiled_recompute_keeps_what_eager_keeps(name):
    """Compiled, a default (``recompute=True``) site keeps for backward
    what it keeps in eager mode, not what a ``recompute=False`` site
    keeps: what recompute saves per step (the bytes of ``recompute=False``
    less the default's) survives compilation to within 10 %, with the
    default partition (``aot_eager``) and with inductor's min-cut
    partition (``aot_eager_decomp_partition``: inductor's decompositions
    and partitioner without its code generation, seconds instead of a
    minute here)."""
    case = next(c for c in CASES if c.name == name)
    x = torch.rand(MEMORY_CASES[name])
    saving = {}
    backends = ('aot_eager', 'aot_eager_decomp_partition')
    for backend in (None, *backends):
        kept = {}
        for variant in ('default', 'norecompute'):
            torch._dynamo.reset()
            kept[variant] = saved_bytes(build(case, variant), x, backend)
        saving[backend] = kept['norecompute'] - kept['default']
    assert saving[None] > 0, saving
    for backend in backends:
        assert saving[backend] >= 0.9 * saving[None], (backend, saving)
