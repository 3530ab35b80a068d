"""Train a model from an mmdet, mmseg or mmpretrain config (OpenMMLab
style). The codebase is the config's ``default_scope``.

Usage:
    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--auto-scale-lr] [--cfg-options k=v ...] [--launcher pytorch]
"""
import argparse
import os.path as osp

from _runner import (add_common_args, build_runner, destroy_distributed,
                     load_config)


def parse_args():
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the given checkpoint, or from the latest one in '
        'the work dir when no path is given')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='mixed precision: fp16 + dynamic loss scale on GPU, bf16 '
        'autocast on CPU')
    parser.add_argument(
        '--auto-scale-lr', action='store_true', help='scale lr by batch')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_config(args)
    if args.amp:
        from mmengine.device import is_cuda_available
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper not in ('OptimWrapper', 'AmpOptimWrapper',
                           'AutocastOptimWrapper'):
            raise ValueError(f'--amp: optim_wrapper.type={wrapper!r} is not '
                             'a plain OptimWrapper; set AMP in the config')
        if is_cuda_available():
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
        else:
            cfg.optim_wrapper.type = 'AutocastOptimWrapper'
            cfg.optim_wrapper.setdefault('dtype', 'bfloat16')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in \
                cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr: the config has no '
                             'auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume: no checkpoint at '
                                    f'{args.resume!r}')
        cfg.resume, cfg.load_from = True, args.resume
    runner = build_runner(cfg, train=True)
    runner.train()
    destroy_distributed()


if __name__ == '__main__':
    main()
