# SVHN (32x32 digits, 10 classes, 73,257 train / 26,032 test images) as an
# ImageNet-style folder read by mmpretrain's CustomDataset, on the loaders,
# sampler and evaluator of upstream's cifar10_bs16.py.
#   paper (A.3): train: random 32x32 crop with 2-pixel padding, no flip.
#   ours (the paper gives none): zero padding, ImageNet mean/std
#     (mmpretrain's default for image folders), test images as they are, the
#     `train` split only (no `extra` images).
# Data: data/svhn/{train,test}/<digit>/*.png with folders 0 .. 9
# (configs/resnet_cifar/README.md says how to write it); labels follow the
# sorted folder names, i.e. the digit.
_base_ = 'mmpretrain::_base_/datasets/cifar10_bs16.py'

data_preprocessor = dict(
    num_classes=10,
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)  # LoadImageFromFile gives BGR
svhn_classes = tuple(str(i) for i in range(10))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=32, padding=2),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root='data/svhn',
        data_prefix='train',
        metainfo=dict(classes=svhn_classes),
        pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root='data/svhn',
        data_prefix='test',
        metainfo=dict(classes=svhn_classes),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
