"""Convert a trained RepL checkpoint into a static model for deployment.

Every site's operator (a ConvSite's folded pointwise chain with its batch
norm and scale, a TransformerSite's Ahat / Mhat, an interpolated block's
weights) is computed once and stored as an ordinary weight of a
``replacement=dict(mode='static')`` model: no neighbour references and no
synthesis at inference (paper A.5.3). The outputs of the two models are
checked equal on a random batch before anything is written.

Writes ``OUT_DIR/<name>.pth`` (``state_dict`` + plain ``meta``; loads with
``torch.load(weights_only=True)``) and ``OUT_DIR/<name>.py`` (the source
config with ``replacement.mode='static'``), then reports the eval-forward
speed and memory of the RepL and the static model. An output is never the
source config or checkpoint, and existing outputs are replaced only with
``--force`` (checked before any work).

Usage:
    python tools/model_converters/repl_to_static.py CONFIG CHECKPOINT \\
        OUT_DIR [--name NAME] [--batch-size 32] [--input-size 32] \\
        [--repeats 20] [--device cpu] [--force]
"""
import argparse

from repl_mm.analysis.device import resolve_device
from repl_mm.converters.to_static import (benchmark_inference,
                                          convert_checkpoint, random_inputs,
                                          ratios)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config of the trained RepL model')
    parser.add_argument('checkpoint', help='its checkpoint')
    parser.add_argument('out_dir', help='where the static .pth and .py go')
    parser.add_argument(
        '--name',
        help='output file stem (default: the config name with '
        "'repl' -> 'static')")
    parser.add_argument(
        '--batch-size',
        type=int,
        default=32,
        help='batch of the speed / memory measurement (default 32)')
    parser.add_argument(
        '--input-size',
        type=int,
        nargs='+',
        metavar='N',
        help='input H [W] (default: 32 for CIFAR ResNets, a ViT\'s '
        'img_size, else 224 / 320 / 256 for cls / det / seg)')
    parser.add_argument(
        '--repeats',
        type=int,
        default=20,
        help='timed forwards per model, round-robin (default 20)')
    parser.add_argument(
        '--tol',
        type=float,
        default=1e-4,
        help='largest relative output difference allowed (default 1e-4)')
    parser.add_argument(
        '--device',
        default='cpu',
        help="device of the speed / memory measurement: 'cpu' (default), "
        "'cuda' or 'cuda:N' (conversion and output check run on the CPU)")
    parser.add_argument(
        '--no-benchmark',
        action='store_true',
        help='convert and check only, skip the speed / memory report')
    parser.add_argument(
        '--force',
        action='store_true',
        help='overwrite existing outputs (never the source config or '
        'checkpoint)')
    args = parser.parse_args(argv)
    if args.input_size is not None and len(args.input_size) not in (1, 2):
        parser.error('--input-size takes H or H W, but got '
                     f'{args.input_size}')
    for opt in ('batch_size', 'repeats'):
        if getattr(args, opt) < 1:
            parser.error(f"--{opt.replace('_', '-')} must be >= 1, but got "
                         f'{getattr(args, opt)}')
    try:
        args.device = resolve_device(args.device, option='--device')
    except ValueError as e:
        parser.error(str(e))
    return args


def mib(n: int) -> str:
    return f'{n / 2**20:.2f} MiB'


def main():
    args = parse_args()
    size = args.input_size
    size = None if size is None else (size[0], size[-1])
    out = convert_checkpoint(
        args.config,
        args.checkpoint,
        args.out_dir,
        name=args.name,
        input_size=size,
        tol=args.tol,
        force=args.force)
    print(f"checkpoint: {out['checkpoint']}")
    print(f"config:     {out['config']}")
    print(f"outputs equal up to {out['error']:.2e} (relative)")
    if args.no_benchmark:
        return
    inputs = random_inputs(out['cfg'], args.batch_size, size)
    res = benchmark_inference(
        dict(repl=out['repl'], static=out['static']),
        inputs,
        args.repeats,
        device=args.device)
    r = ratios(res)
    shape = 'x'.join(str(s) for s in inputs.shape)
    on = '' if args.device.type == 'cpu' else f' on {args.device}'
    print(f'eval forward{on}, batch {shape}, median of {args.repeats} '
          '(round-robin):')
    print(f"  time   repl {res['repl']['median_s'] * 1e3:.2f} ms, static "
          f"{res['static']['median_s'] * 1e3:.2f} ms, static/repl "
          f"{r['median_s']:.3f}")
    print(f"  peak   repl {mib(res['repl']['peak_bytes'])}, static "
          f"{mib(res['static']['peak_bytes'])}, static/repl "
          f"{r['peak_bytes']:.3f}")
    print(f"  params repl {mib(res['repl']['param_bytes'])}, static "
          f"{mib(res['static']['param_bytes'])}, static/repl "
          f"{r['param_bytes']:.3f}")


if __name__ == '__main__':
    main()
