"""Classification data: ``CIFARFormat`` (registered in mmpretrain's
``DATASETS``, so import this package only when mmpretrain is installed) and
writers of small sets in upstream formats (see
``tools/dataset_converters/make_datasets.py``)."""
from .cifar_format import CIFARFormat
from .writers import (digits_images, mnist5k_images, split_train_test,
                      stratified_split, synthetic_images, write_cifar,
                      write_image_folder)

__all__ = [
    'CIFARFormat', 'digits_images', 'mnist5k_images', 'split_train_test',
    'stratified_split', 'synthetic_images', 'write_cifar',
    'write_image_folder'
]
