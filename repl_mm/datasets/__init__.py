"""Data: writers of small sets in upstream formats (numpy only; see
``tools/dataset_converters/make_datasets.py``) and, when mmpretrain is
installed, the ``CIFARFormat`` dataset registered in its ``DATASETS``."""
import importlib.util

from .det_seg_writers import (make_cityscapes_shapes, make_coco_shapes,
                              shape_scenes, write_cityscapes, write_coco)
from .writers import (digits_images, mnist5k_images, split_train_test,
                      stratified_split, synthetic_images, write_cifar,
                      write_image_folder)

__all__ = [
    'digits_images', 'make_cityscapes_shapes', 'make_coco_shapes',
    'mnist5k_images', 'shape_scenes', 'split_train_test', 'stratified_split',
    'synthetic_images', 'write_cifar', 'write_cityscapes', 'write_coco',
    'write_image_folder'
]

if importlib.util.find_spec('mmpretrain') is not None:
    from .cifar_format import CIFARFormat  # noqa: F401
    __all__.append('CIFARFormat')
