# CIFAR-10 ResNet-32 with a RepL backbone (k = 4), the paper's Table 1
# setting: upstream's CIFAR-10 data and runtime (what
# mmpretrain::resnet/resnet18_8xb16_cifar10.py uses) with the paper's model,
# schedule and augmentation.
#   paper (A.3): train: 4-pixel reflection padding, random 32x32 crop,
#     horizontal flip p=0.5; batch 1024.
#   upstream: CIFAR-10 mean/std, test images as they are.
_base_ = [
    '../_base_/models/repl-resnet32_cifar.py',
    'mmpretrain::_base_/datasets/cifar10_bs16.py',
    '../_base_/schedules/repl-cifar_sgd-lr0.8_250e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4, padding_mode='reflect'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=1024, dataset=dict(pipeline=train_pipeline))
