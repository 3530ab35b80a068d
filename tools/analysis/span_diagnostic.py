"""Span diagnostic of a trained E2E model and the choice of RepL sites
under a budget (paper A.10/A.11). What is fitted and chosen:
``repl_mm/analysis/span_fit.py``; what is measured on the model:
``repl_mm/analysis/span.py``.

Usage:
    python tools/analysis/span_diagnostic.py \
        configs/demo/resnet32-e2e_1xb64_15e_digits.py \
        work_dirs/digits15_e2e/epoch_15.pth --num-images 512 --num-sites 3
    # or a budget: --flops-saving 0.2 | --memory-saving 0.15
    # compare the choice with interval=4 in the efficiency benchmark:
    python tools/analysis/benchmark.py CONFIG --indices 2 12 14

Writes ``span.json`` and ``span.md`` to ``--out-dir`` and prints the line
``replacement=dict(indices=[...])`` for the RepL config.
"""
import argparse
import logging
import os
import sys

from mmengine.config import Config, DictAction
from mmengine.logging import MMLogger, print_log

from repl_mm.analysis.span import (indices_line, run_span_diagnostic,
                                   to_markdown, write_outputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='E2E config (mode none) file')
    parser.add_argument('checkpoint', help='its trained checkpoint')
    parser.add_argument(
        '--num-images',
        type=int,
        default=512,
        help='test images for the fit (default 512)')
    parser.add_argument(
        '--batch-size',
        type=int,
        default=None,
        help="test batch size (default: the config's)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        '--num-sites', type=int, default=None, help='choose N sites')
    budget.add_argument(
        '--flops-saving',
        type=float,
        default=None,
        metavar='F',
        help="choose sites saving >= F of the backbone's training FLOPs")
    budget.add_argument(
        '--memory-saving',
        type=float,
        default=None,
        metavar='M',
        help="choose sites saving >= M of the backbone's activation memory")
    parser.add_argument(
        '--skip-costs',
        action='store_true',
        help='do not measure per-block savings (not with --flops-saving '
        'or --memory-saving)')
    parser.add_argument(
        '--out-dir',
        default=None,
        help='output folder (default work_dirs/span_diagnostic/<config>)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings in the config, key=value')
    args = parser.parse_args(argv)

    if not os.path.isfile(args.config):
        parser.error(f'config {args.config!r} does not exist')
    if not os.path.isfile(args.checkpoint):
        parser.error(f'checkpoint {args.checkpoint!r} does not exist')
    for name in ('num_images', 'batch_size', 'num_sites'):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {v}')
    for name in ('flops_saving', 'memory_saving'):
        v = getattr(args, name)
        if v is not None and not 0 < v < 1:
            parser.error(f'--{name.replace("_", "-")} must be a fraction in '
                         f'(0, 1), got {v}')
        if v is not None and args.skip_costs:
            parser.error(f'--{name.replace("_", "-")} needs the per-block '
                         'costs: drop --skip-costs')
    args.budget = next(((n, float(getattr(args, n)))
                        for n in ('num_sites', 'flops_saving', 'memory_saving')
                        if getattr(args, n) is not None), None)
    if args.out_dir is None:
        args.out_dir = os.path.join(
            'work_dirs', 'span_diagnostic',
            os.path.splitext(os.path.basename(args.config))[0])
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    # one logger (and log file) per output folder
    MMLogger.get_instance(
        'span_diagnostic:' + os.path.abspath(args.out_dir),
        log_file=os.path.join(args.out_dir, 'span.log'),
        log_level='INFO')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    option = args.budget and '--' + args.budget[0].replace('_', '-')
    try:
        result = run_span_diagnostic(
            cfg,
            args.checkpoint,
            args.num_images,
            args.batch_size,
            args.budget,
            costs=not args.skip_costs)
    except ValueError as e:  # an unreachable budget names the option
        msg = str(e)
        if option and msg.startswith(args.budget[0]):
            msg = option + msg[len(args.budget[0]):]
        print_log(msg, logger='current', level=logging.ERROR)
        return 1
    paths = write_outputs(result, args.out_dir)
    print_log(
        to_markdown(result) + '\nwrote ' + ', '.join(paths), logger='current')
    if 'choice' in result:
        print(indices_line(result['choice']['indices']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
