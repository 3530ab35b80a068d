"""``mode='interpolate'``: the supplement's Algorithm 1 (spec §2)."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..utils.compat import autocast_disabled
from .device import factory_kwargs
from .recompute import CheckpointedSite
from .synthesis import at_least_fp32

# (a weight-owning submodule of the block, [(neighbour name, its twin)])
Target = Tuple[nn.Module, Sequence[Tuple[str, nn.Module]]]


class InterpolatedBlock(CheckpointedSite, nn.Module):
    """Run the original block with weights interpolated from neighbours.

    Each target weight is set every forward to

    .. math::
        W = \\alpha W_{prev} + \\beta W_{next}

    (the supplement's scalars a, b, named ``alpha``/``beta`` here as in the
    ViT site so one ``paramwise_cfg`` key covers both; initialised to 0.5;
    a weight one neighbour cannot serve is drawn from the other only). The
    block's own copies of the target weights are deleted; its other
    parameters (norms; for ViT the MLP and the attention biases) stay its
    own and train.

    The interpolation runs in at least fp32 with autocast off and gives
    each weight in its twins' dtype; the block then runs it like its own
    (under autocast, as autocast decides). alpha and beta are created on
    the device and in the dtype of ``device``/``dtype`` (surgery passes
    the replaced block's).

    Args:
        block (nn.Module): The replaced block, kept as ``self.block``.
        targets (Sequence[Target]): Weights to interpolate and their
            neighbour twins of equal shape. A target with no twin keeps its
            own weight and is left out.
        with_cp (bool): Checkpoint non-reentrantly (the block's own
            ``with_cp`` is turned off so it does not checkpoint again).
        device (torch.device, optional): Where alpha and beta are created.
            Defaults to the device of the first target's weight.
        dtype (torch.dtype, optional): Their dtype, defaulting likewise.
    """

    def __init__(self,
                 block: nn.Module,
                 targets: Sequence[Target],
                 with_cp: bool = False,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        targets = [(mod, list(srcs)) for mod, srcs in targets]
        factory = factory_kwargs(device, dtype,
                                 (mod.weight for mod, srcs in targets if srcs))
        self._targets: List[Target] = []
        used = set()
        for mod, srcs in targets:
            srcs = list(srcs)
            if not srcs:
                continue
            for name, twin in srcs:
                if twin.weight.shape != mod.weight.shape:
                    raise ValueError(
                        f'{name} neighbour weight {tuple(twin.weight.shape)} '
                        f'does not match {tuple(mod.weight.shape)}')
                used.add(name)
            del mod.weight
            mod.weight = None
            self._targets.append((mod, srcs))
        for name in sorted(used, reverse=True):  # prev -> a, next -> b
            self.register_parameter(
                'alpha' if name == 'prev' else 'beta',
                nn.Parameter(torch.full((), 0.5, **factory)))
        if hasattr(block, 'with_cp'):
            block.with_cp = False
        self.block = block
        self.with_cp = with_cp

    @property
    def sources(self) -> List[Tuple[str, ...]]:
        return [tuple(n for n, _ in s) for _, s in self._targets]

    def init_weights(self):
        """The block's own ``init_weights`` (once: not when the block says
        ``is_init``), then alpha = beta = 0.5.

        A parent's ``init_weights`` recursion (mmengine's) calls this in
        place of the block's: running the block's own initialisation here
        gives the parameters it keeps (norms; for ViT the MLP) the
        initialisation upstream gives them, e.g. the xavier init of a ViT
        layer's FFN.
        """
        init = getattr(self.block, 'init_weights', None)
        if callable(init) and not getattr(self.block, 'is_init', False):
            init()
        self.reset_scalars()

    def reset_scalars(self):
        """alpha = beta = 0.5."""
        with torch.no_grad():
            for name in ('alpha', 'beta'):
                if hasattr(self, name):
                    getattr(self, name).fill_(0.5)

    def target_keys(self) -> List[str]:
        """State-dict keys, relative to the block, of the weights that are
        interpolated (``conv2.weight``, ``attn.qkv.weight``): the block no
        longer holds them."""
        names = {id(m): n for n, m in self.block.named_modules()}
        return [
            f'{names[id(mod)]}.weight' if names[id(mod)] else 'weight'
            for mod, _ in self._targets
        ]

    def adopt_block_state(self, state_dict: dict, prefix: str) -> List[str]:
        """Make the state of a plain block (an end-to-end checkpoint's)
        loadable into this module, in place.

        The block's own keys ``prefix + k`` move to ``prefix + 'block.' +
        k`` (where that key is absent): the parameters the block keeps
        (norms, a conv no neighbour serves, for ViT the MLP, the LNs and
        the attention biases) load from them. The keys of the interpolated
        weights are removed: those weights are interpolated from the
        neighbours, not loaded. alpha and beta, which a plain block has
        not, keep their values, so the state loads strictly.

        Args:
            state_dict (dict): The state being loaded (edited in place).
            prefix (str): This module's prefix in it (``'layer2.1.'``).

        Returns:
            list[str]: The removed keys (the interpolated weights').
        """
        inner = prefix + 'block.'
        targets = set(self.target_keys())
        removed = []
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if key.startswith(inner) or rest in ('alpha', 'beta'):
                continue
            if rest in targets:
                del state_dict[key]
                removed.append(key)
            elif inner + rest not in state_dict:
                state_dict[inner + rest] = state_dict.pop(key)
        for name in ('alpha', 'beta'):
            if hasattr(self, name) and prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).detach()
        return removed

    @torch.no_grad()
    def mixing_summary(self) -> Dict[str, float]:
        """alpha (prev) and beta (next) (for logging)."""
        return {
            n: getattr(self, n).item()
            for n in ('alpha', 'beta') if hasattr(self, n)
        }

    def interpolate(self, device_type: Optional[str] = None) -> List[Tensor]:
        """The target weights, alpha W_prev + beta W_next, in at least fp32
        with autocast off (for ``device_type``, the input's, and the
        twins' device type), given in the twins' dtype."""
        coef = {
            'prev': getattr(self, 'alpha', None),
            'next': getattr(self, 'beta', None)
        }
        out = []
        for _, srcs in self._targets:
            twin = srcs[0][1].weight
            with autocast_disabled(device_type or twin.device.type,
                                   twin.device.type):
                w = sum(
                    at_least_fp32(coef[name]) * at_least_fp32(t.weight)
                    for name, t in srcs)
            out.append(w.to(twin.dtype))
        return out

    def weights(self, x: Tensor) -> List[Tensor]:
        """The interpolated target weights for input ``x`` (autocast off
        for its device type too); kept for backward under ``with_cp``."""
        with autocast_disabled(x.device.type):  # and the twins' (inside)
            return self.interpolate()

    def forward_with(self, x: Tensor, *weights: Tensor,
                     block_args: tuple = ()) -> Tensor:
        """The block with the given target weights, called as
        ``block(x, *block_args)`` (a Swin block takes ``hw_shape``).

        Through ``torch.func.functional_call``: the weights are swapped in
        for the call and the block is left as it was, which dynamo can
        trace inside a checkpoint region (setting module attributes there
        is a side effect it refuses)."""
        return torch.func.functional_call(
            self.block, dict(zip(self._target_names(), weights)),
            (x, *block_args))

    def _target_names(self) -> List[str]:
        """The targets' weight names relative to ``self.block``."""
        names = {id(m): n for n, m in self.block.named_modules()}
        return [
            f'{names[id(mod)]}.weight' if names[id(mod)] else 'weight'
            for mod, _ in self._targets
        ]

    def trainable_tensors(self) -> List[Tensor]:
        """Its own parameters (block and scalars) and the neighbours'
        weights it interpolates."""
        return [*self.parameters()] + [
            twin.weight for _, srcs in self._targets for _, twin in srcs
        ]
