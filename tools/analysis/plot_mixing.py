"""Plot the trajectories of the sites' mixing weights (phi_prev/phi_next
means, alpha/beta) that RepLLoggerHook logged during a training run.

Reads <work_dir>/<timestamp>/vis_data/scalars.json (several launches of a
resumed run are merged by step), prints the first and last value of each
weight and writes the plot.

Usage:
    python tools/analysis/plot_mixing.py WORK_DIR [--out mixing.png]
        [--title TITLE]
"""
import argparse
import os
import os.path as osp

from mmengine.logging import print_log

from repl_mm.analysis.trajectories import (plot_trajectories,
                                           read_trajectories, summary_table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'work_dir',
        help='training work dir (or one timestamp folder or '
        'its scalars.json)')
    parser.add_argument(
        '--out',
        default=None,
        help='PNG to write (default: WORK_DIR/mixing_weights.png)')
    parser.add_argument('--title', default='', help='plot title')
    args = parser.parse_args(argv)
    if not osp.exists(args.work_dir):
        parser.error(f'WORK_DIR: {args.work_dir!r} does not exist')
    if args.out is None:
        base = args.work_dir if osp.isdir(args.work_dir) else osp.dirname(
            args.work_dir)
        args.out = osp.join(base, 'mixing_weights.png')
    if not args.out.lower().endswith('.png'):
        parser.error(f'--out must be a .png file, got {args.out!r}')
    return args


def main(argv=None):
    args = parse_args(argv)
    traj = read_trajectories(args.work_dir)
    for path, first, last in traj.runs:
        print_log(f'{path}: steps {first}..{last}', logger='current')
    print_log('\n' + summary_table(traj), logger='current')
    if osp.dirname(args.out):
        os.makedirs(osp.dirname(args.out), exist_ok=True)
    plot_trajectories(
        traj, args.out, title=args.title or f'mixing weights: {args.work_dir}')
    print_log(f'wrote {args.out}', logger='current')
    return traj


if __name__ == '__main__':
    main()
