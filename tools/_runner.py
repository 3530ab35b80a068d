"""What tools/train.py and tools/test.py share: building the runner for a
config of any of the three codebases."""
import repl_mm  # noqa: F401  (RepLRunner, RNGStateHook, the backbones)
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from repl_mm.engine.runner import init_cpu_distributed

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def build_runner(cfg, train: bool) -> Runner:
    """The config's ``runner_type`` if it names one, else ``RepLRunner``.

    ``launcher='pytorch'`` on a machine without CUDA trains with DDP over
    gloo (see :class:`repl_mm.engine.RepLRunner`); GPU machines keep the
    config's ``env_cfg.dist_cfg`` (NCCL upstream).

    The codebase comes from ``default_scope`` (mmengine imports it and
    registers its modules). Training adds ``RNGStateHook`` (a resumed run
    continues the random stream) and ``RepLLoggerHook`` (per-site mixing
    weights in the log) unless the config lists them.
    """
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'default_scope must be one of {SCOPES}, but the '
                         f'config has {scope!r}')
    if train:
        hooks = list(cfg.get('custom_hooks', None) or [])
        for name in ('RNGStateHook', 'RepLLoggerHook'):
            if not any(h.get('type') == name for h in hooks):
                hooks.append(dict(type=name))
        cfg.custom_hooks = hooks
    launcher = cfg.get('launcher', 'none')
    if init_cpu_distributed(launcher):
        cfg.env_cfg.dist_cfg = dict(backend='gloo')
    cfg.setdefault('runner_type', 'RepLRunner')
    return RUNNERS.build(cfg)
