"""Small detection and segmentation sets written in upstream on-disk formats.

:func:`shape_scenes` draws learnable scenes: filled rectangles, circles and
triangles (one class per shape, each with its own colour) on a textured,
low-saturation background, never overlapping, so every object is whole and
its mask is exactly the pixels drawn. :func:`write_coco` writes scenes in
the COCO 2017 instances layout (mmdet's ``CocoDataset``),
:func:`write_cityscapes` in the Cityscapes layout (mmseg's
``CityscapesDataset``); :func:`make_coco_shapes` and
:func:`make_cityscapes_shapes` draw and write in one call (what
``tools/dataset_converters/make_datasets.py coco-shapes`` /
``cityscapes-shapes`` run). The same arguments write the same bytes. Only
numpy is needed at import time; OpenCV is imported by the functions that
draw and encode.
"""
import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .writers import (_check_positive_int, _encode_image, _import_optional,
                      claim_folder)

SHAPE_CLASSES = ('rectangle', 'circle', 'triangle')
# RGB colour of each class; every object jitters it by up to +-25 per channel
SHAPE_COLOURS = ((215, 45, 45), (45, 190, 65), (55, 85, 225))
MIN_SIZE = 32  # smallest image side: room for a few shapes
CIRCLE_VERTICES = 24  # a circle is drawn (and annotated) as a 24-gon

COCO_SPLITS = ('train2017', 'val2017')
# Cityscapes train ids (mmseg's 19 ``CityscapesDataset`` classes) we use; the
# other 15 train ids and 255 (ignore) never occur.
CITYSCAPES_TRAIN_IDS = {
    'background': 0,  # road
    'rectangle': 2,  # building
    'circle': 7,  # traffic sign
    'triangle': 8,  # vegetation
}
# The Cityscapes label id of each train id above (cityscapesscripts'
# ``labels.py``), for ``*_gtFine_labelIds.png``.
CITYSCAPES_LABEL_IDS = {0: 7, 2: 11, 7: 20, 8: 21}
CITYSCAPES_CITIES = {'train': ('aachen', 'bochum'), 'val': ('frankfurt', )}


@dataclass
class ShapeObject:
    """One drawn object.

    Args:
        label (int): Index into :data:`SHAPE_CLASSES`.
        polygon (np.ndarray): ``K x 2`` int32 vertices ``(x, y)`` it was
            drawn from.
        mask (np.ndarray): ``H x W`` bool, the pixels drawn.
    """
    label: int
    polygon: np.ndarray
    mask: np.ndarray


@dataclass
class Scene:
    """An image and its objects (``img``: ``H x W x 3`` uint8 RGB)."""
    img: np.ndarray
    objects: List[ShapeObject]


def _check_scene_args(num_images: int, height: int, width: int,
                      max_objects: int):
    """Raise a ValueError naming the first bad argument of a scene set."""
    for name, value in (('num_images', num_images), ('height', height),
                        ('width', width), ('max_objects', max_objects)):
        _check_positive_int(name, value)
    for name, value in (('height', height), ('width', width)):
        if value < MIN_SIZE:
            raise ValueError(f'{name} must be >= {MIN_SIZE}, got {value!r}')


def _background(rng: np.random.Generator, height: int,
                width: int) -> np.ndarray:
    """Grey-brown texture: a tinted gradient, stripes and pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    side = max(height, width)
    ramp = rng.uniform(-40, 40, 2)
    base = rng.uniform(90, 150) + rng.uniform(-12, 12, 3)  # (3, )
    theta, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
    stripes = 12 * np.sin(2 * np.pi / period *
                          (xx * np.cos(theta) + yy * np.sin(theta)))
    grey = ramp[0] * yy / side + ramp[1] * xx / side + stripes  # (H, W)
    return base + grey[..., None] + rng.normal(0, 8, (height, width, 3))


def _place(rng: np.random.Generator, num: int, height: int,
           width: int) -> List[Tuple[np.ndarray, float]]:
    """Up to ``num`` non-overlapping discs ``(centre (x, y), radius)``."""
    short = min(height, width)
    placed = []
    for _ in range(50 * num):
        if len(placed) == num:
            break
        radius = rng.uniform(0.12 * short, 0.24 * short)
        centre = rng.uniform([radius + 1, radius + 1],
                             [width - radius - 2, height - radius - 2])
        if all(np.hypot(*(centre - c)) > radius + r + 2 for c, r in placed):
            placed.append((centre, radius))
    return placed


def _polygon(rng: np.random.Generator, label: int, centre: np.ndarray,
             radius: float) -> np.ndarray:
    """The ``K x 2`` int32 vertices of a class-``label`` shape inside the
    disc: an axis-aligned rectangle, a 24-gon or an upright triangle."""
    name = SHAPE_CLASSES[label]
    if name == 'rectangle':
        half = radius * np.array([1.0, rng.uniform(0.55, 0.9)])
        half = half[rng.permutation(2)] / np.sqrt(2)  # corners in the disc
        offsets = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    else:
        k, start = (CIRCLE_VERTICES, 0.0) if name == 'circle' else (3, -0.5)
        angles = np.pi * (start + 2 * np.arange(k) / k)
        offsets = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    return np.rint(centre + offsets).astype(np.int32)


def _draw_scene(rng: np.random.Generator, height: int, width: int,
                max_objects: int) -> Scene:
    """One scene with 1 to ``max_objects`` objects of random classes."""
    cv2 = _import_optional('cv2', 'opencv-python')
    img = _background(rng, height, width)
    objects = []
    for centre, radius in _place(rng, int(rng.integers(1, max_objects + 1)),
                                 height, width):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        polygon = _polygon(rng, label, centre, radius)
        mask = cv2.fillPoly(np.zeros((height, width), np.uint8), [polygon],
                            1).astype(bool)
        colour = np.asarray(SHAPE_COLOURS[label]) + rng.uniform(-25, 25, 3)
        img[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))
        objects.append(ShapeObject(label, polygon, mask))
    return Scene(np.rint(img).clip(0, 255).astype(np.uint8), objects)


def shape_scenes(num_images: int,
                 height: int = 96,
                 width: int = 128,
                 max_objects: int = 3,
                 seed: int = 0) -> List[Scene]:
    """Draw learnable detection / segmentation scenes.

    Each scene has 1 to ``max_objects`` objects (fewer when they do not fit
    without overlap), each of a random class of :data:`SHAPE_CLASSES`: a
    filled shape of the class's colour (:data:`SHAPE_COLOURS`, jittered)
    whose circumscribed disc has a radius of 12-24% of the short side, on a
    textured grey-brown background. Objects never overlap.

    Args:
        num_images (int): Number of scenes.
        height (int): Image height, >= 32. Defaults to 96.
        width (int): Image width, >= 32. Defaults to 128.
        max_objects (int): Most objects per image. Defaults to 3.
        seed (int): Seed of everything drawn. Defaults to 0.

    Returns:
        list[Scene]: The scenes.

    Example:
        >>> scenes = shape_scenes(2, height=64, width=128, seed=0)
        >>> scenes[0].img.shape, scenes[0].objects[0].mask.shape
        ((64, 128, 3), (64, 128))
    """
    _check_scene_args(num_images, height, width, max_objects)
    rng = np.random.default_rng(seed)
    return [
        _draw_scene(rng, height, width, max_objects) for _ in range(num_images)
    ]


def _check_scenes(split: str, scenes: Sequence[Scene], num_classes: int):
    """Raise a ValueError unless ``scenes`` is a non-empty list of one
    image size whose object labels index ``num_classes`` classes."""
    if not scenes:
        raise ValueError(f'{split} needs at least one scene, got 0')
    shapes = {s.img.shape for s in scenes}
    if len(shapes) != 1:
        raise ValueError(f'{split} scenes must share one image size, got '
                         f'{sorted(shapes)}')
    bad = [
        o.label for s in scenes for o in s.objects
        if not 0 <= o.label < num_classes
    ]
    if bad:
        raise ValueError(f'{split}: object labels must be in [0, '
                         f'{num_classes}), got {bad[0]!r}')


def coco_annotation(ann_id: int, image_id: int, obj: ShapeObject) -> dict:
    """A COCO instance annotation of ``obj``.

    ``bbox`` is ``[x, y, w, h]`` of the drawn pixels (pixel ``(i, j)``
    covers ``[j, j + 1) x [i, i + 1)``), ``area`` their count, and
    ``segmentation`` the polygon that was filled (OpenCV fills its boundary
    pixels too, so pycocotools rasterises it to a few percent fewer
    pixels). Category ids are ``label + 1``.
    """
    rows, cols = np.nonzero(obj.mask)
    x0, y0 = float(cols.min()), float(rows.min())
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=obj.label + 1,
        segmentation=[obj.polygon.astype(float).reshape(-1).tolist()],
        area=float(obj.mask.sum()),
        bbox=[x0, y0,
              float(cols.max()) + 1 - x0,
              float(rows.max()) + 1 - y0],
        iscrowd=0)


def _coco_header(classes: Sequence[str]) -> dict:
    """``info``, ``licenses`` and ``categories`` of our COCO files."""
    return dict(
        info=dict(
            description='repl_mm coco-shapes: synthetic shapes in COCO '
            'format',
            url='',
            version='1.0',
            year=2017,
            contributor='repl_mm make_datasets.py',
            date_created='2017/09/01'),
        licenses=[
            dict(id=1, name='synthetic images, no restrictions', url='')
        ],
        categories=[
            dict(id=i + 1, name=name, supercategory='shape')
            for i, name in enumerate(classes)
        ])


def write_coco(out_dir: str,
               train: Sequence[Scene],
               val: Sequence[Scene],
               classes: Sequence[str] = SHAPE_CLASSES,
               quality: int = 95,
               source: Optional[dict] = None) -> str:
    """Write scenes in the COCO 2017 instances layout.

    Layout: ``train2017/<id:012d>.jpg``, ``val2017/...`` and
    ``annotations/instances_{train,val}2017.json`` with COCO's keys:
    ``info``, ``licenses``, ``images`` (``id``, ``file_name``, ``width``,
    ``height``, ``license``, ``coco_url``, ``flickr_url``,
    ``date_captured``), ``annotations`` (see :func:`coco_annotation`;
    ``iscrowd`` 0) and ``categories`` (``id`` from 1, ``name``,
    ``supercategory``). Image and annotation ids count on from the train
    to the val split, so they are unique as in COCO. Read it with mmdet's
    ``CocoDataset`` and ``metainfo=dict(classes=classes)``. The folders of
    an earlier run are removed first; anything else is never touched.

    Args:
        out_dir (str): The data root, e.g. ``data/coco-shapes``.
        train (Sequence[Scene]): Train scenes.
        val (Sequence[Scene]): Val scenes.
        classes (Sequence[str]): Category names, indexed by object label.
            Defaults to :data:`SHAPE_CLASSES`.
        quality (int): JPEG quality (chroma is not subsampled). Defaults
            to 95.
        source (dict, optional): What the set was made from, recorded in
            the marker file. Defaults to None.

    Returns:
        str: ``out_dir``.
    """
    splits = dict(zip(COCO_SPLITS, (train, val)))
    for split, scenes in splits.items():
        _check_scenes(split, scenes, len(classes))
    header = _coco_header(classes)
    image_id = ann_id = 1
    claim_folder(out_dir, ('annotations', ) + COCO_SPLITS, source)
    os.makedirs(osp.join(out_dir, 'annotations'))
    for split, scenes in splits.items():
        os.makedirs(osp.join(out_dir, split))
        images, annotations = [], []
        for scene in scenes:
            name = f'{image_id:012d}.jpg'
            _encode_image(scene.img, '.jpg',
                          quality).tofile(osp.join(out_dir, split, name))
            height, width = scene.img.shape[:2]
            images.append(
                dict(
                    id=image_id,
                    file_name=name,
                    width=width,
                    height=height,
                    license=1,
                    coco_url='',
                    flickr_url='',
                    date_captured=''))
            for obj in scene.objects:
                annotations.append(coco_annotation(ann_id, image_id, obj))
                ann_id += 1
            image_id += 1
        with open(
                osp.join(out_dir, 'annotations', f'instances_{split}.json'),
                'w') as f:
            json.dump(dict(header, images=images, annotations=annotations), f)
    return out_dir


def cityscapes_label_map(scene: Scene) -> np.ndarray:
    """The ``H x W`` uint8 train-id map of a scene
    (:data:`CITYSCAPES_TRAIN_IDS`)."""
    out = np.full(scene.img.shape[:2], CITYSCAPES_TRAIN_IDS['background'],
                  np.uint8)
    for obj in scene.objects:
        out[obj.mask] = CITYSCAPES_TRAIN_IDS[SHAPE_CLASSES[obj.label]]
    return out


def _encode_label_png(label_map: np.ndarray) -> np.ndarray:
    """Encode a 2-D uint8 map as a single-channel PNG."""
    cv2 = _import_optional('cv2', 'opencv-python')
    ok, buf = cv2.imencode('.png', label_map)
    if not ok:
        raise RuntimeError('OpenCV could not encode a label map as .png')
    return buf


def _cityscapes_files(img_dir: str, gt_dir: str, stem: str, scene: Scene):
    """Write one scene's image and its two label maps."""
    train_ids = cityscapes_label_map(scene)
    label_ids = np.zeros_like(train_ids)
    for train_id, label_id in CITYSCAPES_LABEL_IDS.items():
        label_ids[train_ids == train_id] = label_id
    _encode_image(scene.img, '.png',
                  0).tofile(osp.join(img_dir, f'{stem}_leftImg8bit.png'))
    for suffix, data in (('labelTrainIds', train_ids), ('labelIds',
                                                        label_ids)):
        _encode_label_png(data).tofile(
            osp.join(gt_dir, f'{stem}_gtFine_{suffix}.png'))


def write_cityscapes(out_dir: str,
                     train: Sequence[Scene],
                     val: Sequence[Scene],
                     source: Optional[dict] = None) -> str:
    """Write scenes in the Cityscapes layout.

    Layout: ``leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`` (RGB)
    and ``gtFine/{train,val}/<city>/<stem>_gtFine_labelTrainIds.png``
    (uint8 train ids, what mmseg's ``CityscapesDataset`` reads, as written
    by mmseg's ``cityscapes.py`` converter) beside
    ``<stem>_gtFine_labelIds.png`` (Cityscapes label ids, what the official
    evaluation reads). Stems are ``<city>_<index:06d>_000019``; train
    scenes take turns between the cities of :data:`CITYSCAPES_CITIES`.
    Pixels use only the train ids of :data:`CITYSCAPES_TRAIN_IDS` (the
    background is road, 0); 255 (ignore) never occurs. The folders of an
    earlier run are removed first; anything else is never touched.

    Args:
        out_dir (str): The data root, e.g. ``data/cityscapes-shapes``.
        train (Sequence[Scene]): Train scenes.
        val (Sequence[Scene]): Val scenes.
        source (dict, optional): What the set was made from, recorded in
            the marker file. Defaults to None.

    Returns:
        str: ``out_dir``.
    """
    splits = dict(train=train, val=val)
    for split, scenes in splits.items():
        _check_scenes(split, scenes, len(SHAPE_CLASSES))
    claim_folder(out_dir, ('leftImg8bit', 'gtFine'), source)
    for split, scenes in splits.items():
        cities = CITYSCAPES_CITIES[split]
        for i, scene in enumerate(scenes):
            city = cities[i % len(cities)]
            dirs = [
                osp.join(out_dir, top, split, city)
                for top in ('leftImg8bit', 'gtFine')
            ]
            for path in dirs:
                os.makedirs(path, exist_ok=True)
            _cityscapes_files(*dirs, f'{city}_{i:06d}_000019', scene)
    return out_dir


def _split_scenes(num_train: int, num_val: int, **kwargs) -> Dict[str, list]:
    """``num_train + num_val`` scenes of one stream, split in order."""
    _check_positive_int('num_train', num_train)
    _check_positive_int('num_val', num_val)
    scenes = shape_scenes(num_train + num_val, **kwargs)
    return dict(train=scenes[:num_train], val=scenes[num_train:])


def _summary(splits: Dict[str, list]) -> dict:
    """Counts of what was written."""
    first = splits['train'][0].img
    return dict(
        images={
            k: len(v)
            for k, v in splits.items()
        },
        objects={
            k: sum(len(s.objects) for s in v)
            for k, v in splits.items()
        },
        size=first.shape[:2])


def make_coco_shapes(out_dir: str,
                     num_train: int = 12,
                     num_val: int = 4,
                     height: int = 96,
                     width: int = 128,
                     max_objects: int = 3,
                     seed: int = 0) -> dict:
    """Draw :func:`shape_scenes` and write them with :func:`write_coco`.

    Args:
        out_dir (str): The data root.
        num_train (int): Train images. Defaults to 12.
        num_val (int): Val images. Defaults to 4.
        height (int): Image height, >= 32. Defaults to 96.
        width (int): Image width, >= 32. Defaults to 128.
        max_objects (int): Most objects per image. Defaults to 3.
        seed (int): Seed of the scenes. Defaults to 0.

    Returns:
        dict: ``images`` and ``objects`` per split, image ``size``
        ``(H, W)`` and the ``classes``.
    """
    args = dict(
        num_train=num_train,
        num_val=num_val,
        height=height,
        width=width,
        max_objects=max_objects,
        seed=seed)
    splits = _split_scenes(**args)
    write_coco(
        out_dir,
        splits['train'],
        splits['val'],
        source=dict(format='coco-shapes', **args))
    return dict(_summary(splits), classes=SHAPE_CLASSES)


def make_cityscapes_shapes(out_dir: str,
                           num_train: int = 12,
                           num_val: int = 4,
                           height: int = 64,
                           width: int = 128,
                           max_objects: int = 3,
                           seed: int = 0) -> dict:
    """Draw :func:`shape_scenes` and write them with
    :func:`write_cityscapes` (Cityscapes' 1:2 aspect by default).

    Args:
        out_dir (str): The data root.
        num_train (int): Train images. Defaults to 12.
        num_val (int): Val images. Defaults to 4.
        height (int): Image height, >= 32. Defaults to 64.
        width (int): Image width, >= 32. Defaults to 128.
        max_objects (int): Most objects per image. Defaults to 3.
        seed (int): Seed of the scenes. Defaults to 0.

    Returns:
        dict: ``images`` and ``objects`` per split, image ``size``
        ``(H, W)`` and the ``train_ids`` used (name -> id).
    """
    args = dict(
        num_train=num_train,
        num_val=num_val,
        height=height,
        width=width,
        max_objects=max_objects,
        seed=seed)
    splits = _split_scenes(**args)
    write_cityscapes(
        out_dir,
        splits['train'],
        splits['val'],
        source=dict(format='cityscapes-shapes', **args))
    return dict(_summary(splits), train_ids=dict(CITYSCAPES_TRAIN_IDS))


__all__ = [
    'CITYSCAPES_LABEL_IDS', 'CITYSCAPES_TRAIN_IDS', 'COCO_SPLITS',
    'SHAPE_CLASSES', 'SHAPE_COLOURS', 'Scene', 'ShapeObject',
    'cityscapes_label_map', 'coco_annotation', 'make_cityscapes_shapes',
    'make_coco_shapes', 'shape_scenes', 'write_cityscapes', 'write_coco'
]
