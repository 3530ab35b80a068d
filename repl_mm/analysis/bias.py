"""Bias of RepL in practice: forward and gradient deviations (paper A.12).

Every computing layer (:class:`~repl_mm.core.ConvSite`,
:class:`~repl_mm.core.TransformerSite`) multiplies its update by a
non-persistent ``scale`` buffer, 0 leaving only the skip path (spec §5).
With it, paper section A.12 defines, for a trained RepL model with R sites:

- F: every site disabled (``scale = 0``), i.e. the kept network alone;
- F_b^(r): the first r sites in depth order enabled (``scale = 1``), the
  others disabled, r = 0..R (F_b^(0) = F by construction).

F and F_b^(r) share every parameter of the kept network (theta). Measured
over the first images of a dataset, in eval mode:

.. math::
    d_{fwd}(r) = \\mathbb{E}_x \\| F_b^{(r)}(x) - F(x) \\|_2

    d_{grad}(r) = \\| \\nabla_\\theta \\ell_b^{(r)} - \\nabla_\\theta \\ell
                  \\|_2, \\qquad
    \\rho(r) = \\frac{d_{grad}(r)}{\\| \\nabla_\\theta \\ell \\|_2}

Conventions (the paper leaves them open):

- ``F(x)`` is the model's ``mode='tensor'`` output per sample: the class
  logits of a classifier (the paper's case); for detectors and segmentors
  the raw head outputs (every tensor of that output, flattened and
  concatenated per sample: RetinaNet's class scores and box deltas of all
  levels, a segmentor's per-pixel logits).
- ``ell`` is the model's own training loss (``mode='loss'``, the sum of
  every ``loss*`` term, as the optimizer sees it): cross-entropy for the
  demo classifiers, the task loss for detectors and segmentors.
- The gradient is that of the mean loss over the gradient images (each
  batch's loss weighted by its share of the images), taken w.r.t. theta =
  every trainable parameter outside the computing layers (mixing weights
  and site norms excluded, as in the paper; the neighbours' weights, which
  the sites read, are part of theta).
- Every deviation, r = 0 included, is measured, not assumed: r = 0 compares
  two runs of the same network and is exactly 0 on a deterministic device.

Only torch and mmengine are imported here; the task codebase comes in
through the config's ``default_scope`` and matplotlib when plotting.
"""
import json
import os
import os.path as osp
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from torch import Tensor, nn

from ..apis import SCOPES, build_dataloader, init_model
from ..core import InterpolatedBlock, iter_repl_backbones, iter_sites

# what ``F(x)`` is, per codebase (see the module docstring)
OUTPUT_NAMES = {
    scope:
    'class logits'
    if scope == 'mmpretrain' else "raw head outputs (mode='tensor')"
    for scope in SCOPES
}

# -- the math -----------------------------------------------------------------


def flatten_outputs(outputs) -> Tensor:
    """Every tensor of a model output, flattened per sample.

    Args:
        outputs (Tensor | Sequence | dict): A ``mode='tensor'`` output:
            a (B, ...) tensor, or nested lists / tuples / dicts of them
            (e.g. RetinaNet's per-level class scores and box deltas).

    Returns:
        Tensor: (B, D), the tensors' per-sample values concatenated in
        traversal order.

    Example:
        >>> flatten_outputs((torch.ones(2, 3), [torch.ones(2, 1, 2, 2)])
        ...                 ).shape
        torch.Size([2, 7])
    """
    leaves = []

    def walk(x):
        if isinstance(x, Tensor):
            leaves.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            raise TypeError('a model output holds tensors, lists, tuples or '
                            f'dicts, but got {type(x).__name__}')

    walk(outputs)
    if not leaves:
        raise ValueError('the model output holds no tensor')
    batch = leaves[0].shape[0]
    if any(t.dim() == 0 or t.shape[0] != batch for t in leaves):
        raise ValueError('every output tensor needs the batch as its first '
                         f'dim, got shapes {[tuple(t.shape) for t in leaves]}')
    # (B, ...) -> (B, D_t), concatenated -> (B, D)
    return torch.cat([t.reshape(batch, -1).float() for t in leaves], dim=1)


def sample_deviations(out: Tensor, ref: Tensor) -> Tensor:
    """Per-sample L2 distance :math:`\\|out_x - ref_x\\|_2`.

    Args:
        out (Tensor): (B, D) outputs of F_b^(r).
        ref (Tensor): (B, D) outputs of F.

    Returns:
        Tensor: (B,) distances (float64).
    """
    if out.shape != ref.shape:
        raise ValueError(f'output shapes differ: {tuple(out.shape)} vs '
                         f'{tuple(ref.shape)}')
    return (out.double() - ref.double()).norm(dim=1)


def gradient_deviation(grad: Tensor, ref: Tensor) -> Tuple[float, float]:
    """:math:`d_{grad} = \\|g_b - g\\|_2` and :math:`\\rho = d_{grad} /
    \\|g\\|_2` (paper A.12).

    Args:
        grad (Tensor): Flat gradient of F_b^(r)'s loss w.r.t. theta.
        ref (Tensor): Flat gradient of F's loss w.r.t. theta.

    Returns:
        tuple[float, float]: ``(d_grad, rho)``; rho is NaN when F's
        gradient is zero.
    """
    if grad.shape != ref.shape:
        raise ValueError(f'gradient sizes differ: {tuple(grad.shape)} vs '
                         f'{tuple(ref.shape)}')
    d = (grad.double() - ref.double()).norm().item()
    base = ref.double().norm().item()
    return d, (d / base if base > 0 else float('nan'))


# -- sites and their scales ---------------------------------------------------


def find_sites(model: nn.Module) -> List[Tuple[int, nn.Module]]:
    """The computing layers of every RepL backbone in ``model``, in depth
    order, as ``(1-based block index, site)``.

    Raises:
        ValueError: If ``model`` has no RepL backbone, its mode leaves no
            site with a ``scale`` (``'none'``, ``'drop'``,
            ``'interpolate'``), or its plan has no site.
    """
    backbones = list(iter_repl_backbones(model))
    if not backbones:
        raise ValueError(f'{type(model).__name__} has no RepL backbone: the '
                         'bias diagnostic needs a RepL model (a RepL backbone '
                         "type or a ReplacementHook checkpoint's "
                         "meta['repl_model'])")
    sites = []
    for _, bb in backbones:
        mode = bb.replacement_plan.mode
        name = type(bb).__name__
        if mode in ('none', 'drop'):
            raise ValueError(
                f"{name} has replacement mode={mode!r}: there is no "
                'computing layer to enable (the bias diagnostic needs '
                "mode='synthesize')")
        for ref in iter_sites(bb):
            index, site = ref.index, ref.module
            if isinstance(site, InterpolatedBlock) or mode == 'interpolate':
                raise ValueError(
                    f"{name} has replacement mode={mode!r}: its "
                    f'{type(site).__name__} (site {index}) runs the whole '
                    'original block and has no scale buffer to disable '
                    "(the bias diagnostic needs mode='synthesize')")
            if not isinstance(getattr(site, 'scale', None), Tensor):
                raise ValueError(f'site {index} of {name} '
                                 f'({type(site).__name__}) has no scale '
                                 'buffer')
            sites.append((index, site))
    if not sites:
        raise ValueError('the RepL backbone has no site (empty plan): '
                         'nothing to enable')
    return sites


def enable_first(sites: Sequence[Tuple[int, nn.Module]], r: int):
    """Scale 1 for the first ``r`` sites, 0 for the others (F_b^(r))."""
    if not 0 <= r <= len(sites):
        raise ValueError(f'r must be in [0, {len(sites)}], but got {r}')
    with torch.no_grad():
        for k, (_, site) in enumerate(sites):
            site.scale.fill_(1.0 if k < r else 0.0)


@contextmanager
def preserved_state(model: nn.Module, sites: Sequence[Tuple[int, nn.Module]]):
    """Restore the sites' scales and the train/eval mode of ``model`` on
    exit, whatever happens inside. (Gradients need no restoring: they are
    taken with ``torch.autograd.grad``, which leaves every ``.grad`` as it
    was.)"""
    scales = [site.scale.detach().clone() for _, site in sites]
    training = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, site), s in zip(sites, scales):
                site.scale.copy_(s)
        for m, t in training.items():
            m.training = t


def shared_parameters(
        model: nn.Module,
        sites: Sequence[Tuple[int,
                              nn.Module]]) -> List[Tuple[str, nn.Parameter]]:
    """theta: the trainable parameters outside the computing layers."""
    own = {id(p) for _, site in sites for p in site.parameters()}
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in own]


# -- measuring ----------------------------------------------------------------


def _num_samples(data: dict) -> int:
    samples = data.get('data_samples')
    if samples is not None:
        return len(samples)
    return len(data['inputs'])


def _mean_loss_gradient(model, batches: Sequence[dict],
                        params) -> Tuple[Tensor, float]:
    """Gradient of the mean loss over ``batches`` w.r.t. ``params``, flat
    (float64), and that mean loss. No ``.grad`` of the model is touched."""
    tensors = [p for _, p in params]
    grad = torch.zeros(sum(p.numel() for p in tensors), dtype=torch.float64)
    total = sum(_num_samples(d) for d in batches)
    loss_sum = 0.0
    for data in batches:
        losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        weight = _num_samples(data) / total
        grads = torch.autograd.grad(loss * weight, tensors, allow_unused=True)
        grad += torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1).double()
            for p, g in zip(tensors, grads)
        ])
        loss_sum += loss.item() * weight
    return grad, loss_sum


def measure_bias(model: nn.Module,
                 batches: Sequence[dict],
                 grad_batches: Optional[Sequence[dict]] = None) -> dict:
    """Forward and gradient deviations of F_b^(r) from F, r = 0..R.

    Runs in eval mode; the sites' scales, the modules' train flags and the
    parameters' gradients are restored afterwards.

    Args:
        model (nn.Module): A task model (``BaseModel``: ``forward(inputs,
            data_samples, mode)`` and ``parse_losses``) with a RepL
            backbone in ``mode='synthesize'``.
        batches (Sequence[dict]): Preprocessed batches (the output of the
            model's ``data_preprocessor``) for the forward deviation.
        grad_batches (Sequence[dict], optional): Batches for the gradients.
            Defaults to ``batches``.

    Returns:
        dict: ``sites`` (block indices in depth order), ``num_images``,
        ``num_grad_images``, ``num_shared_params``, ``grad_norm`` (of F),
        ``loss`` (of F) and ``rows``: per r, ``r``, ``enabled_sites``,
        ``d_fwd``, ``d_grad``, ``rho`` and ``loss`` (of F_b^(r)).
    """
    if not batches:
        raise ValueError('measure_bias needs at least one batch')
    grad_batches = batches if grad_batches is None else grad_batches
    if not grad_batches:
        raise ValueError('measure_bias needs at least one gradient batch')
    sites = find_sites(model)
    num_sites = len(sites)
    with preserved_state(model, sites):
        model.eval()
        params = shared_parameters(model, sites)
        if not params:
            raise ValueError('the model has no trainable parameter outside '
                             'its computing layers: no gradient to compare')
        # forward: F once per batch, then every F_b^(r) against it
        sums = torch.zeros(num_sites + 1, dtype=torch.float64)
        num = 0
        with torch.no_grad():
            for data in batches:
                enable_first(sites, 0)
                ref = flatten_outputs(model(**data, mode='tensor'))
                for r in range(num_sites + 1):
                    enable_first(sites, r)
                    out = flatten_outputs(model(**data, mode='tensor'))
                    sums[r] += sample_deviations(out, ref).sum()
                num += ref.shape[0]
        d_fwd = (sums / num).tolist()
        # gradients: F, then every F_b^(r)
        enable_first(sites, 0)
        ref_grad, ref_loss = _mean_loss_gradient(model, grad_batches, params)
        rows = []
        for r in range(num_sites + 1):
            enable_first(sites, r)
            grad, loss = _mean_loss_gradient(model, grad_batches, params)
            d_grad, rho = gradient_deviation(grad, ref_grad)
            rows.append(
                dict(
                    r=r,
                    enabled_sites=[i for i, _ in sites[:r]],
                    d_fwd=d_fwd[r],
                    d_grad=d_grad,
                    rho=rho,
                    loss=loss))
            print_log(
                f'bias diagnostic: r={r} d_fwd={d_fwd[r]:.6f} '
                f'd_grad={d_grad:.6f} rho={rho:.4f}',
                logger='current')
    return dict(
        sites=[i for i, _ in sites],
        num_images=num,
        num_grad_images=sum(_num_samples(d) for d in grad_batches),
        num_shared_params=int(sum(p.numel() for _, p in params)),
        grad_norm=ref_grad.norm().item(),
        loss=ref_loss,
        rows=rows)


# -- from a config and a checkpoint -------------------------------------------


def _take(batch: dict, n: int) -> dict:
    """The first ``n`` samples of a collated batch."""
    out = {}
    for k, v in batch.items():
        out[k] = v[:n] if isinstance(v, (list, tuple, Tensor)) else v
    return out


def preprocessed_batches(model: nn.Module, dataloader: Iterable,
                         num_images: int) -> List[dict]:
    """The first ``num_images`` samples of ``dataloader`` through the
    model's ``data_preprocessor`` (eval mode), batch by batch."""
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, but got {num_images}')
    out, seen = [], 0
    with torch.no_grad():
        for batch in dataloader:
            n = len(batch.get('data_samples') or batch['inputs'])
            if seen + n > num_images:
                batch, n = _take(batch, num_images - seen), num_images - seen
            out.append(model.data_preprocessor(batch, False))
            seen += n
            if seen >= num_images:
                break
    if seen < num_images:
        print_log(
            f'the dataset has {seen} images, fewer than the '
            f'{num_images} asked for: using all of them',
            logger='current',
            level=30)
    return out


def run_bias_diagnostic(cfg: Config,
                        checkpoint: str,
                        num_images: int = 512,
                        num_grad_images: Optional[int] = None,
                        batch_size: Optional[int] = None) -> dict:
    """Build the model of ``cfg`` from ``checkpoint`` and measure its bias
    (:func:`measure_bias`) on the first images of its test set.

    The model is :func:`repl_mm.apis.init_model`'s: the checkpoint loaded
    strictly, and for a ``ReplacementHook`` run the RepL model its
    ``meta['repl_model']`` records.

    Args:
        cfg (Config): The training config (its ``test_dataloader``).
        checkpoint (str): A RepL checkpoint of that config.
        num_images (int): Images for d_fwd. Defaults to 512.
        num_grad_images (int, optional): Images (the first ones) for d_grad
            and rho. Defaults to ``num_images``.
        batch_size (int, optional): Overrides the test loader's.

    Returns:
        dict: :func:`measure_bias`'s result plus ``checkpoint`` and
        ``output`` (what F(x) is).
    """
    for name, v in (('num_images', num_images),
                    ('num_grad_images', num_grad_images), ('batch_size',
                                                           batch_size)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f'{name} must be a positive int, but got {v!r}')
    if num_grad_images is None:
        num_grad_images = num_images
    model = init_model(cfg, checkpoint)
    loader = build_dataloader(
        cfg, 'test',
        **({} if batch_size is None else dict(batch_size=batch_size)))
    batches = preprocessed_batches(model, loader,
                                   max(num_images, num_grad_images))
    result = measure_bias(model, _first(batches, num_images),
                          _first(batches, num_grad_images))
    return dict(
        checkpoint=checkpoint,
        output=OUTPUT_NAMES[cfg.default_scope],
        **result)


def _first(batches: List[dict], n: int) -> List[dict]:
    out, seen = [], 0
    for data in batches:
        if seen >= n:
            break
        k = _num_samples(data)
        out.append(_take(data, n - seen) if seen + k > n else data)
        seen += min(k, n - seen)
    return out


# -- outputs ------------------------------------------------------------------


def format_table(result: dict) -> str:
    """The markdown table of :func:`measure_bias`'s rows."""
    lines = [
        f"Bias diagnostic (paper A.12), sites {result['sites']}; d_fwd over "
        f"{result.get('output', 'model outputs')} of "
        f"{result['num_images']} images, d_grad over "
        f"{result['num_shared_params']} shared parameters and "
        f"{result['num_grad_images']} images "
        f"(||grad F|| = {result['grad_norm']:.6f}, loss F = "
        f"{result['loss']:.6f}).", '',
        '| r | enabled sites | d_fwd | d_grad | rho | loss |',
        '|---|---|---|---|---|---|'
    ]
    for row in result['rows']:
        sites = ', '.join(map(str, row['enabled_sites'])) or '-'
        lines.append(f"| {row['r']} | {sites} | {row['d_fwd']:.6f} | "
                     f"{row['d_grad']:.6f} | {row['rho']:.4f} | "
                     f"{row['loss']:.6f} |")
    return '\n'.join(lines) + '\n'


def plot_bias(result: dict, path: str) -> str:
    """d_fwd, d_grad and rho against r, one panel each, into ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rs = [row['r'] for row in result['rows']]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ('d_fwd', 'd_grad', 'rho'),
                              ('$d_{fwd}(r)$', '$d_{grad}(r)$', r'$\rho(r)$')):
        ax.plot(rs, [row[key] for row in result['rows']], 'o-')
        ax.set_xlabel('enabled sites r')
        ax.set_title(label)
        ax.set_xticks(rs)
        ax.grid(alpha=0.3)
    fig.suptitle(f"RepL bias (paper A.12), sites {result['sites']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str) -> Dict[str, str]:
    """``bias.md``, ``bias.json`` and ``bias.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: osp.join(out_dir, f'bias.{k}') for k in ('md', 'json', 'png')}
    with open(paths['md'], 'w') as f:
        f.write(format_table(result))
    with open(paths['json'], 'w') as f:
        # NaN (rho of a zero gradient) is written as null
        json.dump(_nan_to_none(result), f, indent=2)
    plot_bias(result, paths['png'])
    return paths


def _nan_to_none(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x
