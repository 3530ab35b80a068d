"""GPU acceptance check: one command, from a clean clone with a CUDA torch,
that trains, resumes, tests, infers, trains distributed and benchmarks
RepL on the GPUs of this machine, and says PASS / FAIL / SKIP for each.

What runs (``--list`` prints the names): the data sets written by
make_datasets.py; ``--iters`` training iterations of CIFAR ResNet-32 and
ViT-Tiny/8 on MNIST-5k and of RetinaNet-R18 and DeepLabV3-R18 on the
synthetic shapes sets, by the registry route and the ReplacementHook
route, with and without ``--amp``; a ``--resume``; ``tools/test.py``; the
upstream inferencers on ``cuda``; with 2+ GPUs ``tools/dist_train.sh``
(NCCL, SyncBN) with every rank's parameters compared; and the efficiency
benchmark on the GPU. Each check is a subprocess with its log in
``<work-dir>/logs/<check>.log``; one failure does not stop the others.
docs/gpu_check.md describes the checks and the outputs.

Prints the checks table and the benchmark table, writes both to ``--out``
(JSON), and exits 1 if any check failed. Without CUDA it says so and exits
0, unless ``--allow-cpu`` is given: then the same checks run on the CPU
with a few iterations, without fp16 AMP and without the distributed ones
(to test this script).

Usage:
    python tools/gpu_check.py [--work-dir work_dirs/gpu_check] [--out FILE]
        [--only CHECK ...] [--iters 20] [--timeout 1800] [--allow-cpu]
    python tools/gpu_check.py --list
"""
import argparse
import os.path as osp
import sys
import time

import torch

from repl_mm.analysis.gpu_check import (Context, benchmark_rows, build_checks,
                                        exit_code, format_benchmark,
                                        format_table, run_checks, select,
                                        write_result)

GPU_ITERS, CPU_ITERS = 20, 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--work-dir',
        default='work_dirs/gpu_check',
        help='data, configs, runs and logs (default work_dirs/gpu_check)')
    parser.add_argument(
        '--out',
        default=None,
        help='result JSON (default: <work-dir>/result.json)')
    parser.add_argument(
        '--only',
        nargs='+',
        default=None,
        metavar='CHECK',
        help="run these checks (names or patterns such as 'train-*-hook') "
        'and the ones they need')
    parser.add_argument(
        '--list', action='store_true', help='print the checks and exit')
    parser.add_argument(
        '--iters',
        type=int,
        default=None,
        help=f'training iterations of a run (default {GPU_ITERS} on a GPU, '
        f'{CPU_ITERS} with --allow-cpu on the CPU)')
    parser.add_argument(
        '--timeout',
        type=float,
        default=1800,
        help='seconds one command of a check may take (default 1800)')
    parser.add_argument(
        '--allow-cpu',
        action='store_true',
        help='without CUDA, run the checks on the CPU (tiny runs, no fp16 '
        'AMP, no distributed run) instead of exiting')
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        parser.error(f'--iters must be >= 1, got {args.iters}')
    if not args.timeout > 0:
        parser.error(f'--timeout must be > 0, got {args.timeout}')
    if args.only:
        try:
            select(build_checks(Context('.', gpus=0, iters=1)), args.only)
        except ValueError as e:
            parser.error(str(e))
    if args.out is None:
        args.out = osp.join(args.work_dir, 'result.json')
    return args


def list_checks() -> str:
    checks = build_checks(Context('.', gpus=1, iters=GPU_ITERS))
    width = max(len(c.name) for c in checks)
    return '\n'.join(f'{c.name:<{width}}  {c.description}' for c in checks)


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def meta(ctx: Context) -> dict:
    from repl_mm.analysis.benchmark import machine_info
    info = machine_info()
    info.update(
        device=ctx.device,
        iters=ctx.iters,
        work_dir=osp.abspath(ctx.work_dir),
        cuda=torch.version.cuda,
        gpus=[torch.cuda.get_device_name(i) for i in range(ctx.gpus)])
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_checks())
        return 0
    gpus = cuda_devices()
    if gpus == 0 and not args.allow_cpu:
        print(f'gpu_check: found no CUDA device (torch {torch.__version__}, '
              f'built for CUDA {torch.version.cuda}); nothing was run. '
              'Run it on a machine with a GPU and a CUDA build of torch, or '
              'pass --allow-cpu to run the checks on the CPU.')
        return 0
    iters = args.iters or (GPU_ITERS if gpus else CPU_ITERS)
    ctx = Context(args.work_dir, gpus=gpus, iters=iters, timeout=args.timeout)
    checks = select(build_checks(ctx), args.only or ())
    where = f'{gpus} CUDA device(s)' if gpus else 'the CPU (--allow-cpu)'
    print(f'gpu_check: {len(checks)} checks on {where}, {iters} '
          f'iterations a run, logs in {ctx.path("logs")}')
    t0 = time.perf_counter()
    results = run_checks(checks, ctx)
    rows = benchmark_rows(ctx, results)
    info = meta(ctx)
    info['seconds'] = round(time.perf_counter() - t0, 1)
    print('\n' + format_table(results) + '\n\n' + format_benchmark(rows))
    print(f'\nwrote {write_result(args.out, info, results, rows)} '
          f"({info['seconds']:.0f} s)")
    return exit_code(results)


if __name__ == '__main__':
    sys.exit(main())
