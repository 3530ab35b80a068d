"""Bias diagnostic of a trained RepL model (paper A.12): forward and
gradient deviations of F_b^(r) (first r sites enabled) from F (all sites
disabled), r = 0..R, on the config's test set. Conventions:
repl_mm/analysis/bias.py.

Writes bias.md (table), bias.json and bias.png (d_fwd, d_grad, rho vs r)
to --out-dir.

Usage:
    python tools/analysis/bias_diagnostic.py CONFIG CHECKPOINT \
        [--num-images 512] [--grad-images N] [--batch-size B] \
        [--out-dir work_dirs/bias_diagnostic] [--cfg-options k=v ...]
"""
import argparse
import os

from mmengine.config import Config, DictAction
from mmengine.logging import MMLogger, print_log

import repl_mm  # noqa: F401  (registers the RepL backbones and datasets)
from repl_mm.analysis.bias import (format_table, run_bias_diagnostic,
                                   write_outputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='the training config')
    parser.add_argument('checkpoint', help='a RepL checkpoint of it')
    parser.add_argument(
        '--num-images',
        type=int,
        default=512,
        help='test images for d_fwd (default 512; all if fewer)')
    parser.add_argument(
        '--grad-images',
        type=int,
        default=None,
        help='test images (the first ones) for d_grad and rho '
        '(default: --num-images)')
    parser.add_argument(
        '--batch-size',
        type=int,
        default=None,
        help="images per batch (default: the config's test_dataloader)")
    parser.add_argument(
        '--out-dir',
        default='work_dirs/bias_diagnostic',
        help='folder for bias.md, bias.json, bias.png')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings in the config, key=value')
    args = parser.parse_args(argv)
    for name in ('num_images', 'grad_images', 'batch_size'):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {v}')
    for name in ('config', 'checkpoint'):
        path = getattr(args, name)
        if not os.path.isfile(path):
            parser.error(f'{name.upper()}: no file at {path!r}')
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    os.makedirs(args.out_dir, exist_ok=True)
    MMLogger.get_instance(
        'repl_mm_bias',
        log_file=os.path.join(args.out_dir, 'bias.log'),
        log_level='INFO')
    result = run_bias_diagnostic(
        cfg,
        args.checkpoint,
        num_images=args.num_images,
        num_grad_images=args.grad_images,
        batch_size=args.batch_size)
    result['config'] = args.config
    print_log('\n' + format_table(result), logger='current')
    for path in write_outputs(result, args.out_dir).values():
        print_log(f'wrote {path}', logger='current')
    return result


if __name__ == '__main__':
    main()
