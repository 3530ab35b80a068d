# CIFAR-10 ResNet-32 (He et al.'s 3-stage CIFAR net: 3 x 5 BasicBlocks,
# 16/32/64 channels) with a RepL backbone (k = 4: sites 4, 8, 12), the
# paper's Table 1 setting, as a delta on upstream's
# resnet18_8xb16_cifar10.py (its CIFAR-10 data and runtime).
#   paper (A.3): SGD, lr 0.8, batch 1024 on 1 GPU, 250 epochs; train:
#     4-pixel reflection padding, random 32x32 crop, horizontal flip p=0.5.
#   supplement (A.1; the main paper names no schedule and no weight decay
#     for its ResNets): cosine annealing, weight decay 1e-4 (= upstream's).
#   upstream: momentum 0.9, CIFAR-10 mean/std, test images as they are.
#   ours: 5 epochs of linear warm-up from lr 0.8e-3 (the paper's ViT schedule
#     has one; lr 0.8 at batch 1024 is a large-batch rate), cosine down to 0;
#     the no-decay rules of ../_base_/repl_paramwise.py (spec §8).
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
    neck=dict(type='GlobalAveragePooling'),
    head=dict(num_classes=10, in_channels=64))

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4, padding_mode='reflect'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=1024, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.8, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        begin=0,
        end=5,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=245,
        eta_min=0.0,
        by_epoch=True,
        begin=5,
        end=250,
        convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=250, val_interval=1)
# lr 0.8 is for a total batch of 1024 (--auto-scale-lr rescales it for others)
auto_scale_lr = dict(base_batch_size=1024)
