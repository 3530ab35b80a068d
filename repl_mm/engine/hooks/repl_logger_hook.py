"""Per-site mixing weights in the training log (and TensorBoard)."""
from typing import Optional

from mmengine.hooks import Hook, LoggerHook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ...core import iter_sites


def site_summaries(model) -> dict:
    """``{'repl_site{i}_{name}': value}`` for every site of every RepL
    backbone in ``model`` (phi_prev/phi_next means, alpha/beta)."""
    out = {}
    for ref in iter_sites(model):
        summary = getattr(ref.module, 'mixing_summary', dict)()
        for name, value in summary.items():
            out[f'repl_site{ref.index}_{name}'] = value
    return out


@HOOKS.register_module()
class RepLLoggerHook(Hook):
    """Log each site's mixing weights through the MessageHub.

    Every ``interval`` training iterations (default: the ``LoggerHook``'s)
    it records, per site, the mean phi per neighbour (CNN sites) or alpha
    and beta (ViT and interpolated sites) as ``train/repl_site{i}_{name}``
    scalars: they appear in the text and json logs and in every visualizer
    backend (TensorBoard when configured). The values are not resumed from
    checkpoints (they are read off the model). A model without RepL
    backbones logs nothing. ``tools/train.py`` adds this hook to every run;
    works for the registry backbones and ``ReplacementHook`` alike.

    Args:
        interval (int, optional): Iterations between records. Defaults to
            None (the LoggerHook's interval).
    """

    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL) reads the hub

    def __init__(self, interval: Optional[int] = None):
        if interval is not None and (not isinstance(interval, int)
                                     or interval < 1):
            raise ValueError('RepLLoggerHook interval must be a positive '
                             f'int, but got {interval!r}')
        self.interval = interval

    def before_train(self, runner) -> None:
        if self.interval is None:
            self.interval = next(
                (h.interval
                 for h in runner.hooks if isinstance(h, LoggerHook)), 10)

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        for key, value in site_summaries(model).items():
            runner.message_hub.update_scalar(
                f'train/{key}', value, resumed=False)
