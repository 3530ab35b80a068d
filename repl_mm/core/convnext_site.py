"""The computing layer that replaces a ConvNeXt block (spec §9.3), and its
static counterpart (``mode='static'``)."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.compat import autocast_disabled, is_autocast_enabled
from .device import Fp32Synthesis, ScaleBuffer, factory_kwargs
from .recompute import CheckpointedSite, needs_graph, recompute_in_backward
from .static import _InferenceOnly, _scale_affine, register_static_site
from .synthesis import at_least_fp32, operator_mix, pointwise_mix

# Sources of the depthwise operator D: (neighbour name, its depthwise conv);
# of the pointwise operator M: (neighbour name, (pw1, pw2)).
DepthwiseSources = Sequence[Tuple[str, nn.Module]]
PointwiseSources = Sequence[Tuple[str, Tuple[nn.Module, nn.Module]]]

#: The site's two operators: 'dw' (D, per channel) and 'pw' (M, C x C).
OPERATORS = ('dw', 'pw')


def pointwise_matrix(weight: Tensor) -> Tensor:
    """An ``nn.Linear`` weight (Cout, Cin), or a 1x1 conv weight (Cout,
    Cin, 1, 1) viewed as one: the matrix a pointwise layer applies."""
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        return weight.flatten(1)  # (Cout, Cin, 1, 1) -> (Cout, Cin)
    if weight.dim() == 2:
        return weight
    raise ValueError('expected a linear or 1x1 conv weight, got shape '
                     f'{tuple(weight.shape)}')


def channel_layer_norm(norm: nn.Module,
                       dim: int,
                       device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None) -> nn.LayerNorm:
    """A fresh ``nn.LayerNorm`` of width ``dim`` over the channels (the
    last dim of a channels-last map), with ``norm``'s ``eps`` and
    affinity: the site's LN of spec §9.3 (never shared with a block).

    Args:
        norm (nn.Module): The replaced block's LayerNorm (mmpretrain's
            ``LayerNorm2d`` or any ``nn.LayerNorm`` of width ``dim``).
        dim (int): The channel width C.
        device (torch.device, optional): Where it is created.
        dtype (torch.dtype, optional): Its dtype.
    """
    if not isinstance(norm, nn.LayerNorm) or \
            tuple(norm.normalized_shape) != (dim, ):
        raise ValueError("a ConvNeXt block's norm must be a LayerNorm over "
                         f'its {dim} channels, got {norm!r}')
    return nn.LayerNorm(
        dim,
        eps=norm.eps,
        elementwise_affine=norm.elementwise_affine,
        device=device,
        dtype=dtype)


class ConvNeXtSite(Fp32Synthesis, ScaleBuffer, CheckpointedSite, nn.Module):
    """RepL computing layer for a ConvNeXt block (spec §9.3).

    Each kept neighbour l contributes its depthwise kernel summed over its
    taps, :math:`D_l = S(W_{dw})` (length C), and its pointwise MLP as one
    matrix, :math:`M_l = W_{pw2} W_{pw1}` (C x C):

    .. math::
        \\hat D = \\phi_{prev} \\odot D_{prev} + \\phi_{next} \\odot D_{next},
        \\quad
        \\hat M = \\alpha M_{prev} + \\beta M_{next}

        out = h + \\mathrm{DropPath}(scale \\cdot
              LN(\\mathrm{GELU}(\\hat M (\\hat D \\odot h))))

    phi (length C) and alpha, beta (scalars; beta = 1 - alpha with
    ``num_scalars=1``) start at 0.5. An operator not drawn from the
    neighbours (``sources`` empty for it: ``vit_weights`` reads ``attn`` as
    D and ``mlp`` as M, or no neighbour of this width) is the site's own:
    D a length-C vector initialised to 1, M a (C, C) weight initialised
    like ``nn.Linear``. LN is a fresh ``nn.LayerNorm`` over the channels
    (of the channels-last view; the block's ``eps``), gamma 0 with
    ``zero_init`` (the site starts as its skip path). The neighbours'
    layer scale, biases and GRN are not synthesized.

    Evaluation order (the function is the spec's): :math:`\\hat D` is
    folded into :math:`\\hat M` in weight space, :math:`W = \\hat M
    \\mathrm{diag}(\\hat D)` (C^2 multiplications per forward), so a pixel
    costs C^2 multiply-adds (the block's: 49 C + 8 C^2), applied to the
    channels-last view of ``h`` as mmpretrain's block applies its linear
    pointwise layers; input and output are channel-first (B, C, H, W).
    :meth:`weights` gives Dhat and Mhat (kept for backward: a fold
    outside :meth:`forward_with` would keep both and W), and
    :meth:`forward_with` folds them. Synthesis does not grow with the
    batch but is not free: each M_l costs r C^3 multiply-adds (r = 4, the
    MLP ratio) per forward, about twice that again in backward; for
    ConvNeXt-T's stage-4 site (C = 768) about 1.8 G per step, what the
    replaced block (8 C^2 per pixel) costs on about 400 pixels.

    Precision and placement as the other sites: synthesis (S, the mixes,
    the fold) runs in at least fp32 with autocast off for the input's and
    the weights' device types; W is then applied under autocast like any
    linear (without autocast, in the input's dtype). Every tensor the site
    creates is on ``device`` and in ``dtype`` (surgery passes the replaced
    block's); ``scale`` is a non-persistent buffer that survives
    ``to_empty``.

    Decisions the spec leaves open (documented, not options):

    - ``residual`` does not apply: the skip path is part of the formula
      (as for ViT sites).
    - ``recompute=True`` runs the update as a non-reentrant checkpoint:
      backward keeps ``h``, Dhat and Mhat and re-runs the fold, linear,
      GELU, LN and drop path (no hand-written backward for this kind; any
      norm, activation and autocast).

    Args:
        dim (int): Channel width C.
        sources (dict[str, Sequence]): For ``'dw'``, (name, depthwise conv)
            pairs; for ``'pw'``, (name, (pw1, pw2)) pairs (``nn.Linear`` or
            1x1 ``nn.Conv2d``); empty or missing means the site owns it.
        norm (nn.LayerNorm): Fresh LayerNorm of width C
            (:func:`channel_layer_norm`).
        act (nn.Module): The activation (GELU).
        num_scalars (int): 2 (alpha, beta) or 1. Defaults to 2.
        zero_init (bool): Zero gamma of ``norm``. Defaults to True.
        scale (float): Update multiplier (buffer). Defaults to 1.0.
        drop_path (nn.Module, optional): The replaced block's stochastic
            depth.
        with_cp (bool): Checkpoint the site (non-reentrant). Defaults to
            False.
        recompute (bool): Keep only ``h``, Dhat and Mhat for backward and
            re-run the update there (a checkpoint). Same outputs and
            gradients.
            Defaults to True.
        device (torch.device, optional): Where phi, alpha, beta, owned
            operators and ``scale`` are created. Defaults to the first
            source weight's device (torch's default when the site owns
            both operators).
        dtype (torch.dtype, optional): Their dtype, defaulting likewise.

    Example:
        >>> dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        >>> pw1, pw2 = nn.Linear(8, 32), nn.Linear(32, 8)
        >>> site = ConvNeXtSite(8, {'dw': [('prev', dw)],
        ...                         'pw': [('prev', (pw1, pw2))]},
        ...                     nn.LayerNorm(8), nn.GELU())
        >>> site(torch.rand(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self,
                 dim: int,
                 sources: Dict[str, Sequence],
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
        unknown = sorted(set(sources) - set(OPERATORS))
        if unknown:
            raise ValueError(f'unknown ConvNeXt site operators {unknown}; '
                             f'known are {list(OPERATORS)}')
        self.dim = dim
        self._sources = {op: list(sources.get(op, ())) for op in OPERATORS}
        for name, conv in self._sources['dw']:
            if conv.weight.dim() != 4 or tuple(
                    conv.weight.shape[:2]) != (dim, 1):
                raise ValueError(
                    f'{name} neighbour depthwise weight has shape '
                    f'{tuple(conv.weight.shape)}, the site needs '
                    f'({dim}, 1, kh, kw)')
        for name, (pw1, pw2) in self._sources['pw']:
            w1, w2 = (pointwise_matrix(pw1.weight),
                      pointwise_matrix(pw2.weight))
            if w1.shape[1] != dim or w2.shape[0] != dim or \
                    w2.shape[1] != w1.shape[0]:
                raise ValueError(
                    f'{name} neighbour pointwise weights have shapes '
                    f'{tuple(pw1.weight.shape)}, {tuple(pw2.weight.shape)}'
                    f': not a {dim} -> r -> {dim} MLP')
        factory = factory_kwargs(device, dtype, self._source_weights())
        for name, _ in self._sources['dw']:
            self.register_parameter(f'phi_{name}',
                                    nn.Parameter(torch.empty(dim, **factory)))
        used = [n for n, _ in self._sources['pw']]
        # alpha weighs 'prev', beta 'next'; one scalar with num_scalars=1
        # (beta = 1 - alpha) when both neighbours serve.
        self.tied = num_scalars == 1 and len(used) == 2
        for name in used:
            if self.tied and name == 'next':
                continue
            self.register_parameter('alpha' if name == 'prev' else 'beta',
                                    nn.Parameter(torch.empty((), **factory)))
        if not self._sources['dw']:
            self.dw_weight = nn.Parameter(torch.empty(dim, **factory))
        if not self._sources['pw']:
            self.pw_weight = nn.Parameter(torch.empty(dim, dim, **factory))
        self.site_norm = norm
        self.act = act
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.zero_init = zero_init
        self.with_cp = with_cp
        self.recompute = recompute
        self._register_scale(scale, **factory)
        self.init_weights()

    def _source_weights(self) -> List[Tensor]:
        return [conv.weight for _, conv in self._sources['dw']] + [
            lin.weight for _, pair in self._sources['pw'] for lin in pair
        ]

    @property
    def sources(self) -> Dict[str, Tuple[str, ...]]:
        """Per operator, the neighbour names it mixes (``('own',)``)."""
        return {
            op: tuple(n for n, _ in s) or ('own', )
            for op, s in self._sources.items()
        }

    def init_weights(self):
        """phi = alpha = beta = 0.5; an own D of ones, an own M like
        ``nn.Linear``; norm gamma 0 (``zero_init``) or 1, beta 0."""
        with torch.no_grad():
            for name, _ in self._sources['dw']:
                self.phi(name).fill_(0.5)
            for name in ('alpha', 'beta'):
                if hasattr(self, name):
                    getattr(self, name).fill_(0.5)
            if not self._sources['dw']:
                self.dw_weight.fill_(1.0)
            if not self._sources['pw']:
                nn.init.kaiming_uniform_(self.pw_weight, a=math.sqrt(5))
            if getattr(self.site_norm, 'weight', None) is not None:
                self.site_norm.weight.fill_(0.0 if self.zero_init else 1.0)
            if getattr(self.site_norm, 'bias', None) is not None:
                self.site_norm.bias.zero_()

    # -- public accessors (converters, diagnostics) ----------------------
    def source_dw(self) -> List[Tuple[str, nn.Module]]:
        """(neighbour name, depthwise conv) pairs D is drawn from; empty
        when the site owns D."""
        return list(self._sources['dw'])

    def source_pw(self) -> List[Tuple[str, Tuple[nn.Module, nn.Module]]]:
        """(neighbour name, (pw1, pw2)) pairs M is drawn from; empty when
        the site owns M."""
        return list(self._sources['pw'])

    def phi(self, name: str) -> nn.Parameter:
        """phi of neighbour ``name`` ('prev' or 'next')."""
        return getattr(self, f'phi_{name}')

    def coefficient(self, name: str) -> Tensor:
        """The scalar that weighs neighbour ``name``'s M."""
        if name == 'prev':
            return self.alpha
        return 1 - self.alpha if self.tied else self.beta

    @torch.no_grad()
    def mixing_summary(self) -> Dict[str, float]:
        """Mean phi per neighbour, and alpha (prev) / beta (next) as used
        (for logging)."""
        out = {
            f'phi_{name}': self.phi(name).mean().item()
            for name, _ in self._sources['dw']
        }
        names = {'prev': 'alpha', 'next': 'beta'}
        for name, _ in self._sources['pw']:
            out[names[name]] = self.coefficient(name).item()
        return out

    # -- the function ------------------------------------------------------
    def _synthesize(self) -> Dict[str, Tensor]:
        """Dhat (C,) as ``'dw'`` and Mhat (C, C) as ``'pw'`` from the live
        neighbours (:meth:`synthesize` runs this with autocast off)."""
        srcs = self._sources
        if srcs['dw']:
            # sum_s phi_s * S(W_s): (C, 1, kh, kw) -> (C, 1) -> (C,)
            dw = pointwise_mix([(self.phi(name), conv.weight)
                                for name, conv in srcs['dw']])[:, 0]
        else:
            dw = at_least_fp32(self.dw_weight)
        if srcs['pw']:
            pw = operator_mix(
                'mlp', [(self.coefficient(name), pointwise_matrix(
                    pw1.weight), pointwise_matrix(pw2.weight))
                        for name, (pw1, pw2) in srcs['pw']])
        else:
            pw = at_least_fp32(self.pw_weight)
        return {'dw': dw, 'pw': pw}

    @staticmethod
    def fold(dw: Tensor, pw: Tensor) -> Tensor:
        """W = Mhat diag(Dhat): (C, C) from Dhat (C,) and Mhat (C, C), in
        at least fp32 (weight-space math)."""
        return at_least_fp32(pw) * at_least_fp32(dw)[None, :]  # (1, C)

    def operator(self) -> Tensor:
        """W = Mhat diag(Dhat), (C, C), in at least fp32 with autocast off:
        the one matrix the site applies per pixel."""
        ops = self.synthesize()
        with autocast_disabled(ops['pw'].device.type):
            return self.fold(ops['dw'], ops['pw'])

    def weights(self, h: Tensor) -> List[Tensor]:
        """[Dhat, Mhat] for input ``h``, in at least fp32 (autocast off for
        ``h``'s device type too). Kept for backward (C + C^2 values, the
        outputs of the mixing Functions, which keep only their inputs);
        recomputation re-runs only :meth:`forward_with`, which folds them
        into W."""
        with autocast_disabled(h.device.type):
            ops = self.synthesize()
        return [ops['dw'], ops['pw']]

    def _update(self, h: Tensor, dw: Tensor, pw: Tensor) -> Tensor:
        """drop_path(scale * LN(GELU(W h))) on the channels, W = Mhat
        diag(Dhat) folded here (at least fp32, autocast off; then in
        ``h``'s dtype unless autocast is on)."""
        types = (h.device.type, pw.device.type)
        if any(is_autocast_enabled(t) for t in types):
            with autocast_disabled(*types):
                w = self.fold(dw, pw)
        else:  # no context manager to trace (dynamo 2.1 cannot)
            w = self.fold(dw, pw).to(h.dtype)
        x = h.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        y = self.site_norm(self.act(F.linear(x, w)))
        y = self.drop_path(self.scale * y)
        return y.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def trainable_tensors(self) -> List[Tensor]:
        """What the site's graph carries gradients to: its own parameters
        and the neighbours' weights."""
        return [*self.parameters()] + self._source_weights()

    def forward_with(self, h: Tensor, dw: Tensor, pw: Tensor) -> Tensor:
        """h + update with the given operators (``weights(h)``).

        With ``recompute`` (and no ``with_cp``, which checkpoints all of
        this), only ``h``, Dhat and Mhat are kept for backward, which
        re-runs the fold and the update (a non-reentrant checkpoint; drop
        path's RNG replayed)."""
        if self.recompute and not self.with_cp and needs_graph(
                h, *self.trainable_tensors()):
            return h + recompute_in_backward(self._update, h, dw, pw)
        return h + self._update(h, dw, pw)

    def extra_repr(self) -> str:
        src = ', '.join(f"{op}<-{'+'.join(s)}"
                        for op, s in self.sources.items())
        return f'dim={self.dim}, {src}, tied={self.tied}'


class StaticConvNeXtSite(_InferenceOnly, nn.Module):
    """A :class:`ConvNeXtSite` computed once (eval mode, spec §9.3).

    .. math::
        out = h + LN'(\\mathrm{GELU}(W h)), \\quad
        W = \\hat M \\mathrm{diag}(\\hat D)

    with W stored as the bias-free ``nn.Linear`` ``pointwise`` (applied to
    the channels-last view, as the trained site applies it) and ``LN'`` the
    trained site's LayerNorm with ``scale`` folded into its affine
    parameters (exact). Drop path is the identity in eval mode and is not
    kept. Inference only (its forward raises in train mode).

    Built empty (zero weight and norm affine: the skip path), on the
    device and in the dtype of ``device``/``dtype`` (surgery passes the
    replaced block's); :meth:`load_site` fills it from a trained site.

    Args:
        dim (int): Channel width C.
        norm (nn.LayerNorm): A LayerNorm like the trained site's.
        act (nn.Module): The activation (GELU).
        device (torch.device, optional): Where the linear is created.
        dtype (torch.dtype, optional): Its dtype.

    Example:
        >>> site = StaticConvNeXtSite(8, nn.LayerNorm(8), nn.GELU())
        >>> site.eval()(torch.rand(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self,
                 dim: int,
                 norm: nn.Module,
                 act: nn.Module,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.dim = dim
        self.pointwise = nn.Linear(
            dim, dim, bias=False, device=device, dtype=dtype)
        self.site_norm = norm
        self.act = act
        self.init_weights()

    def init_weights(self):
        """Zero weight and norm affine (the update is zero until
        loaded)."""
        with torch.no_grad():
            for t in self.parameters():
                t.zero_()

    @torch.no_grad()
    def load_site(self, site: ConvNeXtSite):
        """Set W and the norm from ``site`` (synthesized as the site does:
        at least fp32, autocast off), stored in this module's dtype."""
        if not isinstance(site, ConvNeXtSite):
            raise TypeError('expected a ConvNeXtSite, got '
                            f'{type(site).__name__}')
        if site.dim != self.dim:
            raise ValueError(f'ConvNeXtSite of width {site.dim} does not '
                             f'match this static site (width {self.dim})')
        w = site.operator()
        assert self.pointwise.weight.shape == w.shape
        self.pointwise.weight.copy_(w)
        self.site_norm.load_state_dict(site.site_norm.state_dict())
        _scale_affine(self.site_norm, float(site.scale), 'StaticConvNeXtSite')

    def forward(self, h: Tensor) -> Tensor:
        self._check_eval()
        x = h.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        y = self.site_norm(self.act(self.pointwise(x)))
        return h + y.permute(0, 3, 1, 2)  # -> (B, C, H, W)

    def extra_repr(self) -> str:
        return f'dim={self.dim}'


register_static_site(StaticConvNeXtSite)

__all__ = [
    'ConvNeXtSite', 'OPERATORS', 'StaticConvNeXtSite', 'channel_layer_norm',
    'pointwise_matrix'
]
