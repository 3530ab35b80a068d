"""What tools/train.py and tools/test.py share: the common options, the
config they load, and the runner for a config of any of the three
codebases."""
import argparse
import os
import os.path as osp

import repl_mm  # noqa: F401  (RepLRunner, RNGStateHook, the backbones)
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from repl_mm.engine.runner import init_cpu_distributed

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def add_common_args(parser: argparse.ArgumentParser):
    """--work-dir, --cfg-options, --launcher, --local-rank."""
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings in the config, key=value (xxx=yyy format)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(args) -> Config:
    """The config with ``--cfg-options``, ``--launcher`` and the work dir
    (``--work-dir``, else the config's, else ``work_dirs/<config name>``)."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    return cfg


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
