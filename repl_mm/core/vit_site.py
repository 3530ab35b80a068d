"""The computing layer that replaces a transformer encoder layer (spec §4)."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.compat import autocast_disabled, is_autocast_enabled
from .device import Fp32Synthesis, ScaleBuffer, factory_kwargs
from .lean import lean_allowed, per_sample_drop_path, token_update
from .recompute import CheckpointedSite, needs_graph, recompute_in_backward
from .synthesis import at_least_fp32, operator_mix

# Per operator, its sources: (neighbour name, (linear, linear)) with
# (qkv, proj) for 'attn' and (fc1, fc2) for 'mlp'.
OperatorSources = Sequence[Tuple[str, Tuple[nn.Module, nn.Module]]]

_OPERATORS = ('attn', 'mlp')


class TransformerSite(Fp32Synthesis, ScaleBuffer, CheckpointedSite, nn.Module):
    """RepL computing layer for a ViT encoder layer (paper Eq. 10).

    .. math::
        \\hat A = \\alpha A_{prev} + \\beta A_{next}, \\quad
        \\hat M = \\alpha M_{prev} + \\beta M_{next}

        H_{out} = H + \\mathrm{DropPath}(scale \\cdot
                  LN(\\mathrm{GELU}(H \\hat M^T) + H \\hat A^T))

    with A = W_proj W_v and M = W_fc2 W_fc1 of each neighbour. An operator
    not drawn from the neighbours (``vit_weights``) is a (d, d) weight the
    site owns, initialised like ``nn.Linear``. With ``num_scalars=1``,
    beta = 1 - alpha. Synthesis runs every forward in at least fp32 (fp32
    for fp16/bf16 weights, float64 for a float64 model) with autocast off
    for the input's device type, whoever calls; the operators are then
    applied under autocast like any linear (without autocast, in the
    input's dtype). Biases are not synthesized. Every tensor the site
    creates is on the device and in the dtype of ``device``/``dtype``
    (surgery passes the replaced layer's); ``scale`` is a non-persistent
    buffer that survives ``to_empty`` (:class:`~repl_mm.core.device.
    ScaleBuffer`).

    Args:
        dim (int): Embedding width d.
        sources (dict[str, OperatorSources]): For ``'attn'`` and ``'mlp'``,
            the neighbours' linears; empty means the site owns it.
        norm (nn.Module): Fresh LayerNorm of width d.
        act (nn.Module): The MLP activation (GELU).
        num_scalars (int): 2 (alpha, beta) or 1. Defaults to 2.
        zero_init (bool): Zero gamma of ``norm``. Defaults to True.
        scale (float): Update multiplier (buffer). Defaults to 1.0.
        drop_path (nn.Module, optional): The replaced layer's stochastic
            depth.
        with_cp (bool): Checkpoint the site (non-reentrant).
        recompute (bool): Store only the input for backward (and, with
            an affine ``nn.LayerNorm`` and ``nn.GELU``, per-token
            statistics) and re-run the light update in backward: the two
            matmuls only, GELU, LN and drop path differentiated by hand
            (:class:`~repl_mm.core.lean.TokenUpdate`, see
            :meth:`lean_applies`), else the whole update (a checkpoint).
            Same outputs and gradients. Defaults to True.
        device (torch.device, optional): Where the site's own tensors
            (alpha, beta, owned operators, ``scale``) are created.
            Defaults to the device of the first source linear's weight
            (torch's default when the site owns both operators).
        dtype (torch.dtype, optional): Their dtype, defaulting likewise.

    Example:
        >>> qkv, proj = nn.Linear(8, 24), nn.Linear(8, 8)
        >>> fc1, fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        >>> src = [('next', (qkv, proj))]
        >>> site = TransformerSite(8, {'attn': src, 'mlp': [
        ...     ('next', (fc1, fc2))]}, nn.LayerNorm(8), nn.GELU())
        >>> site(torch.rand(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self,
                 dim: int,
                 sources: Dict[str, OperatorSources],
                 norm: nn.Module,
                 act: nn.Module,
                 num_scalars: int = 2,
                 zero_init: bool = True,
                 scale: float = 1.0,
                 drop_path: Optional[nn.Module] = None,
                 with_cp: bool = False,
                 recompute: bool = True,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.dim = dim
        self._sources = {op: list(sources.get(op, ())) for op in _OPERATORS}
        factory = factory_kwargs(device, dtype,
                                 (lin.weight
                                  for srcs in self._sources.values()
                                  for _, pair in srcs for lin in pair))
        used = sorted({n
                       for s in self._sources.values()
                       for n, _ in s},
                      reverse=True)  # ['prev', 'next'] order
        # alpha weighs 'prev', beta weighs 'next'; one scalar with
        # num_scalars=1 (beta = 1 - alpha) or when one neighbour is used.
        self.tied = num_scalars == 1 and len(used) == 2
        for name in used:
            if self.tied and name == 'next':
                continue
            self.register_parameter('alpha' if name == 'prev' else 'beta',
                                    nn.Parameter(torch.empty((), **factory)))
        for op, srcs in self._sources.items():
            if not srcs:
                self.register_parameter(
                    f'{op}_weight',
                    nn.Parameter(torch.empty(dim, dim, **factory)))
        self.site_norm = norm
        self.act = act
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.zero_init = zero_init
        self.with_cp = with_cp
        self.recompute = recompute
        self._register_scale(scale, **factory)
        self.init_weights()

    @property
    def sources(self) -> Dict[str, Tuple[str, ...]]:
        return {
            op: tuple(n for n, _ in s) or ('own', )
            for op, s in self._sources.items()
        }

    def init_weights(self):
        """alpha = beta = 0.5; own operators like nn.Linear; LN gamma."""
        with torch.no_grad():
            for name in ('alpha', 'beta'):
                if hasattr(self, name):
                    getattr(self, name).fill_(0.5)
            for op, srcs in self._sources.items():
                if not srcs:
                    nn.init.kaiming_uniform_(
                        getattr(self, f'{op}_weight'), a=math.sqrt(5))
            if getattr(self.site_norm, 'weight', None) is not None:
                self.site_norm.weight.fill_(0.0 if self.zero_init else 1.0)
            if getattr(self.site_norm, 'bias', None) is not None:
                self.site_norm.bias.zero_()

    def coefficient(self, name: str) -> Tensor:
        """The scalar that weighs neighbour ``name`` ('prev' or 'next')."""
        if name == 'prev':
            return self.alpha
        return 1 - self.alpha if self.tied else self.beta

    @torch.no_grad()
    def mixing_summary(self) -> Dict[str, float]:
        """alpha (prev) and beta (next) as used (for logging)."""
        used = {n for s in self._sources.values() for n, _ in s}
        names = {'prev': 'alpha', 'next': 'beta'}
        return {names[n]: self.coefficient(n).item() for n in sorted(used)}

    def _synthesize(self) -> Dict[str, Tensor]:
        """The (d, d) operators Ahat ('attn') and Mhat ('mlp')
        (:meth:`synthesize` runs this with autocast off)."""
        out = {}
        for op, srcs in self._sources.items():
            if not srcs:
                out[op] = at_least_fp32(getattr(self, f'{op}_weight'))
                continue
            out[op] = operator_mix(
                op, [(self.coefficient(name), w_in.weight, w_out.weight)
                     for name, (w_in, w_out) in srcs])
        return out

    def _update(self, h: Tensor, attn: Tensor, mlp: Tensor) -> Tensor:
        """drop_path(scale * LN(GELU(h Mhat^T) + h Ahat^T))."""
        # (B, N, d) @ (d, d)^T -> (B, N, d)
        y = self.act(F.linear(h, mlp)) + F.linear(h, attn)
        return self.drop_path(self.scale * self.site_norm(y))

    def weights(self, h: Tensor) -> List[Tensor]:
        """[Ahat, Mhat] for input ``h``: autocast off for its device type
        too (:meth:`synthesize` turns it off for the weights'), in ``h``'s
        dtype unless autocast is on. Kept for backward; recomputation
        re-runs only :meth:`forward_with`."""
        with autocast_disabled(h.device.type):
            ops = self.synthesize()
        if not is_autocast_enabled(h.device.type):
            ops = {k: v.to(h.dtype) for k, v in ops.items()}
        return [ops['attn'], ops['mlp']]

    def trainable_tensors(self) -> List[Tensor]:
        """What the site's graph carries gradients to: its own parameters
        and the neighbours' weights."""
        return [*self.parameters()] + [
            lin.weight for srcs in self._sources.values() for _, pair in srcs
            for lin in pair
        ]

    def lean_applies(self, h: Tensor) -> bool:
        """Whether ``recompute`` runs through the lean update
        (:class:`~repl_mm.core.lean.TokenUpdate`) for input ``h``: the norm
        is exactly an affine ``nn.LayerNorm`` over the last dim, ``act``
        exactly ``nn.GELU`` (erf or tanh), drop path ``nn.Identity`` or
        per-sample (:func:`~repl_mm.core.lean.per_sample_drop_path`),
        autocast off for ``h``'s device type, and the model running eagerly
        (compiled, a checkpoint region recomputes instead:
        :func:`~repl_mm.core.lean.lean_allowed`)."""
        norm, act = self.site_norm, self.act
        return type(norm) in (nn.LayerNorm, ) and \
            tuple(norm.normalized_shape) == (h.shape[-1], ) and \
            norm.elementwise_affine and type(act) in (nn.GELU, ) and \
            act.approximate in ('none', 'tanh') and \
            per_sample_drop_path(self.drop_path) and \
            not is_autocast_enabled(h.device.type) and lean_allowed()

    def forward_with(self,
                     h: Tensor,
                     attn: Tensor,
                     mlp: Tensor,
                     block_args: tuple = ()) -> Tensor:
        """h + update with the given operators (``weights(h)``).

        ``block_args``, the replaced block's further positional arguments
        (a Swin block's ``hw_shape``), are ignored: the update is
        token-wise (spec §9.2: no windows, shifts or masks).

        With ``recompute`` (and no ``with_cp``, which checkpoints all of
        this), only ``h``, the operators and per-token statistics are
        stored for backward: the two matmuls re-run in backward, GELU, the
        norm and drop path are differentiated by hand
        (:class:`~repl_mm.core.lean.TokenUpdate`, where
        :meth:`lean_applies`), or else the whole update re-runs in backward
        (a checkpoint)."""
        if self.recompute and not self.with_cp and needs_graph(
                h, *self.trainable_tensors()):
            if self.lean_applies(h):
                return h + token_update(h, attn, mlp, self.site_norm, self.act,
                                        self.scale, self.drop_path)
            return h + recompute_in_backward(self._update, h, attn, mlp)
        return h + self._update(h, attn, mlp)

    def extra_repr(self) -> str:
        src = ', '.join(f"{op}<-{'+'.join(s)}"
                        for op, s in self.sources.items())
        return f'dim={self.dim}, {src}, tied={self.tied}'
