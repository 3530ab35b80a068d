"""``mode='static'``: sites whose operator is an ordinary weight, computed
once from a trained RepL model for deployment (paper A.5.3).

A static site holds no neighbour references and synthesizes nothing: what
a trained site computes in eval mode is folded, once, into plain 1x1
convs / linears. It is for inference only (eval mode): its forward raises
in train mode, where the trained site's norm would use batch statistics
and its drop path would be active.

- :class:`StaticConvSite` stands in for a :class:`ConvSite`.
- :class:`StaticTransformerSite` stands in for a :class:`TransformerSite`.
- A static site of ``mode='interpolate'`` is the original block type with
  the interpolated weights baked in (:func:`interpolated_block_state`): a
  plain block under the replaced block's own key names.

:func:`load_static_site` fills any of them from the trained site.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils.compat import autocast_disabled
from .cnn_site import ConvSite
from .interpolate import InterpolatedBlock
from .synthesis import (batch_norm_affine, chain_product_groups, fold_affine,
                        fold_chain, fold_grouped)
from .vit_site import TransformerSite


def foldable_norm(norm: nn.Module) -> bool:
    """Whether eval-mode ``norm`` is a per-channel affine map (batch norm
    with running statistics, SyncBN included), exactly foldable into the
    weight before it."""
    return isinstance(norm, _BatchNorm) and norm.track_running_stats


def should_fold_static(shapes: Sequence[Tuple[int, int]],
                       conv_groups: Optional[Sequence[int]] = None) -> bool:
    """Whether a static site stores its chain folded into one matrix: when
    that costs no more multiply-adds per pixel (BasicBlock sites: C^2
    against 2 C^2); a Bottleneck site keeps its three matrices (16 m^2
    folded against 9 m^2 for the chain of widths 4m -> m -> m -> 4m).

    A grouped position (``conv_groups``, spec §9.1) costs Cout Cin / g
    per pixel, and the folded chain Cout_J Cin_1 / g with the groups g of
    the product (:func:`~repl_mm.core.synthesis.chain_product_groups`: 1
    once a dense position is in it). A ResNeXt 32x4d site (C -> C/2 ->
    C/2 grouped -> C) folds: C^2 against C^2 + C^2 / 128.
    """
    if conv_groups is None:
        conv_groups = (1, ) * len(shapes)
    chain = sum(cout * cin // g for (cout, cin), g in zip(shapes, conv_groups))
    folded = shapes[-1][0] * shapes[0][1] // chain_product_groups(conv_groups)
    return len(shapes) > 1 and folded <= chain


def _scale_affine(norm: nn.Module, scale: float, what: str):
    """Multiply a norm's affine parameters by ``scale`` in place: exact
    for ``scale * norm(x)``. A norm without them cannot hold a scale."""
    if scale == 1.0:
        return
    if getattr(norm, 'weight', None) is None or getattr(norm, 'bias',
                                                        None) is None:
        raise ValueError(
            f'{what}: a {type(norm).__name__} without affine parameters '
            f'cannot hold the site scale {scale}; convert with scale=1')
    norm.weight.mul_(scale)
    norm.bias.mul_(scale)


class _InferenceOnly:
    """Static sites compute the trained site's eval-mode function only."""

    def _check_eval(self):
        if self.training:
            raise RuntimeError(
                f"{type(self).__name__} (replacement mode='static') is for "
                'inference only: call model.eval() first. Its weights fold '
                "the trained site's eval-mode norm; train the RepL model "
                "(mode='synthesize') instead")


class StaticConvSite(_InferenceOnly, nn.Module):
    """A :class:`ConvSite` computed once: plain pointwise convs.

    The trained site computes (eval mode, spec §3)

    .. math::
        out = act(scale \\cdot BN(\\hat W^J \\cdots \\hat W^1 h) + h)

    With BN's eval map :math:`BN(y) = a \\odot y + b`, this is

    .. math::
        out = act(\\mathrm{diag}(scale\\, a) \\hat W^J \\cdots \\hat W^1 h
                  + scale\\, b + h)

    stored as 1x1 ``nn.Conv2d`` layers ``pointwise.{k}``: the chain
    folded into one (Cout_J, Cin_1) matrix when that costs no more per
    pixel (:func:`should_fold_static`: BasicBlock sites), else one matrix
    per position (Bottleneck sites); the last carries the bias. A grouped
    position (spec §9.1) is a grouped 1x1 conv with its groups; a folded
    chain has the groups of the product. A site
    norm that is not batch norm (e.g. GN) cannot be folded: it is kept as
    ``site_norm`` with the scale folded into its affine parameters. The
    residual and the activation are kept; drop path is the identity in
    eval mode and is not kept.

    Built empty (zero weights: the skip path) from the replaced block's
    shapes, on the device and in the dtype of ``device``/``dtype``
    (surgery passes the replaced block's); :meth:`load_site` fills it from
    a trained site.

    Args:
        shapes (Sequence[tuple[int, int]]): (Cout_j, Cin_j) per position.
        norm (nn.Module): A norm like the trained site's (its type decides
            whether it is folded; its values come from :meth:`load_site`).
        act (nn.Module): Activation after the residual sum.
        residual (bool): Keep ``+ h``. Defaults to True.
        device (torch.device, optional): Where the pointwise convs are
            created. Defaults to torch's default.
        dtype (torch.dtype, optional): Their dtype. Defaults to torch's.
        conv_groups (Sequence[int], optional): The trained site's groups
            per position. Defaults to 1 for every position.

    Example:
        >>> site = StaticConvSite([(8, 8), (8, 8)], nn.BatchNorm2d(8),
        ...                       nn.ReLU())
        >>> [tuple(c.weight.shape) for c in site.pointwise]
        [(8, 8, 1, 1)]
        >>> site.eval()(torch.rand(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self,
                 shapes: Sequence[Tuple[int, int]],
                 norm: nn.Module,
                 act: nn.Module,
                 residual: bool = True,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None,
                 conv_groups: Optional[Sequence[int]] = None):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.conv_groups = (1, ) * len(self.shapes) if conv_groups is None \
            else tuple(conv_groups)
        self.folded = should_fold_static(self.shapes, self.conv_groups)
        self.norm_folded = foldable_norm(norm)
        layers = [(self.shapes[-1][0], self.shapes[0][1],
                   chain_product_groups(self.conv_groups))] \
            if self.folded else [
                (cout, cin, g)
                for (cout, cin), g in zip(self.shapes, self.conv_groups)]
        self.pointwise = nn.ModuleList(
            nn.Conv2d(
                cin,
                cout,
                1,
                bias=self.norm_folded and k == len(layers) - 1,
                groups=g,
                device=device,
                dtype=dtype) for k, (cout, cin, g) in enumerate(layers))
        if not self.norm_folded:
            self.site_norm = norm
        self.act = act
        self.residual = residual
        self.init_weights()

    def init_weights(self):
        """Zero weights (the site's update is zero until loaded)."""
        with torch.no_grad():
            for t in self.parameters():
                t.zero_()

    @torch.no_grad()
    def load_site(self, site: ConvSite):
        """Set the weights to ``site``'s eval-mode operator (computed in
        float64 with autocast off, stored in this module's dtype)."""
        if not isinstance(site, ConvSite):
            raise TypeError(f'expected a ConvSite, got {type(site).__name__}')
        with autocast_disabled(site._weights_device_type(),
                               self.pointwise[0].weight.device.type):
            self._load_site(site)

    def _load_site(self, site: ConvSite):
        theirs = tuple(getattr(site, 'conv_groups', (1, ) * len(site.shapes)))
        if site.shapes != self.shapes or site.residual != self.residual or \
                theirs != self.conv_groups:
            raise ValueError(
                f'ConvSite with shapes {site.shapes}, conv_groups {theirs}, '
                f'residual={site.residual} does not match this static site '
                f'(shapes {self.shapes}, conv_groups {self.conv_groups}, '
                f'residual={self.residual})')
        if foldable_norm(site.site_norm) != self.norm_folded:
            raise ValueError(
                f'site norm {type(site.site_norm).__name__} does not match '
                'the static site (built for a '
                f"{'batch' if self.norm_folded else 'non-batch'} norm)")
        mats = [m.double() for m in site.synthesize()]
        if self.folded and all(g == 1 for g in self.conv_groups):
            mats = [fold_chain(mats)]
        elif self.folded:
            mats = [fold_grouped(mats, self.conv_groups)[0]]
        scale = site.scale.double()
        if self.norm_folded:
            norm = site.site_norm
            a, b = batch_norm_affine(
                norm.running_mean.double(), norm.running_var.double(),
                None if norm.weight is None else norm.weight.double(),
                None if norm.bias is None else norm.bias.double(), norm.eps)
            mats[-1], bias = fold_affine(mats[-1], scale * a, scale * b)
            self.pointwise[-1].bias.copy_(bias)
        else:
            self.site_norm.load_state_dict(site.site_norm.state_dict())
            _scale_affine(self.site_norm, float(scale), 'StaticConvSite')
        for conv, m in zip(self.pointwise, mats):
            assert conv.weight.shape[:2] == m.shape, (conv.weight.shape,
                                                      m.shape)
            conv.weight.copy_(m[:, :, None, None])  # (Cout, Cin, 1, 1)

    def forward(self, h: Tensor, *block_args) -> Tensor:
        """The folded chain; ``block_args`` (a block's further positional
        arguments) are ignored: the function is pixel-wise."""
        self._check_eval()
        x = h
        for conv in self.pointwise:
            x = conv(x)
        if not self.norm_folded:
            x = self.site_norm(x)
        return self.act(x + h if self.residual else x)

    def extra_repr(self) -> str:
        groups = '' if all(g == 1 for g in self.conv_groups) else \
            f'conv_groups={self.conv_groups}, '
        return (f'folded={self.folded}, norm_folded={self.norm_folded}, '
                f'{groups}residual={self.residual}')


class StaticTransformerSite(_InferenceOnly, nn.Module):
    """A :class:`TransformerSite` computed once (paper Eq. 10, eval mode).

    .. math::
        H_{out} = H + LN'(\\mathrm{GELU}(H \\hat M^T) + H \\hat A^T)

    with the synthesized operators stored as bias-free ``nn.Linear``
    weights ``attn`` (Ahat) and ``mlp`` (Mhat), and ``LN'`` the trained
    site's LayerNorm with ``scale`` folded into its affine parameters
    (exact). LN itself normalises per token and cannot be folded into the
    linears. Drop path is the identity in eval mode and is not kept.

    Built empty, on the device and in the dtype of ``device``/``dtype``
    (surgery passes the replaced layer's).

    Args:
        dim (int): Embedding width d.
        norm (nn.Module): A LayerNorm like the trained site's.
        act (nn.Module): The MLP activation (GELU).
        device (torch.device, optional): Where the linears are created.
            Defaults to torch's default.
        dtype (torch.dtype, optional): Their dtype. Defaults to torch's.

    Example:
        >>> site = StaticTransformerSite(8, nn.LayerNorm(8), nn.GELU())
        >>> site.eval()(torch.rand(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self,
                 dim: int,
                 norm: nn.Module,
                 act: nn.Module,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.dim = dim
        self.attn = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.mlp = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.site_norm = norm
        self.act = act
        self.init_weights()

    def init_weights(self):
        """Zero weights and norm affine (the update is zero until
        loaded)."""
        with torch.no_grad():
            for t in self.parameters():
                t.zero_()

    @torch.no_grad()
    def load_site(self, site: TransformerSite):
        """Set Ahat, Mhat and the norm from ``site`` (synthesized as the
        site does: at least fp32, autocast off)."""
        if not isinstance(site, TransformerSite):
            raise TypeError('expected a TransformerSite, got '
                            f'{type(site).__name__}')
        if site.dim != self.dim:
            raise ValueError(f'TransformerSite of width {site.dim} does not '
                             f'match this static site (width {self.dim})')
        ops = site.synthesize()
        for name in ('attn', 'mlp'):
            lin = getattr(self, name)
            assert lin.weight.shape == ops[name].shape
            lin.weight.copy_(ops[name])
        self.site_norm.load_state_dict(site.site_norm.state_dict())
        _scale_affine(self.site_norm, float(site.scale),
                      'StaticTransformerSite')

    def forward(self, h: Tensor, *block_args) -> Tensor:
        """The fixed update; ``block_args`` (a Swin block's ``hw_shape``)
        are ignored: the function is token-wise."""
        self._check_eval()
        # (B, N, d) -> (B, N, d)
        return h + self.site_norm(self.act(self.mlp(h)) + self.attn(h))

    def extra_repr(self) -> str:
        return f'dim={self.dim}'


def interpolated_block_state(site: InterpolatedBlock) -> Dict[str, Tensor]:
    """The state dict of ``site``'s block with the interpolated weights
    baked in: what a plain block of the same type loads (its own key
    names, no ``block.`` prefix, no alpha/beta)."""
    names = {id(m): n for n, m in site.block.named_modules()}
    state = dict(site.block.state_dict())
    with torch.no_grad():
        for (mod, _), w in zip(site._targets, site.interpolate()):
            prefix = names[id(mod)]
            state[f'{prefix}.weight' if prefix else 'weight'] = w.detach()
    return state


STATIC_SITES = (StaticConvSite, StaticTransformerSite)


def register_static_site(cls: type) -> type:
    """Add ``cls`` (a static stand-in with ``load_site(site)``, defined in
    another module, e.g. :class:`~repl_mm.core.convnext_site.
    StaticConvNeXtSite`) to :data:`STATIC_SITES`, which
    :func:`load_static_site` dispatches on; returns ``cls``."""
    global STATIC_SITES
    if cls not in STATIC_SITES:
        STATIC_SITES = STATIC_SITES + (cls, )
    return cls


@torch.no_grad()
def load_static_site(static: nn.Module, site: nn.Module):
    """Fill the static stand-in ``static`` from the trained ``site``.

    Args:
        static (nn.Module): A :class:`StaticConvSite`,
            :class:`StaticTransformerSite` or (``static_from=
            'interpolate'``) a plain block.
        site (nn.Module): The trained :class:`ConvSite`,
            :class:`TransformerSite` or :class:`InterpolatedBlock`.
    """
    if isinstance(static, STATIC_SITES):
        static.load_site(site)
    elif isinstance(site, InterpolatedBlock):
        state = interpolated_block_state(site)
        for k, v in static.state_dict().items():
            if k in state and state[k].shape != v.shape:
                raise ValueError(f'{k}: interpolated weight of shape '
                                 f'{tuple(state[k].shape)}, the static '
                                 f'block needs {tuple(v.shape)}')
        static.load_state_dict(state, strict=True)
    else:
        raise TypeError(f'cannot make a static {type(static).__name__} from '
                        f'a {type(site).__name__}')
