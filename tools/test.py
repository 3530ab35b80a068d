"""Evaluate a checkpoint with an mmdet, mmseg or mmpretrain config
(OpenMMLab style). Loads mmengine training checkpoints under torch >= 2.6
(``RepLRunner``) and published ones alike.

Usage:
    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE]
        [--amp] [--cfg-options k=v ...] [--launcher pytorch]
"""
import argparse
import os.path as osp

from _runner import (add_common_args, build_runner, destroy_distributed,
                     load_config)


def parse_args():
    parser = argparse.ArgumentParser(description='Test (evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out', help='dump the metrics to this json/yaml/pkl file')
    parser.add_argument(
        '--amp', action='store_true', help='run the test under autocast')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'no checkpoint at {args.checkpoint!r}')
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.amp:
        cfg.test_cfg = {**cfg.get('test_cfg', {}), 'fp16': True}
    runner = build_runner(cfg, train=False)
    metrics = runner.test()
    destroy_distributed()
    if args.out:
        from mmengine.fileio import dump
        dump(metrics, args.out)
    return metrics


if __name__ == '__main__':
    main()
