"""FLOPs of a training step, counted with :class:`mmengine.analysis.
FlopAnalyzer` in its convention (one multiply-add is one FLOP;
convolutions, linears, matmuls and norms counted, element-wise ops not).

- :func:`forward_flops`: a traced forward in train mode, without autograd,
  with a handle for ``aten::scaled_dot_product_attention`` (which mmengine
  lacks: :func:`sdpa_flop_jit`).
- :func:`synthesis_flops`: the sites' weight-space synthesis, per site,
  with and without the element-wise ops.
- :func:`track_recompute`: which modules backward re-runs (checkpointed
  blocks, recomputing sites), found by a recording hook on a training
  forward.
- :func:`step_flops`: ``3 x forward + recompute``, the synthesis apart.

``docs/benchmark.md`` states the convention. Torch and mmengine only.
"""
import math
from contextlib import contextmanager
from typing import Callable, Collection, Dict, Optional

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import elementwise_flop_counter, get_shape
from torch import nn

from ..core import SYNTHESIZING_SITES, NonReentrantCheckpoint, iter_sites


def sdpa_flop_jit(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention (no mmengine handle): Q K^T and
    the product with V, q (..., N, d), k (..., S, d), v (..., S, dv)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


# ops of the weight-space synthesis that mmengine counts as free
_ELEMENTWISE = {
    'aten::mul': elementwise_flop_counter(0, 1),
    'aten::add': elementwise_flop_counter(0, 1),
    'aten::sum': elementwise_flop_counter(1, 0),
}


class _Call(nn.Module):
    """Holds ``model`` (so its weights are traced as parameters) and runs
    ``fn(model, *args)``."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, *args):
        return self._fn(self.model, *args)


class SynthesisCall(nn.Module):
    """Calls one site's ``synthesize()``; the site is not registered (the
    wrapper that traces it holds the model), so the trace scopes it by this
    shim."""

    def __init__(self, site: nn.Module):
        super().__init__()
        self.__dict__['site'] = site

    def forward(self) -> tuple:
        mats = self.site.synthesize()
        return tuple(mats.values() if isinstance(mats, dict) else mats)


def find_sites(model: nn.Module) -> Dict[str, nn.Module]:
    """The sites of ``model`` that synthesize their weights
    (:data:`~repl_mm.core.SYNTHESIZING_SITES`: ``ConvSite``,
    ``TransformerSite``) by module name, in forward order."""
    return {
        ref.name: ref.module
        for ref in iter_sites(model)
        if isinstance(ref.module, SYNTHESIZING_SITES)
    }


def _analyze(module: nn.Module,
             inputs: tuple,
             handles: Optional[dict] = None) -> FlopAnalyzer:
    analyzer = FlopAnalyzer(module, inputs)
    analyzer.set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_jit,
                           **(handles or {}))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer


def synthesis_flops(
        model: nn.Module,
        names: Optional[Collection[str]] = None) -> Dict[str, Dict[str, int]]:
    """FLOPs of one weight-space synthesis per site (per forward, any
    batch), by site name. ``counted``: what mmengine's default handles
    count (matmuls; also inside the traced forward); ``total``: with the
    element-wise ops (kernel tap sums, channel scaling, sums) too.

    Args:
        model (nn.Module): The model holding the sites and their
            neighbours.
        names (Collection[str], optional): Only these sites (names in
            ``model``). Defaults to all.
    """
    sites = find_sites(model)
    if names is not None:
        sites = {n: s for n, s in sites.items() if n in names}
    if not sites:
        return dict(counted={}, total={})
    shims = nn.ModuleList(SynthesisCall(s) for s in sites.values())
    wrapper = _Call(model, lambda m, _: tuple(t for s in shims for t in s()))
    wrapper.shims = shims
    out = {}
    with torch.no_grad():
        for kind, handles in (('counted', None), ('total', _ELEMENTWISE)):
            per = _analyze(wrapper, (torch.zeros(1), ), handles).by_module()
            out[kind] = {n: per[f'shims.{i}'] for i, n in enumerate(sites)}
    return out


def _tensor_mode(model: nn.Module, x: torch.Tensor):
    return model(x, mode='tensor')


def forward_flops(model: nn.Module,
                  inputs: torch.Tensor,
                  call: Callable = _tensor_mode) -> dict:
    """Traced forward in train mode, without autograd: {'total',
    'by_module' (names of ``model``), 'unsupported'}.

    Args:
        model (nn.Module): Holds every weight the forward reads.
        inputs (Tensor): Its input.
        call (Callable): ``call(model, inputs)`` runs the forward. Defaults
            to the network without the losses (``mode='tensor'``); e.g.
            ``lambda m, x: block(x)`` traces one block of ``model``.
    """
    wrapper = _Call(model, call)
    with torch.no_grad():
        analyzer = _analyze(wrapper, (inputs, ))
        by_module = {
            k[len('model.'):]: v
            for k, v in analyzer.by_module().items() if k.startswith('model.')
        }
        return dict(
            total=analyzer.total(),
            by_module=by_module,
            unsupported=dict(analyzer.unsupported_ops()))


@contextmanager
def track_recompute(model: nn.Module):
    """Yield a dict that a training forward inside the block fills with
    the modules whose forward backward re-runs: ``'all'`` for a block or
    site checkpointed non-reentrantly (``with_cp`` and an input that needs
    grad, as their forward decides), ``'update'`` for a recomputing site
    (its light update, not its synthesis)."""
    found: Dict[str, str] = {}

    def hook(name):

        def pre(mod, args):
            if not torch.is_grad_enabled():
                return
            if mod.with_cp and args[0].requires_grad:
                found[name] = 'all'
            elif getattr(mod, 'recompute', False) and not mod.with_cp and (
                    args[0].requires_grad or any(p.requires_grad
                                                 for p in mod.parameters())):
                found[name] = 'update'

        return pre

    handles = [
        m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
        if isinstance(m, SYNTHESIZING_SITES + (NonReentrantCheckpoint, ))
    ]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def step_flops(model: nn.Module,
               inputs: torch.Tensor,
               recomputed: Dict[str, str],
               cache: Optional[dict] = None,
               key=None,
               call: Callable = _tensor_mode,
               sites: Optional[Collection[str]] = None) -> dict:
    """FLOPs of one training step (see the module docstring).

    Args:
        model (nn.Module): In train mode.
        inputs (Tensor): (B, 3, H, W), or what ``call`` takes.
        recomputed (dict[str, str]): From :func:`track_recompute`.
        cache (dict, optional): Forward analyses by ``key``: methods that
            differ only in checkpointing, stochastic depth or recompute
            trace the same forward.
        key (hashable, optional): Cache key.
        call (Callable): The forward, as in :func:`forward_flops`.
            Defaults to the network in ``mode='tensor'``.
        sites (Collection[str], optional): The sites that ``call`` runs
            (names in ``model``). Defaults to all of ``model``'s.

    Returns:
        dict: ``forward`` (per batch, synthesis excluded), ``synthesis``
        (per forward, element-wise ops included), ``recompute`` (forward
        re-run in backward, synthesis excluded), ``step`` (3 x forward +
        recompute) and ``synthesis_step`` (3 x synthesis).
    """
    if cache is not None and key in cache:
        fwd = cache[key]
    else:
        fwd = forward_flops(model, inputs, call)
        if cache is not None:
            cache[key] = fwd
    syn = synthesis_flops(model, sites)
    forward = fwd['total'] - sum(syn['counted'].values())
    recompute = sum(fwd['by_module'].get(n, 0) -
                    (syn['counted'].get(n, 0) if kind == 'update' else 0)
                    for n, kind in recomputed.items())
    synthesis = sum(syn['total'].values())
    return dict(
        forward=forward,
        synthesis=synthesis,
        recompute=recompute,
        step=3 * forward + recompute,
        synthesis_step=3 * synthesis,
        unsupported=fwd['unsupported'])
