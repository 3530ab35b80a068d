"""``CIFARFormat``: reads what ``write_cifar`` writes, through mmpretrain's
registry, without md5 checks or downloads."""
import pickle

import numpy as np
import pytest

pytest.importorskip('mmpretrain')

from mmpretrain.registry import DATASETS

from repl_mm.datasets import CIFARFormat, synthetic_images, write_cifar
from repl_mm.datasets.writers import META_FILE


def write_set(root, num_per_class=4, num_classes=3, img_size=8, seed=0):
    """Write a tiny synthetic set: first 3/4 per class train, rest test."""
    imgs, labels, classes = synthetic_images(num_per_class, num_classes,
                                             img_size, seed)
    test = np.arange(len(labels)) % num_per_class == num_per_class - 1
    train, test = (imgs[~test], labels[~test]), (imgs[test], labels[test])
    write_cifar(str(root), train, test, classes)
    return dict(train=train, test=test), classes


def build(root, split='train', **kwargs):
    return DATASETS.build(
        dict(
            type='CIFARFormat',
            data_root=str(root),
            split=split,
            pipeline=[dict(type='PackInputs')],
            **kwargs))


@pytest.mark.parametrize('img_size,num_classes', [(8, 3), (32, 10)])
@pytest.mark.parametrize('split', ['train', 'test'])
def test_round_trip(tmp_path, no_download, split, img_size, num_classes):
    sets, classes = write_set(
        tmp_path, num_classes=num_classes, img_size=img_size)
    imgs, labels = sets[split]
    ds = build(tmp_path, split)
    assert isinstance(ds, CIFARFormat)
    assert ds.CLASSES == classes and ds.metainfo['classes'] == classes
    assert len(ds) == len(labels)
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        np.testing.assert_array_equal(info['img'], imgs[i])
        assert info['gt_label'] == labels[i]
    packed = ds[0]
    assert packed['inputs'].shape == (3, img_size, img_size)
    np.testing.assert_array_equal(packed['inputs'].permute(1, 2, 0).numpy(),
                                  imgs[0])
    assert packed['data_samples'].gt_label.tolist() == [labels[0]]
    np.testing.assert_array_equal(ds.get_gt_labels(), labels)


def test_upstream_cifar10_reads_our_batches(tmp_path, monkeypatch,
                                            no_download):
    from mmpretrain.datasets import CIFAR10, cifar
    assert (CIFARFormat.base_folder, CIFARFormat.meta['filename'],
            CIFARFormat.meta['key']) == (CIFAR10.base_folder,
                                         CIFAR10.meta['filename'],
                                         CIFAR10.meta['key'])
    assert [n for n, _ in CIFARFormat.train_list + CIFARFormat.test_list] \
        == [n for n, _ in CIFAR10.train_list + CIFAR10.test_list]
    sets, classes = write_set(tmp_path, num_classes=10, img_size=32)
    monkeypatch.setattr(cifar, 'check_md5', lambda *args: True)
    ds = CIFAR10(
        data_root=str(tmp_path),
        split='train',
        download=False,
        classes=classes)
    np.testing.assert_array_equal(
        ds.get_data_info(5)['img'], sets['train'][0][5])
    np.testing.assert_array_equal(ds.get_gt_labels(), sets['train'][1])


def test_metainfo_overrides_batches_meta(tmp_path):
    write_set(tmp_path)
    names = ('a', 'b', 'c')
    assert build(tmp_path, metainfo=dict(classes=names)).CLASSES == names
    assert build(tmp_path, classes=list(names)).CLASSES == names
    with pytest.raises(ValueError, match='label 2 out of range for 2'):
        build(tmp_path, classes=['a', 'b'])


def test_fraction_is_stratified_and_seeded(tmp_path):
    sets, _ = write_set(tmp_path, num_per_class=10, num_classes=3)
    full = np.bincount(sets['train'][1])  # 9 per class
    ds = build(tmp_path, fraction=1 / 3)
    assert np.bincount(ds.get_gt_labels()).tolist() == (full // 3).tolist()
    again = build(tmp_path, fraction=1 / 3)
    other = build(tmp_path, fraction=1 / 3, subset_seed=1)

    def imgs(d):
        return np.stack([d.get_data_info(i)['img'] for i in range(len(d))])

    np.testing.assert_array_equal(imgs(ds), imgs(again))
    assert not np.array_equal(imgs(ds), imgs(other))


def test_missing_folder_names_it_and_does_not_download(tmp_path, no_download):
    with pytest.raises(FileNotFoundError) as err:
        build(tmp_path / 'nowhere')
    msg = str(err.value)
    assert str(tmp_path / 'nowhere' / 'cifar-10-batches-py') in msg
    assert 'data_batch_1' in msg and META_FILE in msg
    write_set(tmp_path)
    (tmp_path / 'cifar-10-batches-py' / 'test_batch').unlink()
    build(tmp_path, 'train')  # the train split does not need test_batch
    with pytest.raises(
            FileNotFoundError, match='missing test_batch$|'
            'missing test_batch '):
        build(tmp_path, 'test')


def test_malformed_files_give_clear_errors(tmp_path):
    write_set(tmp_path)
    folder = tmp_path / 'cifar-10-batches-py'
    meta = pickle.loads((folder / META_FILE).read_bytes())
    (folder / META_FILE).write_bytes(pickle.dumps(dict(meta, img_size=16)))
    with pytest.raises(
            ValueError,
            match=r'data_batch_1: data \(2, 192\).*'
            r'N x 768 \(img_size 16'):
        build(tmp_path)
    (folder / 'data_batch_1').write_bytes(pickle.dumps({b'data': 0}))
    with pytest.raises(
            ValueError,
            match="data_batch_1 must be a pickled "
            r"dict with str keys \('data', 'labels'\), found "
            r"\[\"b'data'\"\]"):
        build(tmp_path)


@pytest.mark.parametrize('kwargs,match', [
    (dict(download=True), 'never downloads, got download=True'),
    (dict(fraction=0), r'fraction must be a number in \(0, 1\], got 0'),
    (dict(fraction=1.5), r'got 1.5'),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(tmp_path, **kwargs)


def test_config_import_registers_it(tmp_path):
    from mmengine.config import Config
    write_set(tmp_path)
    cfg_file = tmp_path / 'cfg.py'
    cfg_file.write_text(
        "custom_imports = dict(imports=['repl_mm.datasets'], "
        'allow_failed_imports=False)\n'
        f"dataset = dict(type='CIFARFormat', data_root={str(tmp_path)!r}, "
        "split='test')\n")
    cfg = Config.fromfile(str(cfg_file))
    assert len(DATASETS.build(cfg.dataset)) == 3
