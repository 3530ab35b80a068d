"""``CIFARFormat``: mmpretrain's ``CIFAR10`` for CIFAR-format sets we wrote."""
import pickle
from typing import List, Optional

import numpy as np
from mmengine.fileio import exists, get, join_path
from mmengine.logging import print_log
from mmpretrain.datasets import CIFAR10
from mmpretrain.registry import DATASETS

from .writers import (CIFAR_FOLDER, META_FILE, TEST_BATCH, TRAIN_BATCHES,
                      check_fraction, stratified_split)

MAKE_HINT = ('write one with `python tools/dataset_converters/'
             'make_datasets.py {digits,mnist5k,synthetic-cifar} --out '
             '<data_root>`')


@DATASETS.register_module()
class CIFARFormat(CIFAR10):
    """CIFAR-10-format python batches of any classes and image size.

    Reads ``<data_root>/cifar-10-batches-py/`` as mmpretrain's ``CIFAR10``
    does (``data_batch_1`` .. ``data_batch_5`` for ``split='train'``,
    ``test_batch`` for ``split='test'``, pickles read with
    ``encoding='latin1'`` holding ``data`` and ``labels``), but checks no
    md5, never downloads, takes the class names from ``batches.meta``'s
    ``label_names`` (unless ``metainfo``/``classes`` name them) and the
    image side length from its ``img_size`` (32 when absent). The sets of
    ``tools/dataset_converters/make_datasets.py`` are in this format.

    Args:
        data_root (str): The folder that holds ``cifar-10-batches-py``.
            Defaults to ''.
        split (str): 'train' or 'test'. Defaults to 'train'.
        metainfo (dict, optional): Meta information, e.g. ``classes``;
            overrides ``batches.meta``. Defaults to None.
        download (bool): Only False is accepted: this dataset never
            downloads. Defaults to False.
        data_prefix (str): Prefix of ``cifar-10-batches-py`` under
            ``data_root``. Defaults to ''.
        test_mode (bool): See :class:`BaseDataset`. Defaults to False.
        fraction (float): Keep this share of the split, in (0, 1], drawn
            per class (stratified) with ``subset_seed``, for low-data runs.
            Defaults to 1.0 (all).
        subset_seed (int): Seed of the ``fraction`` draw. Defaults to 0.
        **kwargs: Other keyword arguments of :class:`BaseDataset`
            (``pipeline``, ``indices``, ``classes``, ``lazy_init``...).

    Example:
        >>> train = dict(type='CIFARFormat', data_root='data/mnist5k',
        ...              split='train', pipeline=[dict(type='PackInputs')])
    """

    base_folder = CIFAR_FOLDER
    train_list = [[name, None] for name in TRAIN_BATCHES]
    test_list = [[TEST_BATCH, None]]
    meta = {'filename': META_FILE, 'key': 'label_names', 'md5': None}
    METAINFO = {}

    def __init__(self,
                 data_root: str = '',
                 split: str = 'train',
                 metainfo: Optional[dict] = None,
                 download: bool = False,
                 data_prefix: str = '',
                 test_mode: bool = False,
                 fraction: float = 1.0,
                 subset_seed: int = 0,
                 **kwargs):
        if download:
            raise ValueError(f'CIFARFormat never downloads, got download='
                             f'{download!r}; {MAKE_HINT}')
        check_fraction('fraction', fraction, low_open=True)
        self.fraction = fraction
        self.subset_seed = subset_seed
        super().__init__(
            data_root=data_root,
            split=split,
            metainfo=metainfo,
            download=False,
            data_prefix=data_prefix,
            test_mode=test_mode,
            **kwargs)

    @property
    def folder(self) -> str:
        """The ``cifar-10-batches-py`` folder read."""
        return join_path(self.data_prefix['root'], self.base_folder)

    def _read(self, name: str, keys: tuple) -> dict:
        """Unpickle one file of :attr:`folder`, which must hold ``keys``."""
        path = join_path(self.folder, name)
        entry = pickle.loads(get(path), encoding='latin1')
        if not isinstance(entry, dict) or not set(keys) <= set(entry):
            found = sorted(map(repr, entry)) if isinstance(
                entry, dict) else type(entry).__name__
            raise ValueError(f'{path} must be a pickled dict with str keys '
                             f'{keys}, found {found}; {MAKE_HINT}')
        return entry

    def _check_files(self, names: List[str]):
        """Raise a FileNotFoundError naming the missing files."""
        missing = [n for n in names if not exists(join_path(self.folder, n))]
        if missing:
            raise FileNotFoundError(
                f'{type(self).__name__}: no CIFAR-format {self.split} set in '
                f'{self.folder!r}, missing {", ".join(missing)} (nothing is '
                f'downloaded); {MAKE_HINT}')

    def _read_images(self, names: List[str], img_size: int):
        """Read batches into ``N x S x S x 3`` images and labels."""
        imgs, labels = [], []
        for name in names:
            entry = self._read(name, ('data', 'labels'))
            data = np.asarray(entry['data'], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * img_size**2 \
                    or len(data) != len(entry['labels']):
                raise ValueError(
                    f'{join_path(self.folder, name)}: data {data.shape} with '
                    f'{len(entry["labels"])} labels, expected N x '
                    f'{3 * img_size**2} (img_size {img_size} of {META_FILE})'
                    ' and N labels')
            imgs.append(data)
            labels.extend(int(label) for label in entry['labels'])
        imgs = np.concatenate(imgs).reshape(-1, 3, img_size, img_size)
        return imgs.transpose(0, 2, 3, 1), np.asarray(labels, np.int64)

    def load_data_list(self) -> List[dict]:
        """Load images and ground-truth labels of the split."""
        batches = self.train_list if self.split == 'train' else self.test_list
        names = [name for name, _ in batches]
        self._check_files(names + [META_FILE])
        meta = self._read(META_FILE, (self.meta['key'], ))
        imgs, labels = self._read_images(names, int(meta.get('img_size', 32)))
        if self.CLASSES is None:
            self._metainfo['classes'] = tuple(meta[self.meta['key']])
        bad = labels[(labels < 0) | (labels >= len(self.CLASSES))]
        if bad.size:
            raise ValueError(f'{self.folder}: label {bad[0]} out of range '
                             f'for {len(self.CLASSES)} classes')
        keep = np.arange(len(labels))
        if self.fraction < 1:
            keep, _ = stratified_split(labels, self.fraction, self.subset_seed)
            print_log(
                f'CIFARFormat: kept {len(keep)} of {len(labels)} {self.split}'
                f' images (fraction {self.fraction}, seed '
                f'{self.subset_seed})',
                logger='current')
        return [{'img': imgs[i], 'gt_label': int(labels[i])} for i in keep]
