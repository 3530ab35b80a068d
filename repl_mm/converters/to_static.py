"""Export a trained RepL model as a static one for deployment (paper
A.5.3).

A static model is the RepL model's own config with
``replacement=dict(mode='static', static_from=<trained mode>, ...)``: the
same plan, with every site an ordinary weight computed once here (see
:mod:`repl_mm.core.static`). The conversion

1. builds the RepL model from the config and loads its checkpoint
   (strict; :func:`repl_mm.apis.init_model`);
2. builds the static twin from the same config with ``mode='static'``;
3. computes every site's static weights under ``torch.no_grad`` in eval
   mode (:func:`to_static`) and copies every other weight unchanged;
4. checks that both models give equal eval outputs on a random batch
   (:func:`check_equal`) before anything is written.

:func:`convert_checkpoint` does all of it and writes ``<name>.pth``
(``state_dict`` + plain ``meta``: loads with
``torch.load(weights_only=True)``) and ``<name>.py`` (the static config).
:func:`benchmark_inference` measures both models' eval forward.
"""
import copy
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import print_log
from torch import Tensor, nn

from ..analysis.cases import default_input_size
from ..analysis.device import peak_memory, resolve_device
from ..analysis.profiling import time_round_robin
from ..apis import check_output, init_model, read_checkpoint, repl_backbones
from ..core import STATIC_FROM, iter_sites, load_static_site
from ..models.base import PLAN_KEY, RepLBackboneMixin, repl_classes


# -- configs ---------------------------------------------------------------
def static_replacement(replacement: Optional[dict]) -> dict:
    """``replacement=dict(...)`` of the static twin of a trained model.

    Args:
        replacement (dict, optional): The trained model's options (None:
            the defaults, ``mode='synthesize'``).

    Returns:
        dict: The same options with ``mode='static'`` and ``static_from``
        set to the trained mode.

    Raises:
        ValueError: If the trained mode has no sites to make static.
    """
    out = dict(replacement or {})
    mode = out.get('mode', 'synthesize')
    if mode not in STATIC_FROM:
        raise ValueError(
            f'replacement mode {mode!r} cannot be made static: only a model '
            f'trained with mode in {STATIC_FROM} has sites whose operator '
            'can be computed once')
    out.update(mode='static', static_from=mode)
    return out


def _repl_names() -> set:
    return {c.__name__ for c in repl_classes()}


def _is_pretrained(init) -> bool:
    return isinstance(init, dict) and init.get('type') == 'Pretrained'


def drop_pretrained(init_cfg):
    """``init_cfg`` without its ``Pretrained`` entries.

    Args:
        init_cfg (dict | list[dict] | None): A module's ``init_cfg``.

    Returns:
        dict | list[dict] | None: None for a ``Pretrained`` dict; for a
        list, its other entries (None if none is left); anything else
        unchanged.
    """
    if _is_pretrained(init_cfg):
        return None
    if isinstance(init_cfg,
                  (list, tuple)) and any(_is_pretrained(c) for c in init_cfg):
        kept = [c for c in init_cfg if not _is_pretrained(c)]
        return kept or None
    return init_cfg


def _static_node(node, names: set, path: str, found: List[str]):
    """In place: every RepL backbone dict under ``node`` made static."""
    if isinstance(node, dict):
        if str(node.get('type', '')).split('.')[-1] in names:
            node['replacement'] = static_replacement(node.get('replacement'))
            if 'init_cfg' in node:
                # Static sites load only from a static checkpoint.
                node['init_cfg'] = drop_pretrained(node['init_cfg'])
            found.append(path)
        for k, v in node.items():
            _static_node(v, names, f'{path}.{k}', found)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _static_node(v, names, f'{path}[{i}]', found)


def static_config(cfg: Config) -> Config:
    """The static twin's config: ``cfg`` with every RepL backbone's
    ``replacement`` made static (:func:`static_replacement`), the
    ``Pretrained`` entries of their ``init_cfg`` (:func:`drop_pretrained`)
    and the model's ``pretrained`` dropped
    (a static model gets its weights from its static checkpoint only),
    and ``repl_mm`` in ``custom_imports``.

    Raises:
        ValueError: If the model config names no RepL backbone.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f'expected an mmengine Config, got {type(cfg)}')
    out = copy.deepcopy(cfg)
    model = out.model.to_dict()
    found: List[str] = []
    _static_node(model, _repl_names(), 'model', found)
    if not found:
        hooks = [h.get('type') for h in out.get('custom_hooks', [])]
        why = (' (it switches RepL on with ReplacementHook: convert the '
               'config that publish_model.py writes beside the published '
               'checkpoint, which names the RepL backbone)'
               if 'ReplacementHook' in hooks else '')
        raise ValueError(f'model config names no RepL backbone (one of '
                         f'{sorted(_repl_names())}){why}')
    if model.get('pretrained') is not None:
        model['pretrained'] = None
    out.model = model
    imports = list(out.get('custom_imports', {}).get('imports', []))
    if 'repl_mm' not in imports:
        imports.append('repl_mm')
    out.custom_imports = dict(imports=imports, allow_failed_imports=False)
    return out


# -- models ----------------------------------------------------------------
def _site_pairs(model: nn.Module, static_model: nn.Module):
    """[(full key prefix, trained site, static stand-in)], after checking
    that the two models are a trained RepL model and its static twin."""
    src, dst = repl_backbones(model), repl_backbones(static_model)
    if not src:
        raise ValueError('the model holds no RepL backbone')
    if set(src) != set(dst):
        raise ValueError(f'RepL backbones differ: model {sorted(src)}, '
                         f'static model {sorted(dst)}')
    for name, bb in src.items():
        plan, splan = bb.replacement_plan, dst[name].replacement_plan
        where = name or 'model'
        if splan.mode != 'static':
            raise ValueError(f"{where}: the static model has mode="
                             f"{splan.mode!r}, expected 'static'")
        if plan.mode != splan.config.static_from:
            raise ValueError(
                f'{where}: the trained model has mode={plan.mode!r} but '
                f'the static model was built with static_from='
                f'{splan.config.static_from!r}')
        if plan.indices != splan.indices or \
                plan.num_blocks != splan.num_blocks:
            raise ValueError(
                f'{where}: plans differ: sites {plan.indices} of '
                f'{plan.num_blocks} blocks in the trained model, '
                f'{splan.indices} of {splan.num_blocks} in the static one')
    static = {
        (r.backbone, r.index): r.module
        for r in iter_sites(static_model)
    }
    return [(r.name + '.', r.module, static[r.backbone, r.index])
            for r in iter_sites(model)]


@torch.no_grad()
def to_static(model: nn.Module, static_model: nn.Module) -> nn.Module:
    """Fill ``static_model`` from the trained RepL ``model``.

    Both are built from one config, ``static_model`` with the options of
    :func:`static_replacement` (so one surgery builds both: the registry
    route). Every site's static weights are computed from the trained site
    in eval mode under ``torch.no_grad`` (:func:`~repl_mm.core.
    load_static_site`); every other weight is copied unchanged (names and
    shapes checked).

    Args:
        model (nn.Module): The trained RepL model (left in eval mode).
        static_model (nn.Module): Its static twin, filled in place.

    Returns:
        nn.Module: ``static_model``, in eval mode.
    """
    model.eval()
    static_model.eval()
    pairs = _site_pairs(model, static_model)
    prefixes = tuple(p for p, _, _ in pairs)
    for _, site, static in pairs:
        load_static_site(static, site)
    source = model.state_dict()
    target = static_model.state_dict()
    state = {}
    for k, v in target.items():
        if k.startswith(prefixes) or k.split('.')[-1] == PLAN_KEY:
            state[k] = v  # computed above / the static plan
        elif k not in source:
            raise ValueError(f'{k} is in the static model but not in the '
                             'RepL model')
        elif source[k].shape != v.shape:
            raise ValueError(f'{k}: shape {tuple(source[k].shape)} in the '
                             f'RepL model, {tuple(v.shape)} in the static '
                             'model')
        else:
            state[k] = source[k]
    unused = [
        k for k in source if k not in target and not k.startswith(prefixes)
    ]
    if unused:
        raise ValueError(f'keys of the RepL model outside its sites have '
                         f'no place in the static model: {unused}')
    static_model.load_state_dict(state, strict=True)
    return static_model


def output_tensors(out) -> List[Tensor]:
    """The tensors of a ``mode='tensor'`` output (nested tuples, lists and
    dicts flattened in order)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    raise TypeError(f'unexpected output type {type(out).__name__}')


def _forward(model: nn.Module, inputs: Tensor):
    if isinstance(model, RepLBackboneMixin):
        return model(inputs)
    return model(inputs, mode='tensor')


@torch.no_grad()
def max_output_error(model: nn.Module, static_model: nn.Module,
                     inputs: Tensor) -> float:
    """Largest |static - RepL| over all eval outputs, divided by the
    largest |RepL| output (a max-norm error over the model's outputs;
    ``site_fit.relative_error`` is the 2-norm error of one tensor).

    .. math::
        e = \\frac{\\max |y_{static} - y_{RepL}|}{\\max |y_{RepL}|}
    """
    model.eval()
    static_model.eval()
    ref = output_tensors(_forward(model, inputs))
    out = output_tensors(_forward(static_model, inputs))
    if [t.shape for t in ref] != [t.shape for t in out]:
        raise ValueError(f'output shapes differ: RepL '
                         f'{[tuple(t.shape) for t in ref]}, static '
                         f'{[tuple(t.shape) for t in out]}')
    diff = max((a - b).abs().max().item() for a, b in zip(ref, out))
    peak = max(a.abs().max().item() for a in ref)
    return diff / max(peak, 1e-30)


def check_equal(model: nn.Module,
                static_model: nn.Module,
                inputs: Tensor,
                tol: float = 1e-4) -> float:
    """:func:`max_output_error`, raising if it exceeds ``tol``.

    Raises:
        ValueError: If the outputs differ by more than ``tol``.
    """
    err = max_output_error(model, static_model, inputs)
    if not err <= tol:
        raise ValueError(f'static model outputs differ from the RepL '
                         f"model's by {err:.3g} (relative), above the "
                         f'tolerance {tol:g}')
    return err


def random_inputs(cfg: Config,
                  batch_size: int = 2,
                  input_size: Union[int, Sequence[int], None] = None,
                  seed: int = 0) -> Tensor:
    """A (B, 3, H, W) batch of standard normal noise (the scale of
    normalised images). ``input_size`` defaults to
    :func:`~repl_mm.analysis.cases.default_input_size`."""
    if input_size is None:
        input_size = default_input_size(cfg.default_scope, cfg.model.backbone)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    h, w = input_size
    if batch_size < 1 or h < 1 or w < 1:
        raise ValueError(f'batch_size and input_size must be positive, but '
                         f'got {batch_size} and {tuple(input_size)}')
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, h, w, generator=g)


# -- checkpoints -----------------------------------------------------------
def _is_plain(value) -> bool:
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def static_name(config: str) -> str:
    """``resnet32-repl_1xb64_...`` -> ``resnet32-static_1xb64_...``;
    other names get ``_static`` appended."""
    stem = osp.splitext(osp.basename(config))[0]
    return stem.replace('repl', 'static', 1) if 'repl' in stem \
        else f'{stem}_static'


def convert_checkpoint(config: str,
                       checkpoint: str,
                       out_dir: str,
                       name: Optional[str] = None,
                       batch_size: int = 2,
                       input_size=None,
                       tol: float = 1e-4,
                       seed: int = 0,
                       force: bool = False) -> dict:
    """Convert a RepL checkpoint to a static checkpoint and config.

    Args:
        config (str): The RepL model's config file.
        checkpoint (str): Its trained checkpoint.
        out_dir (str): Where ``<name>.pth`` and ``<name>.py`` go.
        name (str, optional): Output stem. Defaults to
            :func:`static_name` of the config.
        batch_size (int): Batch of the output check. Defaults to 2.
        input_size (int | tuple[int, int], optional): (H, W) of the output
            check. Defaults to :func:`random_inputs`'s.
        tol (float): Largest relative output difference allowed
            (:func:`max_output_error`). Defaults to 1e-4.
        seed (int): Seed of the random batch. Defaults to 0.
        force (bool): Overwrite existing outputs (never the source config
            or checkpoint). Defaults to False.

    Returns:
        dict: ``checkpoint`` and ``config`` (the written paths),
        ``error`` (the measured relative error), and for benchmarks the
        source ``cfg`` and the two models (``repl``, ``static``).

    Raises:
        ValueError: If an output is the source config or checkpoint.
        FileExistsError: If an output exists and ``force`` is False.
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f'CONFIG: no config file at {config!r}')
    name = name or static_name(config)
    out_ckpt = osp.join(out_dir, f'{name}.pth')
    out_cfg = osp.join(out_dir, f'{name}.py')
    sources = dict(config=config, checkpoint=checkpoint)
    for what, path in (('checkpoint', out_ckpt), ('config', out_cfg)):
        check_output(f'output {what} (out_dir, name)', path, sources, force)
    cfg = Config.fromfile(config)
    scfg = static_config(cfg)
    model = init_model(cfg, checkpoint)
    static = to_static(model, init_model(scfg))
    inputs = random_inputs(cfg, batch_size, input_size, seed)
    err = check_equal(model, static, inputs, tol)
    print_log(
        f'static model: outputs equal to the RepL model up to '
        f'{err:.2e} (relative, tolerance {tol:g})',
        logger='current')

    os.makedirs(out_dir, exist_ok=True)
    # the provenance init_model does not keep: read the file's meta again
    src_meta = read_checkpoint(checkpoint).get('meta')
    src_meta = src_meta if isinstance(src_meta, dict) else {}
    meta = {
        k: src_meta[k]
        for k in ('dataset_meta', 'epoch', 'iter', 'seed')
        if k in src_meta and _is_plain(src_meta[k])
    }
    meta.update(
        cfg=scfg.pretty_text,
        replacement_plans={
            n or '<root>': bb.replacement_plan.to_dict()
            for n, bb in repl_backbones(static).items()
        },
        static=dict(
            source_checkpoint=osp.abspath(checkpoint),
            source_config=osp.abspath(config),
            relative_error=err,
            check_input=list(inputs.shape)))
    state = {k: v.detach().cpu() for k, v in static.state_dict().items()}
    torch.save(dict(state_dict=state, meta=meta), out_ckpt)
    scfg.dump(out_cfg)
    return dict(
        checkpoint=out_ckpt,
        config=out_cfg,
        error=err,
        cfg=cfg,
        repl=model,
        static=static)


# -- inference speed and memory --------------------------------------------
def param_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size()
               for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def benchmark_inference(models: Dict[str, nn.Module],
                        inputs: Tensor,
                        repeats: int = 20,
                        warmup: int = 2,
                        device='cpu') -> Dict[str, dict]:
    """Eval-forward time and memory of each model, on one batch, on
    ``device``.

    Times are per forward, taken round-robin between the models in one run
    (:func:`~repl_mm.analysis.profiling.time_round_robin`; on CUDA each
    forward is synchronized before and after): ``median_s`` over
    ``repeats`` trials after ``warmup`` untimed rounds. ``peak_bytes`` is
    the allocator's high-water mark during one forward, above its level at
    the start (:func:`~repl_mm.analysis.device.peak_memory`: activations
    and any weights computed on the fly); ``param_bytes`` the model's
    parameters and buffers.

    Args:
        models (dict[str, nn.Module]): Name -> model (eval mode is set,
            and the model is moved to ``device``).
        inputs (Tensor): (B, 3, H, W).
        repeats (int): Timed trials. Defaults to 20.
        warmup (int): Untimed rounds. Defaults to 2.
        device (str | torch.device): ``'cpu'``, ``'cuda'`` or
            ``'cuda:N'``. Defaults to ``'cpu'``.

    Returns:
        dict[str, dict]: Name -> ``median_s``, ``times_s``, ``peak_bytes``,
        ``param_bytes``.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be >= 1, but got {repeats}')
    device = resolve_device(device)
    for m in models.values():
        m.to(device).eval()
    inputs = inputs.to(device)
    steps = {n: (lambda m=m: _forward(m, inputs)) for n, m in models.items()}
    times = time_round_robin(steps, repeats, warmup, device)
    return {
        n:
        dict(
            median_s=float(np.median(times[n])),
            times_s=times[n],
            peak_bytes=peak_memory(steps[n], device),
            param_bytes=param_bytes(m))
        for n, m in models.items()
    }


def ratios(results: Dict[str, dict],
           num: str = 'static',
           den: str = 'repl') -> Dict[str, float]:
    """``num / den`` of median time, peak and parameter bytes."""
    return {
        k: results[num][k] / results[den][k]
        for k in ('median_s', 'peak_bytes', 'param_bytes')
    }


__all__ = [
    'benchmark_inference', 'check_equal', 'convert_checkpoint',
    'drop_pretrained', 'output_tensors', 'param_bytes', 'random_inputs',
    'ratios', 'max_output_error', 'static_config', 'static_name',
    'static_replacement', 'to_static'
]
