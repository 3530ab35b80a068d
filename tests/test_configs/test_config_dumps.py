"""The configs composed from ``configs/_base_/`` (models, datasets,
schedules) resolve to exactly what they resolved to when each file still
carried its own copy of the data and schedule blocks.

``DIGESTS`` are SHA-256 prefixes of ``Config.fromfile(path).to_dict()``
(JSON, sorted keys) taken from the configs before they moved to shared
bases (those of ``resnext/`` and ``swin/``: as first written). Two later
additions are left out of the comparison: the optimizer constructor
(``optim_wrapper.constructor``, which changes the log, not the param
groups) and ``crop_flip_train_pipeline``, the helper name the DeiT
configs read their training pipeline from. A deliberate change to one of
these configs changes its digest: update the entry with the value the
failure prints. The ``convnext`` folder never had copies: its digests were
taken when it was added, and pin what its deltas resolve to.
"""
import hashlib
import json
from pathlib import Path

import pytest
from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[2]
DIGESTS = {
    'convnext/convnext-tiny-e2e_32xb128_in1k.py':
    '90078bf9b0149d6f',
    'convnext/convnext-tiny-e2e_upernet_8xb2-amp-160k_ade20k-512x512.py':
    '175ba11de487ee88',
    'convnext/convnext-tiny-repl_32xb128_in1k.py':
    'b263bf596cd36eb2',
    'convnext/convnext-tiny-repl_upernet_8xb2-amp-160k_ade20k-512x512.py':
    'e0a58f81b187137d',
    'convnext/mask-rcnn_e2e-convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py':
    'a6afa2e387c39ff2',
    'convnext/mask-rcnn_repl-convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py':
    'bfe8361a30e96f76',
    'deit/deit-base-e2e_16xb64_in1k.py':
    '8b17806889358738',
    'deit/deit-base-repl_16xb64_in1k.py':
    '2c394799895c3cc1',
    'deit/deit-small-e2e_4xb256_in1k.py':
    '777a1d4f79c40f7b',
    'deit/deit-small-repl_4xb256_in1k.py':
    'cf82d92aed5495ed',
    'deit/deit-tiny-e2e_4xb256_in1k.py':
    'a58492094bccdffc',
    'deit/deit-tiny-repl_4xb256_in1k.py':
    '637b16b016cc3f8f',
    'resnext/resnext50-32x4d-e2e_8xb32_in1k.py':
    'a385f18592837a0d',
    'resnext/resnext50-32x4d-repl_8xb32_in1k.py':
    '6f2f87295255d55d',
    'resnext/retinanet_e2e-x101-32x4d_fpn_1x_coco.py':
    '11f86660ee7fed5d',
    'resnext/retinanet_repl-x101-32x4d_fpn_1x_coco.py':
    '62298469daf4ed71',
    'resnet_cifar/resnet110-e2e_1xb1024_250e_cifar10.py':
    '523b220dba76b778',
    'resnet_cifar/resnet110-e2e_1xb1024_250e_stl10.py':
    '222657cd009b0aee',
    'resnet_cifar/resnet110-e2e_1xb1024_250e_svhn.py':
    'b3f3a282f9c14436',
    'resnet_cifar/resnet110-repl_1xb1024_250e_cifar10.py':
    '6275f9d62d48ce12',
    'resnet_cifar/resnet110-repl_1xb1024_250e_stl10.py':
    'c41db7727338d7ea',
    'resnet_cifar/resnet110-repl_1xb1024_250e_svhn.py':
    '08378489d3a6cf8e',
    'resnet_cifar/resnet32-e2e_1xb1024_250e_cifar10.py':
    '66684aa20d1f4441',
    'resnet_cifar/resnet32-e2e_1xb1024_250e_stl10.py':
    '534efc819235bc37',
    'resnet_cifar/resnet32-e2e_1xb1024_250e_svhn.py':
    'ca25da205cc78183',
    'resnet_cifar/resnet32-repl_1xb1024_250e_cifar10.py':
    '7587268fc047695c',
    'resnet_cifar/resnet32-repl_1xb1024_250e_stl10.py':
    '1ca7490a684186b8',
    'resnet_cifar/resnet32-repl_1xb1024_250e_svhn.py':
    'ce1d3aefa4db2704',
    'vit_cifar/vit-tiny-p8-e2e_1xb512_250e_cifar10.py':
    '3264dbe77efc32dc',
    'vit_cifar/vit-tiny-p8-e2e_1xb512_250e_stl10.py':
    '1885c1012869f1cc',
    'vit_cifar/vit-tiny-p8-e2e_1xb512_250e_svhn.py':
    'fbbcf26e54a4e675',
    'vit_cifar/vit-tiny-p8-repl_1xb512_250e_cifar10.py':
    'facc97c666547a48',
    'vit_cifar/vit-tiny-p8-repl_1xb512_250e_stl10.py':
    '743c65a75f266d8f',
    'vit_cifar/vit-tiny-p8-repl_1xb512_250e_svhn.py':
    'a1007b8f5f038492',
    'swin/retinanet_e2e-swin-t-p4-w7_fpn_1x_coco.py':
    '63f73850cd1cc067',
    'swin/retinanet_repl-swin-t-p4-w7_fpn_1x_coco.py':
    '64e4b024fa8af5d6',
    'swin/swin-tiny-e2e_16xb64_in1k.py':
    'ef071f041d1f5f03',
    'swin/swin-tiny-repl_16xb64_in1k.py':
    'f6d66637e12b1280',
    'swin/upernet_e2e-swin-t-p4-w7_8xb2-160k_ade20k-512x512.py':
    '763caee09d9b3978',
    'swin/upernet_repl-swin-t-p4-w7_8xb2-160k_ade20k-512x512.py':
    '3806f13bcbebf271',
}
# added after the digests were taken (see the module docstring)
HELPER_KEYS = ('crop_flip_train_pipeline', )


def resolved_digest(path):
    cfg = Config.fromfile(str(ROOT / 'configs' / path)).to_dict()
    cfg['optim_wrapper'].pop('constructor')
    for key in HELPER_KEYS:
        cfg.pop(key, None)
    text = json.dumps(cfg, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_digests_cover_the_folders():
    on_disk = {
        str(p.relative_to(ROOT / 'configs'))
        for folder in ('resnet_cifar', 'vit_cifar', 'deit', 'resnext', 'swin',
                       'convnext')
        for p in (ROOT / 'configs' / folder).glob('*.py')
    }
    assert on_disk == set(DIGESTS)


@pytest.mark.parametrize('path', sorted(DIGESTS))
def test_resolved_config_unchanged(path):
    assert resolved_digest(path) == DIGESTS[path]


def test_stl10_svhn_data_blocks_shared_by_resnet_and_vit():
    keys = ('data_preprocessor', 'train_pipeline', 'test_pipeline',
            'val_dataloader', 'test_dataloader', 'val_evaluator')
    for data in ('stl10', 'svhn'):
        resnet = Config.fromfile(
            str(ROOT / f'configs/resnet_cifar/resnet32-repl_1xb1024_250e_'
                f'{data}.py'))
        vit = Config.fromfile(
            str(ROOT / f'configs/vit_cifar/vit-tiny-p8-repl_1xb512_250e_'
                f'{data}.py'))
        for key in keys:
            assert resnet[key] == vit[key], (data, key)
        assert resnet.train_dataloader.dataset == vit.train_dataloader.dataset
