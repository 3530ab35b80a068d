"""What tools/train.py and tools/test.py share: building the runner for a
config of any of the three codebases."""
import repl_mm  # noqa: F401  (RepLRunner, RNGStateHook, the backbones)
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def build_runner(cfg, train: bool) -> Runner:
    """The config's ``runner_type`` if it names one, else ``RepLRunner``.

    The codebase comes from ``default_scope`` (mmengine imports it and
    registers its modules). Training adds ``RNGStateHook`` unless the
    config lists it, so a resumed run continues the random stream.
    """
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'default_scope must be one of {SCOPES}, but the '
                         f'config has {scope!r}')
    if train:
        hooks = list(cfg.get('custom_hooks', None) or [])
        if not any(h.get('type') == 'RNGStateHook' for h in hooks):
            hooks.append(dict(type='RNGStateHook'))
        cfg.custom_hooks = hooks
    cfg.setdefault('runner_type', 'RepLRunner')
    return RUNNERS.build(cfg)
