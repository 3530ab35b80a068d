"""mmengine's default optimizer constructor with a one-line summary log."""
import logging
from collections import Counter
from typing import Dict, List, Optional, Union

import torch.nn as nn
from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

# How DefaultOptimWrapperConstructor.add_params starts its per-option lines
# (mmengine 0.10.7: one INFO line per option of every parameter it groups).
PER_PARAM_PREFIX = 'paramwise_options -- '


class _DropPerParamLines(logging.Filter):
    """Drops upstream's per-parameter ``paramwise_options`` records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(PER_PARAM_PREFIX)


def summarize_param_groups(params: List[dict], module: nn.Module,
                           custom_keys: Dict[str, dict]) -> str:
    """One line on what a paramwise constructor made of a model.

    Args:
        params (list[dict]): The param groups, one parameter each, as
            ``DefaultOptimWrapperConstructor.add_params`` builds them.
        module (nn.Module): The model they come from (for the names).
        custom_keys (dict): ``paramwise_cfg.custom_keys``; a group's
            parameters are counted under the longest key they contain,
            the one upstream applies.

    Returns:
        str: e.g. ``paramwise_cfg: 110 parameter tensors in 2 groups:
        98 with the optimizer's defaults; 12 with decay_mult=0.0, lr=0.8,
        weight_decay=0.0 ('.phi' x 6, '.site_norm.' x 6)``.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> params = [{'params': [p]} for p in model.parameters()]
        >>> params[3]['weight_decay'] = 0.0
        >>> print(summarize_param_groups(params, model, {}))
        paramwise_cfg: 4 parameter tensors in 2 groups: 3 with the optimizer's defaults; 1 with weight_decay=0.0
    """  # noqa: E501
    names = {id(p): n for n, p in module.named_parameters()}
    keys = sorted(sorted(custom_keys), key=len, reverse=True)
    groups: Dict[tuple, Counter] = {}
    for group in params:
        options = tuple(
            sorted((k, v) for k, v in group.items() if k != 'params'))
        matched = groups.setdefault(options, Counter())
        for p in group['params']:
            name = names.get(id(p), '')
            matched[next((k for k in keys if k in name), None)] += 1
    parts = []
    for options, matched in sorted(
            groups.items(), key=lambda kv: -sum(kv[1].values())):
        text = ', '.join(f'{k}={v}' for k, v in options)
        text = f'with {text}' if text else "with the optimizer's defaults"
        by_key = ', '.join(f'{k!r} x {n}' for k, n in matched.items() if k)
        parts.append(f'{sum(matched.values())} {text}' +
                     (f' ({by_key})' if by_key else ''))
    total = sum(len(g['params']) for g in params)
    return (f'paramwise_cfg: {total} parameter tensors in {len(groups)} '
            f'groups: ' + '; '.join(parts))


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class RepLOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``DefaultOptimWrapperConstructor`` that logs one summary line.

    The param groups are upstream's, built by upstream's ``add_params``
    (``paramwise_cfg`` means exactly what it means there, e.g. the RepL
    no-decay ``custom_keys`` of ``configs/_base_/repl_paramwise.py``).
    Upstream also logs one INFO line per option of every grouped parameter
    (``paramwise_options -- backbone.layer2.2.phi2_prev:weight_decay=0.0``,
    hundreds per run); this constructor drops those lines and logs instead
    how many parameters got which options, see
    :func:`summarize_param_groups`.

    Select it in a config with
    ``optim_wrapper = dict(constructor='RepLOptimWrapperConstructor', ...)``.

    Args:
        optim_wrapper_cfg (dict): As for ``DefaultOptimWrapperConstructor``.
        paramwise_cfg (dict, optional): As for
            ``DefaultOptimWrapperConstructor``. Defaults to None.
    """

    def __call__(self, model: nn.Module):
        """Upstream's optimizer wrapper, with plain-dict param groups.

        The registry builds the optimizer from a ``ConfigDict``, so every
        param group it makes is one; ``torch.compile`` of mmengine's
        ``train_step`` (``compile=True``) traces ``optimizer.step``, and
        dynamo fails on a dict subclass there (``'UserDefinedDictVariable'
        object has no attribute 'items'``, torch 2.14). Same keys, same
        values: only the type changes.
        """
        optim_wrapper = super().__call__(model)
        optimizer = optim_wrapper.optimizer
        optimizer.param_groups[:] = [dict(g) for g in optimizer.param_groups]
        return optim_wrapper

    def add_params(self,
                   params: List[dict],
                   module: nn.Module,
                   prefix: str = '',
                   is_dcn_module: Optional[Union[int, float]] = None) -> None:
        if prefix:  # upstream's recursion into the children
            super().add_params(params, module, prefix, is_dcn_module)
            return
        logger = MMLogger.get_current_instance()
        drop = _DropPerParamLines()
        first = len(params)
        logger.addFilter(drop)
        try:
            super().add_params(params, module, prefix, is_dcn_module)
        finally:
            logger.removeFilter(drop)
        print_log(
            summarize_param_groups(params[first:], module,
                                   self.paramwise_cfg.get('custom_keys', {})),
            logger='current')
