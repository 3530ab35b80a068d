"""Efficiency benchmark of RepL against E2E, drop, stochastic depth and
activation checkpointing, eager and compiled, and of single sites against
the blocks they replace. What is measured and how: docs/benchmark.md.

Usage:
    python tools/analysis/benchmark.py --suite                 # all cases
    python tools/analysis/benchmark.py --suite cifar-r32 deit-s --quick
    python tools/analysis/benchmark.py \
        configs/retinanet/retinanet_repl-r50_fpn_1x_coco.py \
        --input-size 320 --batch-size 1 --repeats 3
    python tools/analysis/benchmark.py --suite --accuracies acc.json
    # every method also compiled (torch.compile, inductor)
    python tools/analysis/benchmark.py --suite cifar-r32 --quick --compile
    # each site against the block it replaces (recompute on and off)
    python tools/analysis/benchmark.py --suite resnet50 --blocks
    # on a GPU (models and batch on cuda:0, synchronized timing, CUDA peak)
    python tools/analysis/benchmark.py --suite resnet50 deit-s \
        --methods e2e repl drop --batch-size 64 --device cuda
    # method repl_idx: these sites (e.g. span_diagnostic.py's choice)
    python tools/analysis/benchmark.py \
        configs/demo/resnet32-e2e_1xb64_15e_digits.py --indices 2 12 14 \
        --methods e2e repl repl_idx drop
    # render a finished run again, measuring nothing
    python tools/analysis/benchmark.py \
        --from-json work_dirs/benchmark/benchmark.json \
        --accuracies acc.json --out-dir work_dirs/benchmark_acc
"""
import argparse
import json
import os
import sys

# Keep the profiler's backend quiet: it logs every start/stop to stderr,
# and only level 6 also silences the USDT profiler_start/stop lines
# (torch 2.14; torch 2.1 prints none).
os.environ.setdefault('KINETO_LOG_LEVEL', '6')

from mmengine.logging import MMLogger, print_log

from repl_mm.analysis.benchmark import METHODS, finalize, run_benchmark
from repl_mm.analysis.blocks import measure_blocks
from repl_mm.analysis.cases import SUITE, make_case, suite_cases
from repl_mm.analysis.device import resolve_device
from repl_mm.analysis.report import (blocks_markdown, load_accuracies,
                                     profile_markdown, write_outputs)

BLOCKS_REPEATS = 10  # --blocks trials unless --repeats says otherwise


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Built-in suite cases: ' + ', '.join(SUITE) + '\nMethods: ' +
        ', '.join(METHODS))
    parser.add_argument(
        'configs',
        nargs='*',
        help='model configs (files or mmdet::/mmseg::/mmpretrain:: paths)')
    parser.add_argument(
        '--suite',
        nargs='*',
        metavar='CASE',
        help='run the built-in suite (all cases, or the ones named)')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='suite: smaller batches and fewer trials')
    parser.add_argument(
        '--methods',
        nargs='+',
        default=list(METHODS),
        metavar='METHOD',
        help='methods to compare (must include e2e; drop for S)')
    parser.add_argument(
        '--indices',
        type=int,
        nargs='+',
        default=None,
        metavar='I',
        help='1-based sites of method repl_idx (added to --methods), e.g. '
        "span_diagnostic.py's choice; without it repl_idx is skipped")
    parser.add_argument(
        '--batch-size',
        type=int,
        default=None,
        help='samples per step (configs: default 2; suite: per case)')
    parser.add_argument(
        '--input-size',
        type=int,
        nargs='+',
        default=None,
        metavar='N',
        help='input H [W] for configs (default: 32 CIFAR, ViT img_size, '
        'cls 224, det 320, seg 256)')
    parser.add_argument(
        '--repeats',
        type=int,
        default=None,
        help='timed trials (configs: default 3; suite: per case)')
    parser.add_argument(
        '--warmup',
        type=int,
        default=0,
        help='extra untimed rounds before the trials (every model has '
        'already run two untimed steps: warm-up and memory)')
    parser.add_argument(
        '--config-plan',
        action='store_true',
        help="configs: the k=4 methods (repl, drop, ...) keep the config's "
        'own sites (e.g. indices=[3, 7, 11]) instead of interval=4')
    parser.add_argument(
        '--compile',
        action='store_true',
        help='also measure every method as torch.compile(model) (ratios '
        'and S against compiled E2E and drop); compilation runs in the '
        'untimed warm-up; a method that fails to compile is reported as '
        'failed with the error\'s first line. With --blocks: time every '
        'block and site compiled instead of eager')
    parser.add_argument(
        '--compile-backend',
        default='inductor',
        metavar='BACKEND',
        help='torch.compile backend of --compile (default inductor)')
    parser.add_argument(
        '--blocks',
        action='store_true',
        help='instead of the step benchmark: each site of the RepL model '
        'against the E2E block it replaces (fwd+bwd time, FLOPs, saved '
        f'bytes; recompute on and off, zero_init=False; --repeats trials, '
        f'default {BLOCKS_REPEATS})')
    parser.add_argument(
        '--profile',
        type=int,
        nargs='?',
        const=3,
        default=None,
        metavar='ROUNDS',
        help='with --blocks: also profile every block and site op by op '
        '(torch.profiler, CPU; ROUNDS calls each, default 3) and write '
        'where the time goes (profile.md)')
    parser.add_argument(
        '--accuracies',
        default=None,
        help='JSON {case: {method: accuracy}} for the accuracy-memory plot')
    parser.add_argument(
        '--from-json',
        default=None,
        metavar='JSON',
        help="render the outputs again from a run's benchmark.json "
        '(derived figures recomputed; nothing measured)')
    parser.add_argument(
        '--device',
        default='cpu',
        help="where models and batch live: 'cpu' (default), 'cuda' or "
        "'cuda:N'; on CUDA every timed step is synchronized and peak "
        'memory is the CUDA allocator\'s')
    parser.add_argument(
        '--out-dir', default='work_dirs/benchmark', help='output folder')
    args = parser.parse_args(argv)

    def fail(msg):
        parser.error(msg)

    try:
        args.device = resolve_device(args.device, option='--device')
    except ValueError as e:
        fail(str(e))

    if args.from_json is not None:
        if args.suite is not None or args.configs:
            fail('--from-json renders a finished run: give no configs and no '
                 '--suite')
        if not os.path.isfile(args.from_json):
            fail(f'--from-json: file {args.from_json!r} does not exist')
    elif args.suite is None and not args.configs:
        fail('give config files or --suite (or --from-json)')
    if args.blocks:
        for opt, given in (('--from-json', args.from_json
                            is not None), ('--accuracies', args.accuracies
                                           is not None)):
            if given:
                fail(f'--blocks measures single blocks: it takes no {opt}')
        if args.profile and args.device.type != 'cpu':
            fail(f'--profile profiles CPU time; --device is {args.device}')
    elif args.profile is not None:
        fail('--profile profiles single blocks: give --blocks too')
    if args.profile is not None and args.profile < 1:
        fail(f'--profile: ROUNDS must be at least 1, got {args.profile}')
    if args.suite:
        unknown = [n for n in args.suite if n not in SUITE]
        if unknown:
            fail(f'--suite: unknown case(s) {unknown}; known: {list(SUITE)}')
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        fail(f'--methods: unknown method(s) {unknown}; known: '
             f'{list(METHODS)}')
    if args.indices is not None:
        if min(args.indices) < 1 or len(set(args.indices)) < len(args.indices):
            fail('--indices takes distinct 1-based block indices, got '
                 f'{args.indices}')
        if 'repl_idx' not in args.methods:
            args.methods.append('repl_idx')
    elif 'repl_idx' in args.methods and args.methods != list(METHODS):
        fail('--methods repl_idx needs --indices')
    if 'e2e' not in args.methods:
        fail(f'--methods must include e2e (the reference), got '
             f'{args.methods}')
    for name in ('batch_size', 'repeats'):
        v = getattr(args, name)
        if v is not None and v < 1:
            fail(f'--{name.replace("_", "-")} must be >= 1, got {v}')
    if args.warmup < 0:
        fail(f'--warmup must be >= 0, got {args.warmup}')
    if args.input_size is not None and (len(args.input_size) > 2
                                        or min(args.input_size) < 1):
        fail('--input-size takes one or two positive ints (H [W]), got '
             f'{args.input_size}')
    for c in args.configs:
        if '::' not in c and not os.path.isfile(c):
            fail(f'config {c!r} does not exist')
    if args.accuracies is not None and not os.path.isfile(args.accuracies):
        fail(f'--accuracies: file {args.accuracies!r} does not exist')
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    MMLogger.get_instance(
        'repl_mm_benchmark',
        log_file=os.path.join(args.out_dir, 'benchmark.log'),
        log_level='INFO')
    accuracies = load_accuracies(args.accuracies) if args.accuracies else None
    if args.from_json:
        with open(args.from_json) as f:
            results = finalize(json.load(f))
        for path in write_outputs(results, args.out_dir, accuracies):
            print_log(f'wrote {path}', logger='current')
        return
    cases = []
    indices = tuple(args.indices) if args.indices else None
    if args.suite is not None:
        cases += suite_cases(args.suite, quick=args.quick)
        for c in cases:
            c.batch_size = args.batch_size or c.batch_size
            c.repeats = args.repeats or c.repeats
            c.indices = indices
    size = args.input_size
    if size is not None:
        size = (size[0], size[-1])
    for path in args.configs:
        cases.append(
            make_case(
                path,
                input_size=size,
                batch_size=args.batch_size or 2,
                repeats=args.repeats or 3))
        cases[-1].indices = indices
        cases[-1].config_plan = args.config_plan
    if args.blocks:
        run_blocks(cases, args)
        return
    backend = args.compile_backend if args.compile else None
    run_benchmark(
        cases,
        args.out_dir,
        args.methods,
        args.warmup,
        accuracies,
        device=args.device,
        compile_backend=backend)


def run_blocks(cases, args):
    """``--blocks``: the single-block table of every case, printed and
    written to ``blocks.md`` and ``blocks.json``."""
    results, tables, profiles = [], [], []
    for case in cases:
        results.append(
            measure_blocks(
                case,
                args.repeats or BLOCKS_REPEATS,
                warmup=max(args.warmup, 1),
                device=args.device,
                profile=args.profile or 0,
                compile_backend=args.compile_backend
                if args.compile else None))
        tables.append(blocks_markdown(results[-1]))
        profiles.append(profile_markdown(results[-1]))
    with open(os.path.join(args.out_dir, 'blocks.json'), 'w') as f:
        json.dump(dict(cases=results), f, indent=1)
    with open(os.path.join(args.out_dir, 'blocks.md'), 'w') as f:
        f.write('\n'.join(tables))
    if args.profile:
        with open(os.path.join(args.out_dir, 'profile.md'), 'w') as f:
            f.write('\n'.join(profiles))
        tables += profiles
    print_log('\n' + '\n'.join(tables), logger='current')


if __name__ == '__main__':
    sys.exit(main())
