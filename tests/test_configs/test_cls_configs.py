"""The classification configs of the paper's Tables 1 and 2 (configs/resnet,
configs/deit, configs/resnet_cifar, configs/vit_cifar): their metafiles and
the root model-index.yml, the paper's hyperparameters in the built configs,
E2E twins that differ only in ``mode``, pipelines and datasets that build
(on synthetic images, no data on disk needed), no weight decay on mixing
weights and site norms. Offline; the heavy models (ViT-B, ResNet-152) are
built by test_configs.py, not here."""
import copy
import functools
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

from repl_mm.core import NO_DECAY_KEYS

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ('resnet', 'deit', 'resnet_cifar', 'vit_cifar')
CONFIGS = sorted(
    p for f in FOLDERS for p in (ROOT / 'configs' / f).glob('*.py'))
IDS = [f'{p.parent.name}/{p.name}' for p in CONFIGS]
REPL = [p for p in CONFIGS if 'repl' in p.name]
REPL_IDS = [f'{p.parent.name}/{p.name}' for p in REPL]
# the paper's sizes: the configs reproducing Tables 1 and 2
PAPER = [p for p in CONFIGS if not p.name.startswith('resnet50')]
PAPER_IDS = [f'{p.parent.name}/{p.name}' for p in PAPER]
NAME = re.compile(r'-(repl|e2e)_(\d+)xb(\d+)(?:_(\d+)e)?_(\w+)\.py$')
METAFILES = sorted((ROOT / 'configs').glob('*/metafile.yml'))


@functools.lru_cache(maxsize=None)
def _load(path):
    return Config.fromfile(str(path))


def load(path):
    """A parsed config (each file parsed once per session), a copy."""
    return copy.deepcopy(_load(Path(path)))


def parse_name(path):
    m = NAME.search(path.name)
    assert m, f'{path.name} does not follow {{backbone}}-repl|e2e_NxbM_...'
    method, gpus, per_gpu, epochs, dataset = m.groups()
    return dict(
        method=method,
        gpus=int(gpus),
        per_gpu=int(per_gpu),
        epochs=int(epochs) if epochs else None,
        dataset=dataset)


def build_model(cfg):
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg.model)


def lr_of(cfg):
    return cfg.optim_wrapper.optimizer.lr


# ------------------------------------------------------------ model index
def test_metafiles_parse_and_point_at_configs():
    assert {p.parent.name for p in METAFILES} >= set(FOLDERS)
    for path in METAFILES:
        ours = path.parent.name in FOLDERS
        meta = yaml.safe_load(path.read_text())
        collections = {c['Name']: c for c in meta['Collections']}
        for c in collections.values():
            assert (ROOT / c['README']).is_file(), c['README']
            if ours:
                assert 'Title' in c['Paper']
        names = set()
        for m in meta['Models']:
            assert m['Name'] not in names, m['Name']
            names.add(m['Name'])
            assert m['In Collection'] in collections, m['Name']
            config = ROOT / m['Config']
            assert config.is_file(), m['Config']
            for r in m.get('Results', []):
                assert {'Task', 'Dataset', 'Metrics'} <= set(r), m['Name']
                for v in r['Metrics'].values():
                    assert isinstance(v, (int, float)), m['Name']
            if not ours:
                continue
            assert config.stem == m['Name']
            assert 'Weights' not in m  # we publish none
            for r in m.get('Results', []):
                # every number is the paper's, and says so
                assert 'Table' in r['Paper'], m['Name']
                assert 'not measured here' in r['Paper'], m['Name']


@pytest.mark.parametrize('folder', FOLDERS)
def test_metafile_lists_every_config_of_its_folder(folder):
    meta = yaml.safe_load(
        (ROOT / 'configs' / folder / 'metafile.yml').read_text())
    listed = {m['Config'] for m in meta['Models']}
    shipped = {
        str(p.relative_to(ROOT))
        for p in (ROOT / 'configs' / folder).glob('*.py')
    }
    assert listed == shipped
    for m in meta['Models']:
        info = parse_name(ROOT / m['Config'])
        assert m['Metadata']['Batch Size'] == info['gpus'] * info['per_gpu']
        if info['epochs']:
            assert m['Metadata']['Epochs'] == info['epochs']
        assert (m['Metadata']['RepL Mode'] == 'synthesize') == \
            (info['method'] == 'repl')


def test_model_index_imports_every_metafile():
    index = yaml.safe_load((ROOT / 'model-index.yml').read_text())
    imported = set(index['Import'])
    assert imported == {str(p.relative_to(ROOT)) for p in METAFILES}
    for rel in imported:
        assert (ROOT / rel).is_file(), rel


def test_model_index_loads_with_modelindex():
    modelindex = pytest.importorskip('modelindex')
    index = modelindex.load(str(ROOT / 'model-index.yml'))
    n = sum(len(yaml.safe_load(p.read_text())['Models']) for p in METAFILES)
    assert len(index.models) == n
    names = {m.name for m in index.models}
    assert 'resnet32-repl_1xb1024_250e_cifar10' in names


def test_metafile_results_are_the_papers():
    """A few of the paper's numbers, copied right (Tables 1 and 2)."""

    def results(folder):
        meta = yaml.safe_load(
            (ROOT / 'configs' / folder / 'metafile.yml').read_text())
        return {
            m['Name']: m['Results'][0]['Metrics']
            for m in meta['Models'] if 'Results' in m
        }

    cifar = results('resnet_cifar')
    assert cifar['resnet32-e2e_1xb1024_250e_cifar10'][
        'Top 1 Accuracy'] == 93.17
    assert cifar['resnet32-repl_1xb1024_250e_cifar10'][
        'Top 1 Accuracy'] == 93.43
    assert cifar['resnet110-repl_1xb1024_250e_cifar10'][
        'Top 1 Accuracy'] == 94.01
    vit = results('vit_cifar')
    assert vit['vit-tiny-p8-e2e_1xb512_250e_stl10']['Top 1 Accuracy'] == 49.08
    assert vit['vit-tiny-p8-repl_1xb512_250e_stl10']['Top 1 Accuracy'] == 50.66
    assert 'vit-tiny-p8-repl_1xb512_250e_svhn' not in vit  # not in our copy
    in1k = results('resnet')
    assert in1k['resnet34-repl_4xb128_90e_in1k']['Top 1 Accuracy'] == 75.44
    assert in1k['resnet34-repl_4xb128_90e_in1k']['Top 5 Accuracy'] == 91.47
    assert 'resnet50-repl_8xb32_in1k' not in in1k  # not in the paper
    deit = results('deit')
    assert deit['deit-small-repl_4xb256_in1k']['Top 1 Accuracy'] == 65.09
    assert deit['deit-base-e2e_16xb64_in1k']['Top 1 Accuracy'] == 59.46


# ------------------------------------------------------- hyperparameters
@pytest.mark.parametrize('path', CONFIGS, ids=IDS)
def test_name_states_batch_and_schedule(path):
    info = parse_name(path)
    cfg = load(path)
    assert cfg.train_dataloader.batch_size == info['per_gpu']
    if info['epochs']:
        assert cfg.train_cfg.max_epochs == info['epochs']
    # lr is meant for the name's total batch: --auto-scale-lr keeps it
    assert cfg.auto_scale_lr.base_batch_size == info['gpus'] * info['per_gpu']
    assert 'repl_mm' in cfg.custom_imports['imports']
    assert cfg.default_scope == 'mmpretrain'


@pytest.mark.parametrize(
    'path', [p for p in CONFIGS if 'e2e' in p.name],
    ids=[i for i in IDS if 'e2e' in i])
def test_e2e_twin_differs_only_in_mode(path):
    e2e = load(path).to_dict()
    repl = load(path.with_name(path.name.replace('e2e', 'repl'))).to_dict()
    assert e2e['model']['backbone']['replacement'].pop('mode') == 'none'
    assert 'mode' not in repl['model']['backbone']['replacement']
    assert e2e == repl


@pytest.mark.parametrize(
    'path', [p for p in PAPER if p.parent.name == 'resnet_cifar'],
    ids=[i for i in PAPER_IDS if i.startswith('resnet_cifar')])
def test_cifar_resnets_paper_hyperparameters(path):
    cfg = load(path)
    info = parse_name(path)
    depth = int(re.match(r'resnet(\d+)-', path.name).group(1))
    assert depth in (32, 110)
    backbone = cfg.model.backbone
    assert backbone.type == 'RepLResNet_CIFAR' and backbone.depth == depth
    # He et al.'s 3-stage nets: the constructor's defaults, not overridden
    assert not {'num_stages', 'out_indices', 'base_channels'} & set(backbone)
    assert cfg.model.neck.type == 'GlobalAveragePooling'
    assert cfg.model.head.in_channels == 64
    assert cfg.model.head.num_classes == 10
    # paper A.3: SGD, lr 0.8, batch 1024 on one GPU, 250 epochs
    assert cfg.optim_wrapper.optimizer.type == 'SGD'
    assert lr_of(cfg) == 0.8
    assert info['gpus'] * cfg.train_dataloader.batch_size == 1024
    assert info['gpus'] == 1
    assert cfg.train_cfg.max_epochs == 250
    # supplement A.1: cosine; 1e-4 weight decay
    assert cfg.optim_wrapper.optimizer.weight_decay == 1e-4
    assert cfg.param_scheduler[-1].type == 'CosineAnnealingLR'
    assert cfg.param_scheduler[-1].end == 250
    assert cfg.model.backbone.replacement.get('interval', 4) == 4


@pytest.mark.parametrize(
    'path', [p for p in CONFIGS if p.parent.name == 'vit_cifar'],
    ids=[i for i in IDS if i.startswith('vit_cifar')])
def test_cifar_vits_paper_hyperparameters(path):
    cfg = load(path)
    info = parse_name(path)
    backbone = cfg.model.backbone
    assert backbone.type == 'RepLVisionTransformer'
    assert backbone.arch == 'deit-tiny' and backbone.patch_size == 8
    assert backbone.img_size == (96 if info['dataset'] == 'stl10' else 32)
    assert backbone.replacement.indices == [3, 7, 11]  # spec §1, A.12
    assert cfg.model.head.num_classes == 10
    assert cfg.model.head.in_channels == 192
    # paper A.3 / A.12: AdamW, lr 1e-3, wd 0.05, batch 512, 250 epochs,
    # cosine after a 5-epoch linear warm-up
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-3, 0.05)
    assert info['gpus'] * cfg.train_dataloader.batch_size == 512
    assert cfg.train_cfg.max_epochs == 250
    warmup, cosine = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.end == 5
    assert cosine.type == 'CosineAnnealingLR'
    assert (cosine.begin, cosine.end) == (5, 250)
    # upstream DeiT's no-decay keys merged with ours
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert {'.cls_token', '.pos_embed'} <= set(keys)


@pytest.mark.parametrize(
    'path', [p for p in PAPER if p.parent.name == 'resnet'],
    ids=[i for i in PAPER_IDS if i.startswith('resnet/')])
def test_imagenet_resnets_paper_hyperparameters(path):
    cfg = load(path)
    info = parse_name(path)
    depth = int(re.match(r'resnet(\d+)-', path.name).group(1))
    assert depth in (34, 101, 152)
    assert cfg.model.backbone.type == 'RepLResNet'
    assert cfg.model.backbone.depth == depth
    assert cfg.model.head.in_channels == (512 if depth == 34 else 2048)
    # paper A.3: SGD, lr 0.2, batch 512, 90 epochs
    assert cfg.optim_wrapper.optimizer.type == 'SGD'
    assert lr_of(cfg) == 0.2
    assert info['gpus'] * cfg.train_dataloader.batch_size == 512
    assert cfg.train_cfg.max_epochs == 90
    assert cfg.param_scheduler.milestones == [30, 60]
    types = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert types == [
        'LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip', 'PackInputs'
    ]


@pytest.mark.parametrize(
    'path', [p for p in CONFIGS if p.parent.name == 'deit'],
    ids=[i for i in IDS if i.startswith('deit')])
def test_imagenet_vits_paper_hyperparameters(path):
    cfg = load(path)
    info = parse_name(path)
    size = re.match(r'deit-(tiny|small|base)-', path.name).group(1)
    backbone = cfg.model.backbone
    assert backbone.type == 'RepLVisionTransformer'
    # DeiT widths, 12 layers (mmpretrain's 'small' is an 8-layer ViT)
    assert backbone.arch == f'deit-{size}'
    assert backbone.patch_size == 16 and backbone.img_size == 224
    assert backbone.replacement.indices == [3, 7, 11]
    assert cfg.model.head.in_channels == {
        'tiny': 192,
        'small': 384,
        'base': 768
    }[size]
    assert info['gpus'] * cfg.train_dataloader.batch_size == 1024
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    if size in ('tiny', 'small'):  # paper A.3: 4 GPUs, batch 1024, 7.5e-4
        assert info['gpus'] == 4
        assert lr_of(cfg) == 7.5e-4
    else:  # the paper gives none for ViT-B: upstream's
        assert lr_of(cfg) == 1e-3
    # the paper's augmentation: random crop + flip, no batch augments
    assert cfg.model.get('train_cfg') is None
    types = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert types == [
        'LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip', 'PackInputs'
    ]
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert {'.cls_token', '.pos_embed'} <= set(keys)  # upstream's, merged


AUGMENT = {  # paper A.3: (crop, padding, padding mode, flip)
    'cifar10': (32, 4, 'reflect', True),
    'svhn': (32, 2, 'constant', False),
    'stl10': (96, 4, 'constant', True),
}


@pytest.mark.parametrize(
    'path', [p for p in CONFIGS if p.parent.name.endswith('_cifar')],
    ids=[i for i in IDS if i.split('/')[0].endswith('_cifar')])
def test_small_dataset_augmentations(path):
    cfg = load(path)
    dataset = parse_name(path)['dataset']
    crop, padding, mode, flip = AUGMENT[dataset]
    pipeline = {t.type: t for t in cfg.train_dataloader.dataset.pipeline}
    rc = pipeline['RandomCrop']
    assert (rc.crop_size, rc.padding) == (crop, padding)
    assert rc.get('padding_mode', 'constant') == mode
    assert ('RandomFlip' in pipeline) == flip
    if flip:
        assert pipeline['RandomFlip'].prob == 0.5
    ds = cfg.train_dataloader.dataset
    if dataset == 'cifar10':
        assert ds.type == 'CIFAR10' and ds.data_root == 'data/cifar10'
    else:
        assert ds.type == 'CustomDataset'
        assert ds.data_root == f'data/{dataset}'
        assert ds.data_prefix == 'train'
        assert cfg.val_dataloader.dataset.data_prefix == 'test'
        assert cfg.test_dataloader.dataset.data_prefix == 'test'
        assert len(ds.metainfo.classes) == 10


# ---------------------------------------------------- pipelines, datasets
def _sample(dataset_cfg, tmp_path, side):
    """An input for the pipeline: an image file for LoadImageFromFile,
    else a decoded image as upstream CIFAR10 gives it."""
    img = np.random.RandomState(0).randint(
        0, 255, (side, side, 3), dtype=np.uint8)
    first = dataset_cfg.pipeline[0].type
    if first == 'LoadImageFromFile':
        import cv2
        path = tmp_path / f'img_{side}.png'
        cv2.imwrite(str(path), img)
        return dict(img_path=str(path), gt_label=3)
    return dict(img=img, img_shape=img.shape[:2], gt_label=3)


@pytest.mark.parametrize('path', REPL, ids=REPL_IDS)
def test_pipelines_build_and_run(path, tmp_path):
    from mmengine.dataset import Compose
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = load(path)
    dataset = parse_name(path)['dataset']
    out_side = {'in1k': 224, 'stl10': 96}.get(dataset, 32)
    in_side = {'in1k': 300}.get(dataset, out_side)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        for split in ('train', 'val', 'test'):
            ds = cfg[f'{split}_dataloader'].dataset
            pipeline = Compose(ds.pipeline)
            packed = pipeline(_sample(ds, tmp_path, in_side))
            assert tuple(packed['inputs'].shape) == (3, out_side, out_side)
            assert packed['data_samples'].gt_label.tolist() == [3]


@pytest.mark.parametrize('dataset', ['stl10', 'svhn'])
def test_image_folder_datasets_build(dataset, tmp_path):
    """CustomDataset reads data/<set>/{train,test}/<class>/*.png as the
    README says; labels are the sorted folder names' indices."""
    import cv2
    from mmpretrain.registry import DATASETS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = load(ROOT / 'configs' / 'resnet_cifar' /
               f'resnet32-repl_1xb1024_250e_{dataset}.py')
    classes = cfg.train_dataloader.dataset.metainfo.classes
    side = 96 if dataset == 'stl10' else 32
    for split in ('train', 'test'):
        for name in classes:
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            cv2.imwrite(
                str(folder / '000001.png'), np.zeros((side, side, 3),
                                                     np.uint8))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        for split in ('train', 'val'):
            ds_cfg = cfg[f'{split}_dataloader'].dataset.copy()
            ds_cfg.data_root = str(tmp_path)
            ds = DATASETS.build(ds_cfg)
            assert len(ds) == 10
            assert ds.metainfo['classes'] == tuple(classes)
            assert list(classes) == sorted(classes)  # label order = folders
            last = ds[9]
            assert last['data_samples'].gt_label.tolist() == [9]
            assert Path(last['data_samples'].img_path).parent.name == \
                classes[9]
            assert tuple(last['inputs'].shape) == (3, side, side)


def test_cifar10_dataset_config_builds_lazily(tmp_path):
    from mmpretrain.registry import DATASETS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = load(ROOT / 'configs' / 'vit_cifar' /
               'vit-tiny-p8-repl_1xb512_250e_cifar10.py')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        for split in ('train', 'val'):
            ds_cfg = cfg[f'{split}_dataloader'].dataset.copy()
            ds_cfg.update(data_root=str(tmp_path), lazy_init=True)
            ds = DATASETS.build(ds_cfg)  # lazy: no download, no data
            assert ds.split == ('train' if split == 'train' else 'test')


# -------------------------------------------------------- built models
SMALL = [p for p in REPL if p.parent.name in ('resnet_cifar', 'vit_cifar')]
SMALL_IDS = [f'{p.parent.name}/{p.name}' for p in SMALL]


@pytest.mark.parametrize('path', SMALL, ids=SMALL_IDS)
def test_small_models_plan_params_and_no_decay(path):
    """Plans as spec §1 says, the metafile's parameter counts, mixing
    weights and site norms without weight decay while kept weights keep
    the config's decay (test_configs.py checks this for ResNet-50-like
    names only)."""
    cfg = load(path)
    model = build_model(cfg)
    plan = model.backbone.replacement_plan
    expected = {
        'resnet32': (4, 8, 12),
        'resnet110': tuple(range(4, 53, 4)),
        'vit-tiny': (3, 7, 11),
    }[re.match(r'(resnet\d+|vit-tiny)', path.name).group(1)]
    assert plan.indices == expected and plan.mode == 'synthesize'

    meta = yaml.safe_load((path.parent / 'metafile.yml').read_text())
    for twin, mdl in ((path, model),
                      (path.with_name(path.name.replace('repl',
                                                        'e2e')), None)):
        entry = next(m for m in meta['Models'] if m['Name'] == twin.stem)
        mdl = mdl or build_model(load(twin))
        assert entry['Metadata']['Parameters'] == sum(
            p.numel() for p in mdl.parameters())
        assert entry['Metadata']['RepL Sites'] == list(expected)

    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    base = cfg.optim_wrapper.optimizer.weight_decay
    decay = {
        id(p): g['weight_decay']
        for g in wrapper.optimizer.param_groups
        for p in g['params']
    }
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(decay) == len(names)  # every parameter optimised once
    mixing = [n for n in names if any(k in n for k in NO_DECAY_KEYS)]
    assert any('site_norm' in n for n in mixing)
    assert any(('.phi' in n) or ('.alpha' in n) for n in mixing)
    for n in mixing:
        assert decay[id(names[n])] == 0, n
    kept = [
        n for n, p in names.items()
        if n.startswith('backbone.') and p.ndim >= 2 and n not in mixing
        and 'pos_embed' not in n and 'cls_token' not in n
    ]
    assert kept
    for n in kept:
        assert decay[id(names[n])] == pytest.approx(base), n


def test_vit_site_norms_survive_model_init():
    """The model-level init_cfg (upstream DeiT's unit LayerNorms) must not
    undo the sites' zero-gamma norms (spec §4)."""
    cfg = load(ROOT / 'configs' / 'vit_cifar' /
               'vit-tiny-p8-repl_1xb512_250e_cifar10.py')
    model = build_model(cfg)
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # skip the per-parameter init report
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    norms = [(n, p) for n, p in model.named_parameters()
             if 'site_norm.weight' in n]
    assert len(norms) == 3
    for n, p in norms:
        assert float(p.abs().max()) == 0.0, n
