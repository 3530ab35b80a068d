"""What tools/train.py and tools/test.py share: the common options, the
config they load, and the runner for a config of any of the three
codebases."""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction

import repl_mm  # noqa: F401  (RepLRunner, RNGStateHook, the backbones)
from repl_mm.engine.runner import (build_runner, destroy_distributed,
                                   infer_local_rank)

__all__ = [
    'add_common_args', 'load_config', 'build_runner', 'destroy_distributed'
]


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
    (``--work-dir``, else the config's, else ``work_dirs/<config name>``).

    Exports ``LOCAL_RANK`` (mmengine's DDP device) when unset: the
    launcher's local rank (``mpirun``, ``srun``), else ``--local-rank``; see
    :func:`repl_mm.engine.runner.infer_local_rank`."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(
            infer_local_rank(args.launcher, args.local_rank))
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
