"""Upstream's layer-wise learning-rate decay with RepL's no-decay keys.

mmdet's and mmseg's ``LearningRateDecayOptimizerConstructor`` (the
ConvNeXt recipes: layer-wise lr decay 0.95 in mmdet's Mask R-CNN, stage-wise
0.9 in mmseg's UperNet) decide weight decay by shape alone (1-D tensors and
biases get none) and ignore ``paramwise_cfg.custom_keys``. A RepL site's
0-d mixing scalars (``alpha``, ``beta``) would then be decayed, which spec
§8 rules out. ``RepLLearningRateDecayOptimizerConstructor`` runs upstream's
``add_params`` unchanged (its layer ids, lr scales, groups and log) and
then applies ``custom_keys`` ``decay_mult`` the way mmengine's default
constructor does (the longest matching key wins): a parameter whose name
contains such a key moves to a copy of its group whose ``weight_decay`` is
scaled by the multiplier. Nothing else changes: lr, lr scale, layer id.

It is registered in mmdet's and in mmseg's ``OPTIM_WRAPPER_CONSTRUCTORS``
(each subclassing that codebase's own constructor), for whichever of the
two is installed.
"""
import importlib
import importlib.util
from typing import Dict, List

from torch import nn

NAME = 'RepLLearningRateDecayOptimizerConstructor'
# codebase -> the module of its LearningRateDecayOptimizerConstructor
UPSTREAM = {
    'mmdet': 'mmdet.engine.optimizers.layer_decay_optimizer_constructor',
    'mmseg': 'mmseg.engine.optimizers.layer_decay_optimizer_constructor',
}


def decay_multiplier(name: str, custom_keys: Dict[str, dict]):
    """``decay_mult`` of the longest key of ``custom_keys`` that ``name``
    contains (mmengine's rule: keys sorted alphabetically, then by length,
    longest first), or None when no key with a ``decay_mult`` matches.

    Example:
        >>> keys = {'.alpha': dict(decay_mult=0.0), '.bias': dict(lr_mult=2)}
        >>> decay_multiplier('backbone.stages.1.1.alpha', keys)
        0.0
        >>> decay_multiplier('backbone.stages.1.1.bias', keys) is None
        True
    """
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return custom_keys[key].get('decay_mult')
    return None


def apply_decay_keys(groups: List[dict],
                     custom_keys: Dict[str, dict]) -> List[dict]:
    """``groups`` (upstream's layer-decay param groups, with their
    ``param_names``) with every parameter that a ``custom_keys`` entry's
    ``decay_mult`` applies to moved into a copy of its group whose
    ``weight_decay`` is multiplied by it (``group_name`` gets a
    ``_decay_mult_<m>`` suffix). Groups that lose every parameter are left
    out. See the module docstring."""
    out = []
    for group in groups:
        kept = dict(group, params=[], param_names=[])
        moved: Dict[float, dict] = {}
        for p, n in zip(group['params'], group['param_names']):
            mult = decay_multiplier(n, custom_keys)
            if mult is None or mult == 1:
                target = kept
            else:
                target = moved.setdefault(
                    mult,
                    dict(
                        group,
                        params=[],
                        param_names=[],
                        weight_decay=group['weight_decay'] * mult,
                        group_name=f"{group['group_name']}_decay_mult_{mult}"))
            target['params'].append(p)
            target['param_names'].append(n)
        out += [g for g in (kept, *moved.values()) if g['params']]
    return out


def _make(upstream: type) -> type:

    class RepLLearningRateDecayOptimizerConstructor(upstream):

        def add_params(self, params: List[dict], module: nn.Module, **kwargs):
            start = len(params)
            super().add_params(params, module, **kwargs)
            keys = self.paramwise_cfg.get('custom_keys', {})
            params[start:] = apply_decay_keys(params[start:], keys)

    RepLLearningRateDecayOptimizerConstructor.__doc__ = (
        f'{upstream.__module__}.{upstream.__name__} with '
        "``paramwise_cfg.custom_keys``' ``decay_mult`` applied after it "
        '(see :mod:`repl_mm.engine.layer_decay`).')
    return RepLLearningRateDecayOptimizerConstructor


#: codebase -> its registered constructor class (installed codebases only)
CONSTRUCTORS: Dict[str, type] = {}
for _scope, _module in UPSTREAM.items():
    if importlib.util.find_spec(_scope) is None:
        continue
    _mod = importlib.import_module(_module)
    _cls = _make(_mod.LearningRateDecayOptimizerConstructor)
    _cls.__module__ = __name__
    _cls.__qualname__ = f'{NAME}[{_scope}]'
    _mod.OPTIM_WRAPPER_CONSTRUCTORS.register_module(name=NAME, module=_cls)
    CONSTRUCTORS[_scope] = _cls

__all__ = ['CONSTRUCTORS', 'apply_decay_keys', 'decay_multiplier']
