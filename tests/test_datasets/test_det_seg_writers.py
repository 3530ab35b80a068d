"""Writers of ``make_datasets.py coco-shapes`` / ``cityscapes-shapes``:
exact upstream formats (keys, types, ids, file names, label values), read
back by mmdet's ``CocoDataset``, pycocotools and mmseg's
``CityscapesDataset``; determinism; learnable content; bad arguments."""
import json

import numpy as np
import pytest

from repl_mm.datasets import (make_cityscapes_shapes, make_coco_shapes,
                              shape_scenes, write_coco)
from repl_mm.datasets.det_seg_writers import (CITYSCAPES_LABEL_IDS,
                                              CITYSCAPES_TRAIN_IDS,
                                              SHAPE_CLASSES, SHAPE_COLOURS)
from repl_mm.datasets.writers import FOLDER_MARKER

SIZES = dict(num_train=4, num_val=2)
IMAGE_KEYS = {
    'id', 'file_name', 'width', 'height', 'license', 'coco_url', 'flickr_url',
    'date_captured'
}
ANN_KEYS = {
    'id', 'image_id', 'category_id', 'segmentation', 'area', 'bbox', 'iscrowd'
}


def files(root):
    """``{relative path: bytes}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob('*')) if p.is_file()
    }


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    make_coco_shapes(str(root), **SIZES)
    return root


@pytest.fixture(scope='module')
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('cityscapes')
    make_cityscapes_shapes(str(root), **SIZES)
    return root


def read_coco(root, split):
    return json.loads(
        (root / 'annotations' / f'instances_{split}.json').read_text())


def test_coco_json_is_coco(coco):
    ids = {'image': [], 'ann': []}
    for split, n in (('train2017', 4), ('val2017', 2)):
        data = read_coco(coco, split)
        assert set(data) == {
            'info', 'licenses', 'images', 'annotations', 'categories'
        }
        assert data['categories'] == [
            dict(id=i + 1, name=name, supercategory='shape')
            for i, name in enumerate(SHAPE_CLASSES)
        ]
        assert len(data['images']) == n
        sizes = {}
        for img in data['images']:
            assert set(img) == IMAGE_KEYS
            assert img['file_name'] == f"{img['id']:012d}.jpg"
            assert (coco / split / img['file_name']).is_file()
            assert (img['width'], img['height']) == (128, 96)
            sizes[img['id']] = (img['width'], img['height'])
            ids['image'].append(img['id'])
        for ann in data['annotations']:
            assert set(ann) == ANN_KEYS
            assert ann['iscrowd'] == 0 and type(ann['iscrowd']) is int
            assert ann['category_id'] in (1, 2, 3)
            x, y, w, h = ann['bbox']
            assert all(type(v) is float for v in ann['bbox'])
            width, height = sizes[ann['image_id']]
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
            assert type(ann['area']) is float and 0 < ann['area'] <= w * h
            (poly, ) = ann['segmentation']
            assert len(poly) % 2 == 0 and len(poly) >= 6
            assert all(type(v) is float for v in poly)
            ids['ann'].append(ann['id'])
    for kind in ids.values():  # unique across the splits, from 1
        assert sorted(kind) == list(range(1, len(kind) + 1))


def test_coco_polygons_match_the_drawn_masks(coco):
    """pycocotools rasterises each polygon onto nearly the pixels drawn
    (``area`` is their count; OpenCV also fills the boundary pixels, so
    pycocotools finds 4-13% fewer on these small shapes)."""
    from pycocotools.coco import COCO
    api = COCO(str(coco / 'annotations' / 'instances_train2017.json'))
    for ann in api.dataset['annotations']:
        mask = api.annToMask(ann).astype(bool)
        assert abs(mask.sum() - ann['area']) <= 0.15 * ann['area']


def test_coco_loads_in_mmdet(coco):
    pytest.importorskip('mmdet')
    from mmdet.datasets import CocoDataset
    ds = CocoDataset(
        data_root=str(coco),
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        metainfo=dict(classes=SHAPE_CLASSES),
        pipeline=[
            dict(type='mmdet.LoadImageFromFile'),
            dict(type='mmdet.LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='mmdet.PackDetInputs')
        ])
    assert len(ds) == 2 and ds.metainfo['classes'] == SHAPE_CLASSES
    raw = read_coco(coco, 'val2017')
    first = [a for a in raw['annotations'] if a['image_id'] == 5]
    sample = ds[0]
    assert tuple(sample['inputs'].shape) == (3, 96, 128)
    gt = sample['data_samples'].gt_instances
    assert gt.labels.tolist() == [a['category_id'] - 1 for a in first]
    x, y, w, h = first[0]['bbox']
    assert gt.bboxes.tensor[0].tolist() == [x, y, x + w, y + h]
    assert gt.masks.masks.shape == (len(first), 96, 128)


def test_coco_is_learnable():
    """Each object's mean colour is nearest its own class's colour."""
    colours = np.asarray(SHAPE_COLOURS, float)
    for scene in shape_scenes(16, seed=3):
        for obj in scene.objects:
            mean = scene.img[obj.mask].mean(0)
            assert np.argmin(((colours - mean)**2).sum(1)) == obj.label
            outside = scene.img[~obj.mask].astype(float)
            # saturated shape, low-saturation background
            assert np.ptp(mean) > 2 * np.ptp(outside, axis=1).mean()


def test_cityscapes_layout_and_labels(cityscapes):
    allowed = set(CITYSCAPES_TRAIN_IDS.values())
    import cv2
    for split, n, cities in (('train', 4, {'aachen', 'bochum'}),
                             ('val', 2, {'frankfurt'})):
        imgs = sorted(
            (cityscapes / 'leftImg8bit' / split).glob('*/*_leftImg8bit.png'))
        assert len(imgs) == n
        assert {p.parent.name for p in imgs} == cities
        for p in imgs:
            city = p.parent.name
            stem = p.name[:-len('_leftImg8bit.png')]
            assert stem.startswith(f'{city}_') and stem.endswith('_000019')
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            assert img.shape == (64, 128, 3) and img.dtype == np.uint8
            gt = cityscapes / 'gtFine' / split / city
            train_ids = cv2.imread(
                str(gt / f'{stem}_gtFine_labelTrainIds'
                    '.png'), cv2.IMREAD_UNCHANGED)
            label_ids = cv2.imread(
                str(gt / f'{stem}_gtFine_labelIds.png'), cv2.IMREAD_UNCHANGED)
            assert train_ids.shape == (64, 128)
            assert train_ids.dtype == np.uint8
            assert set(np.unique(train_ids)) <= allowed
            assert len(np.unique(train_ids)) > 1  # objects, not just road
            for train_id, label_id in CITYSCAPES_LABEL_IDS.items():
                assert np.array_equal(train_ids == train_id,
                                      label_ids == label_id)


def test_cityscapes_loads_in_mmseg(cityscapes):
    pytest.importorskip('mmseg')
    from mmseg.datasets import CityscapesDataset
    ds = CityscapesDataset(
        data_root=str(cityscapes),
        data_prefix=dict(
            img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
        pipeline=[
            dict(type='mmseg.LoadImageFromFile'),
            dict(type='mmseg.LoadAnnotations'),
            dict(type='mmseg.PackSegInputs')
        ])
    assert len(ds) == 4 and len(ds.metainfo['classes']) == 19
    seen = set()
    for i in range(len(ds)):
        sample = ds[i]
        assert tuple(sample['inputs'].shape) == (3, 64, 128)
        seen |= set(sample['data_samples'].gt_sem_seg.data.unique().tolist())
    assert seen <= set(CITYSCAPES_TRAIN_IDS.values())
    assert 0 in seen and len(seen) > 1  # road and some objects


@pytest.mark.parametrize('fmt', ['coco-shapes', 'cityscapes-shapes'])
def test_cli_is_deterministic(tmp_path, make_datasets, capsys, fmt):
    args = ['--num-train', '2', '--num-val', '1']
    for run, seed in (('a', 0), ('b', 0), ('c', 1)):
        make_datasets.main(
            [fmt, '--out',
             str(tmp_path / run), '--seed',
             str(seed)] + args)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f'{fmt}: wrote {tmp_path / "a"}: train 2 images')
    assert files(tmp_path / 'a') == files(tmp_path / 'b')
    assert files(tmp_path / 'a') != files(tmp_path / 'c')
    marker = json.loads((tmp_path / 'a' / FOLDER_MARKER).read_text())
    assert marker['format'] == fmt and marker['seed'] == 0


def test_rewrites_its_own_and_only_its_own(tmp_path):
    make_coco_shapes(str(tmp_path), **SIZES)
    stale = tmp_path / 'train2017' / 'stale.jpg'
    stale.write_bytes(b'')
    (tmp_path / 'mine.txt').write_text('kept')
    make_coco_shapes(str(tmp_path), **SIZES)
    assert not stale.exists() and (tmp_path / 'mine.txt').exists()
    (tmp_path / FOLDER_MARKER).unlink()
    with pytest.raises(FileExistsError, match='not written by make_datas'):
        make_coco_shapes(str(tmp_path), **SIZES)
    assert (tmp_path / 'train2017').is_dir()


@pytest.mark.parametrize('call,match', [
    (lambda: shape_scenes(0), 'num_images must be a positive int, got 0'),
    (lambda: shape_scenes(1, height=16), 'height must be >= 32, got 16'),
    (lambda: shape_scenes(1, width=12.5), 'width must be a positive int, '
     'got 12.5'),
    (lambda: shape_scenes(1, max_objects=0), 'max_objects .* got 0'),
    (lambda: make_cityscapes_shapes('x', num_val=0), 'num_val .* got 0'),
    (lambda: write_coco('x', shape_scenes(1), []),
     'val2017 needs at least one scene, got 0'),
    (lambda: write_coco(
        'x', shape_scenes(6), shape_scenes(1), classes=('a', )),
     r'train2017: object labels must be in \[0, 1\), got [12]'),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
