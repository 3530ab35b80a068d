# CIFAR-10 ViT-Tiny/8 with RepL at layers 3, 7, 11, the paper's Table 1
# setting, on upstream's CIFAR-10 data config (cifar10_bs16.py) and default
# runtime, with the DeiT-tiny recipe (deit-tiny_4xb256_in1k.py) where the
# paper is silent.
#   paper (A.3): train: 4-pixel reflection padding, random 32x32 crop,
#     horizontal flip p=0.5; batch 512.
#   upstream: CIFAR-10 mean/std, test images as they are.
#   ours: no RandAugment / Mixup / CutMix / RandomErasing (the paper lists
#     only crop + flip).
_base_ = [
    '../_base_/models/repl-vit-tiny-p8_cifar.py',
    'mmpretrain::_base_/datasets/cifar10_bs16.py',
    '../_base_/schedules/repl-vit_adamw-lr1e-3_250e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4, padding_mode='reflect'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=512, dataset=dict(pipeline=train_pipeline))
