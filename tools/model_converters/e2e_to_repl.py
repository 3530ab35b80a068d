"""Start RepL from a trained end-to-end checkpoint.

Copies the E2E weights into the RepL model of the same backbone and plan
(kept blocks, stem, neck, head unchanged) and fits every site to the block
it replaces on a few recorded batches (see
``repl_mm/converters/from_e2e.py`` and ``site_fit.py``). Prints the
per-site relative fit error before and after, and the test metric of the
E2E model, of RepL with
fresh sites and of RepL with fitted sites (``--no-eval`` skips these).
The output loads with ``tools/train.py --cfg-options load_from=OUT`` and
``tools/test.py REPL_CONFIG OUT``. OUT_FILE is never one of the inputs,
and an existing OUT_FILE is replaced only with ``--force`` (checked before
any work).

Usage:
    python tools/model_converters/e2e_to_repl.py E2E_CONFIG E2E_CHECKPOINT \\
        REPL_CONFIG OUT_FILE [--num-batches 4] [--split train] \\
        [--steps 30] [--max-points 32768] [--no-eval] [--work-dir DIR] \\
        [--force] [--cfg-options k=v ...]
"""
import argparse

from mmengine.config import DictAction

import repl_mm  # noqa: F401  (registers the RepL modules)
from repl_mm.converters.from_e2e import convert


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('e2e_config', help="E2E config (mode='none')")
    parser.add_argument('e2e_checkpoint', help='trained E2E checkpoint')
    parser.add_argument('repl_config', help='RepL config (same plan)')
    parser.add_argument('out_file', help='output RepL checkpoint (.pth)')
    parser.add_argument(
        '--num-batches',
        type=int,
        default=4,
        help='batches recorded from the E2E model (default 4)')
    parser.add_argument(
        '--split',
        choices=['train', 'test'],
        default='train',
        help='dataloader to record from (default train)')
    parser.add_argument(
        '--steps',
        type=int,
        default=30,
        help='L-BFGS iterations per site (default 30)')
    parser.add_argument(
        '--max-points',
        type=int,
        default=32768,
        help='pixels/tokens per site the L-BFGS run sees (default 32768)')
    parser.add_argument(
        '--no-eval',
        action='store_true',
        help='skip the three test evaluations')
    parser.add_argument(
        '--work-dir',
        help='keep the evaluation logs here (default: a '
        'temporary folder, removed)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--force',
        action='store_true',
        help='overwrite OUT_FILE if it exists (never an input)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings in both configs, key=value')
    args = parser.parse_args(argv)
    if args.max_points < 2:
        parser.error(f'--max-points must be >= 2, but got {args.max_points}')
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.out_file.endswith('.pth'):
        raise ValueError(f'OUT_FILE must end with .pth, but got '
                         f'{args.out_file!r}')
    report = convert(
        args.e2e_config,
        args.e2e_checkpoint,
        args.repl_config,
        args.out_file,
        num_batches=args.num_batches,
        split=args.split,
        steps=args.steps,
        max_points=args.max_points,
        evaluate_metrics=not args.no_eval,
        work_dir=args.work_dir,
        seed=args.seed,
        cfg_options=args.cfg_options,
        force=args.force)
    print(report)
    return report


if __name__ == '__main__':
    main()
