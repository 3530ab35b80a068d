# The paper's ImageNet training augmentation (A.3, for all its ImageNet
# runs): a 224x224 random crop + horizontal flip, i.e. upstream DeiT's
# RandomResizedCrop 224 + flip without its RandAugment and RandomErasing
# (the test pipeline stays upstream's: short edge to 256, 224x224 centre
# crop). A config adds this file to its `_base_` list beside an upstream
# DeiT config and writes
#   train_pipeline = {{_base_.crop_flip_train_pipeline}}
# (mmengine forbids two bases that both set `train_pipeline`).
crop_flip_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='RandomResizedCrop',
        scale=224,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
