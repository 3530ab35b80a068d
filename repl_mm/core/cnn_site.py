"""The computing layer that replaces a residual conv block (spec §3,
§9.1)."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..utils.compat import autocast_disabled, is_autocast_enabled
from .device import Fp32Synthesis, ScaleBuffer, factory_kwargs
from .lean import conv_update, lean_allowed, per_sample_drop_path
from .recompute import CheckpointedSite, needs_graph, recompute_in_backward
from .synthesis import (apply_chain, at_least_fp32, best_grouping, fold_groups,
                        folded_conv_groups, pointwise_mix)

# A position's sources: (neighbour name, the neighbour's conv module).
Sources = Sequence[Tuple[str, nn.Module]]


class ConvSite(Fp32Synthesis, ScaleBuffer, CheckpointedSite, nn.Module):
    """RepL computing layer for a BasicBlock / Bottleneck site.

    For every conv position j of the replaced block, the site synthesizes a
    pointwise weight from the same position of its kept neighbours:

    .. math::
        \\hat W^j = \\mathrm{diag}(\\phi^j_{prev}) S(W^j_{prev})
                  + \\mathrm{diag}(\\phi^j_{next}) S(W^j_{next})

    where S sums a kernel over its taps, and computes

    .. math::
        out = act(scale \\cdot norm(\\hat W^J \\cdots \\hat W^1 h) + h)

    (``residual=False`` drops ``+ h``: the literal Eq. 7/12). Synthesis runs
    every forward from the neighbours' live weights, so autograd carries
    the gradient of Eq. 8 to phi and to the neighbours. The chain is cut
    into groups, each folded into one matrix, where that costs fewer
    multiply-adds (:func:`~repl_mm.core.synthesis.best_grouping`).

    The neighbours' convs are held outside ``_modules``: they are not
    registered, counted, optimised or saved twice, and ``copy.deepcopy`` of
    the whole model maps them to the copy's neighbours.

    Precision: the weight-space part (S, the phi mix and, when the chain is
    folded, the product of its matrices) runs in at least fp32 with
    autocast off, for the input's device type, whatever calls it; applying
    the matrices to the activations (1x1 convs) follows autocast like any
    conv (without autocast, in the input's dtype). Every tensor the site
    creates is on the device and in the dtype of ``device``/``dtype``
    (surgery passes the replaced block's); ``scale`` is a non-persistent
    buffer that survives ``to_empty`` (:class:`~repl_mm.core.device.
    ScaleBuffer`).

    Decisions the spec leaves open (documented, not options):

    - A position that neither kept neighbour can serve (shape mismatch,
      e.g. conv1 of ResNet-18's block 4, whose neighbours are the
      down-sampling first blocks of stages 2 and 3) becomes a (Cout, Cin)
      weight the site owns, initialised like a 1x1 ``nn.Conv2d``; the plan
      table shows it as ``own``. This keeps the spec's example plans
      (ResNet-18 -> 4) valid.
    - ``drop_path`` (mmpretrain blocks) applies the replaced block's
      stochastic-depth rate to the site's update, as for ViT sites (§4).
    - Grouped positions (spec §9.1, ResNeXt's grouped 3x3): position j
      with g_j groups synthesizes a (Cout_j, Cin_j / g_j) matrix (the
      neighbours' grouped kernels summed over their taps, phi of length
      Cout_j as for a dense one) and applies it as a grouped 1x1 conv; a
      neighbour conv serves it only with the same weight shape and the
      same groups. A grouped position the site owns is a (Cout_j, Cin_j /
      g_j) weight with the same g_j groups, initialised like a grouped
      1x1 ``nn.Conv2d`` (fan-in Cin_j / g_j): the site keeps the replaced
      block's structure and cost.

    Args:
        shapes (Sequence[tuple[int, int]]): (Cout_j, Cin_j) per position
            (full channel counts, also for a grouped position).
        sources (Sequence[Sources]): Per position, the neighbours' convs it
            is drawn from; empty means the site owns that weight.
        norm (nn.Module): Fresh norm of width Cout_J (never shared).
        act (nn.Module): Activation after the residual sum.
        residual (bool): Keep ``+ h``. Defaults to True.
        zero_init (bool): Zero gamma of ``norm`` at init. Defaults to True.
        scale (float): Update multiplier (buffer). Defaults to 1.0.
        drop_path (nn.Module, optional): Stochastic depth on the update.
        with_cp (bool): Checkpoint the site (non-reentrant). Defaults to
            False.
        recompute (bool): Store only the input and output for backward
            (and, with a plain ``nn.BatchNorm2d``, per-channel statistics)
            and re-run the light update in backward: the chain only, the
            norm and drop path differentiated by hand
            (:class:`~repl_mm.core.lean.ConvUpdate`, see
            :meth:`lean_applies`), else chain, norm and drop path (a
            checkpoint); the norm's running statistics are updated once.
            Same outputs and gradients. Defaults to True.
        device (torch.device, optional): Where the site's own tensors
            (phi, owned weights, ``scale``) are created. Defaults to the
            device of the first source conv's weight (torch's default when
            the site owns every weight).
        dtype (torch.dtype, optional): Their dtype, defaulting likewise.
        conv_groups (Sequence[int], optional): Conv groups g_j per
            position (spec §9.1). Defaults to 1 for every position.

    Example:
        >>> prev, nxt = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        >>> site = ConvSite([(8, 8)], [[('prev', prev), ('next', nxt)]],
        ...                 nn.BatchNorm2d(8), nn.ReLU())
        >>> site(torch.rand(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self,
                 shapes: Sequence[Tuple[int, int]],
                 sources: Sequence[Sources],
                 norm: nn.Module,
                 act: nn.Module,
                 residual: bool = True,
                 zero_init: bool = True,
                 scale: float = 1.0,
                 drop_path: Optional[nn.Module] = None,
                 with_cp: bool = False,
                 recompute: bool = True,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None,
                 conv_groups: Optional[Sequence[int]] = None):
        super().__init__()
        if len(shapes) != len(sources):
            raise ValueError(f'{len(shapes)} shapes but {len(sources)} '
                             'source lists')
        conv_groups = (1, ) * len(shapes) if conv_groups is None else \
            tuple(conv_groups)
        if len(conv_groups) != len(shapes):
            raise ValueError(f'conv_groups must give one int per position '
                             f'({len(shapes)}), but got {conv_groups}')
        for j, (g, (cout, cin)) in enumerate(zip(conv_groups, shapes), 1):
            if isinstance(g, bool) or not isinstance(g, int) or g < 1 or \
                    cout % g or cin % g:
                raise ValueError(
                    f'conv_groups of position {j} must be an int >= 1 that '
                    f'divides its channels ({cout}, {cin}), but got {g!r}')
        for j in range(1, len(shapes)):
            if shapes[j][1] != shapes[j - 1][0]:
                raise ValueError(f'position {j + 1} takes {shapes[j][1]} '
                                 f'channels but position {j} gives '
                                 f'{shapes[j - 1][0]}')
        if shapes[-1][0] != shapes[0][1] and residual:
            raise ValueError('a residual site must preserve channels, got '
                             f'{shapes[0][1]} -> {shapes[-1][0]}')
        self.shapes = [tuple(s) for s in shapes]
        self.conv_groups = conv_groups
        self._sources: List[List[Tuple[str, nn.Module]]] = [
            list(s) for s in sources
        ]
        factory = factory_kwargs(device, dtype, (conv.weight
                                                 for srcs in self._sources
                                                 for _, conv in srcs))
        for j, ((cout, cin), srcs, g) in enumerate(
                zip(self.shapes, self._sources, conv_groups), 1):
            for name, conv in srcs:
                w = conv.weight
                if tuple(w.shape[:2]) != (cout, cin // g):
                    raise ValueError(
                        f'{name} neighbour conv{j} has weight shape '
                        f'{tuple(w.shape)}, the site needs ({cout}, '
                        f'{cin // g})')
                if getattr(conv, 'groups', 1) != g:
                    raise ValueError(
                        f'{name} neighbour conv{j} has groups='
                        f'{getattr(conv, "groups", 1)}, the site needs '
                        f'groups={g}')
                self.register_parameter(
                    f'phi{j}_{name}',
                    nn.Parameter(torch.empty(cout, **factory)))
            if not srcs:
                self.register_parameter(
                    f'weight{j}',
                    nn.Parameter(torch.empty(cout, cin // g, **factory)))
        self.site_norm = norm
        self.act = act
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.residual = residual
        self.zero_init = zero_init
        self.with_cp = with_cp
        self.recompute = recompute
        self._register_scale(scale, **factory)
        self.init_weights()

    @property
    def sources(self) -> List[Tuple[str, ...]]:
        """Per position, the neighbour names it mixes (``('own',)``)."""
        return [tuple(n for n, _ in s) or ('own', ) for s in self._sources]

    def init_weights(self):
        """phi = 0.5; own weights like a 1x1 conv; norm gamma 0 or 1 and
        its statistics reset (a no-op on a freshly built site; after a
        ``meta`` build materialised with ``to_empty``, the statistics are
        no longer garbage).

        Called by mmengine's ``init_weights`` recursion after the
        backbone's own initialisers (which would set every BN gamma to 1).
        """
        reset_running_stats = getattr(self.site_norm, 'reset_running_stats',
                                      None)
        if reset_running_stats is not None:
            reset_running_stats()
        with torch.no_grad():
            for j, srcs in enumerate(self._sources, 1):
                for name, _ in srcs:
                    getattr(self, f'phi{j}_{name}').fill_(0.5)
                if not srcs:
                    nn.init.kaiming_uniform_(
                        getattr(self, f'weight{j}'), a=math.sqrt(5))
            if getattr(self.site_norm, 'weight', None) is not None:
                self.site_norm.weight.fill_(0.0 if self.zero_init else 1.0)
            if getattr(self.site_norm, 'bias', None) is not None:
                self.site_norm.bias.zero_()

    @torch.no_grad()
    def mixing_summary(self) -> Dict[str, float]:
        """Mean phi per neighbour over all positions (for logging)."""
        out = {}
        for name in ('prev', 'next'):
            phis = [
                getattr(self, f'phi{j}_{name}')
                for j, srcs in enumerate(self._sources, 1)
                if any(n == name for n, _ in srcs)
            ]
            if phis:
                out[f'phi_{name}'] = torch.cat(phis).mean().item()
        return out

    def source_convs(self, j: int) -> List[Tuple[str, nn.Module]]:
        """(neighbour name, conv) pairs position ``j`` (1-based) is drawn
        from; empty when the site owns that weight."""
        return list(self._sources[j - 1])

    def phi(self, j: int, name: str) -> nn.Parameter:
        """phi^j of neighbour ``name`` ('prev' or 'next')."""
        return getattr(self, f'phi{j}_{name}')

    def own_weight(self, j: int) -> nn.Parameter:
        """The (Cout_j, Cin_j / g_j) weight of a position the site owns."""
        return getattr(self, f'weight{j}')

    def _synthesize(self) -> List[Tensor]:
        """The (Cout_j, Cin_j / g_j) matrices What^j from the live
        neighbours (:meth:`synthesize` runs this with autocast off)."""
        mats = []
        for j, srcs in enumerate(self._sources, 1):
            if srcs:
                mats.append(
                    pointwise_mix([(self.phi(j, name), conv.weight)
                                   for name, conv in srcs]))
            else:
                mats.append(at_least_fp32(self.own_weight(j)))
        return mats

    def _update(self, h: Tensor, *mats: Tensor) -> Tensor:
        """scale * norm(What^J ... What^1 h), through drop path.

        The chain is cut into the groups that cost the fewest
        multiply-adds, each folded into one matrix
        (:func:`~repl_mm.core.synthesis.best_grouping`). Folding is
        weight-space math: at least fp32, autocast off. Without autocast,
        the matrices are applied in ``h``'s dtype. Grouped positions are
        counted, folded and applied as grouped operators (spec §9.1).
        """
        cg = self._conv_groups()
        groups = best_grouping(mats, h.shape[0] * h.shape[2] * h.shape[3], cg)
        if len(groups) < len(mats):
            mats = [at_least_fp32(m) for m in mats]
            types = (h.device.type, mats[0].device.type)
            if any(is_autocast_enabled(t) for t in types):
                with autocast_disabled(*types):
                    mats = fold_groups(mats, groups, cg)
            else:  # no context manager to trace (dynamo 2.1 cannot)
                mats = fold_groups(mats, groups, cg)
            cg = None if cg is None else folded_conv_groups(cg, groups)
        if not is_autocast_enabled(h.device.type):
            mats = [m.to(h.dtype) for m in mats]
        x_hat = apply_chain(h, mats, fold=False, conv_groups=cg)
        return self.drop_path(self.scale * self.site_norm(x_hat))

    def _conv_groups(self) -> Optional[Tuple[int, ...]]:
        """The positions' groups, or None when every one is dense (the
        dense code paths, unchanged)."""
        cg = getattr(self, 'conv_groups', None)  # sites pickled before
        return None if cg is None or all(g == 1 for g in cg) else cg

    def weights(self, h: Tensor) -> List[Tensor]:
        """The synthesized matrices for input ``h``: autocast off for its
        device type too (:meth:`synthesize` turns it off for the
        weights'). Kept for backward; recomputation re-runs only
        :meth:`forward_with`."""
        with autocast_disabled(h.device.type):
            return self.synthesize()

    def trainable_tensors(self) -> List[Tensor]:
        """What the site's graph carries gradients to: its own parameters
        and the neighbours' weights."""
        return [*self.parameters()] + [
            conv.weight for srcs in self._sources for _, conv in srcs
        ]

    def lean_applies(self, h: Tensor) -> bool:
        """Whether ``recompute`` runs through the lean update
        (:class:`~repl_mm.core.lean.ConvUpdate`) for input ``h``: the norm
        is exactly ``nn.BatchNorm2d`` (mmcv's ``'BN'``; not a SyncBN or
        any subclass), ``h`` is not on ``meta``, drop path is
        ``nn.Identity`` or per-sample
        (:func:`~repl_mm.core.lean.per_sample_drop_path`), autocast is
        off for ``h``'s device type and the model runs eagerly (compiled,
        a checkpoint region recomputes instead:
        :func:`~repl_mm.core.lean.lean_allowed`)."""
        # meta: torch.batch_norm_update_stats has no meta kernel
        return type(self.site_norm) in (nn.BatchNorm2d, ) and \
            h.dim() == 4 and h.device.type != 'meta' and \
            per_sample_drop_path(self.drop_path) and \
            not is_autocast_enabled(h.device.type) and lean_allowed()

    def forward_with(self, h: Tensor, *mats: Tensor,
                     block_args: tuple = ()) -> Tensor:
        """act(update + h) with the given matrices (``weights(h)``);
        ``block_args`` (a block's further positional arguments) are
        ignored: the update is pixel-wise.

        With ``recompute`` (and no ``with_cp``, which checkpoints all of
        this), only ``h``, the matrices and per-channel statistics are
        stored for backward: the chain re-runs in backward, the norm and
        drop path are differentiated by hand
        (:class:`~repl_mm.core.lean.ConvUpdate`, where
        :meth:`lean_applies`), or else the chain, the norm and drop path
        re-run in backward (a checkpoint)."""
        if self.recompute and not self.with_cp and needs_graph(
                h, *self.trainable_tensors()):
            if self.lean_applies(h):
                cg = self._conv_groups()
                groups = best_grouping(mats,
                                       h.shape[0] * h.shape[2] * h.shape[3],
                                       cg)
                update = conv_update(
                    h,
                    mats,
                    groups,
                    self.site_norm,
                    self.scale,
                    self.drop_path,
                    conv_groups=cg)
            else:
                update = recompute_in_backward(
                    self._update, h, *mats, stateful=self.site_norm)
        else:
            update = self._update(h, *mats)
        return self.act(update + h if self.residual else update)

    def extra_repr(self) -> str:
        src = ', '.join(f"conv{j}<-{'+'.join(s)}"
                        for j, s in enumerate(self.sources, 1))
        groups = '' if self._conv_groups() is None else \
            f', conv_groups={self.conv_groups}'
        return f'{src}{groups}, residual={self.residual}'
