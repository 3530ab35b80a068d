# STL-10 (96x96, 10 classes, 5,000 labelled train / 8,000 test images) as an
# ImageNet-style folder read by mmpretrain's CustomDataset, on the loaders,
# sampler and evaluator of upstream's cifar10_bs16.py.
#   paper (A.3): train: random 96x96 crop with 4-pixel padding, horizontal
#     flip p=0.5.
#   ours (the paper gives none): zero padding, ImageNet mean/std
#     (mmpretrain's default for image folders), test images as they are, the
#     labelled train split only (no `unlabeled` images).
# Data: data/stl10/{train,test}/<class>/*.png
# (configs/resnet_cifar/README.md says how to write it); labels follow the
# sorted folder names, which for STL-10's class names is its own label order.
_base_ = 'mmpretrain::_base_/datasets/cifar10_bs16.py'

data_preprocessor = dict(
    num_classes=10,
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)  # LoadImageFromFile gives BGR
stl10_classes = ('airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse',
                 'monkey', 'ship', 'truck')
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=96, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
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
        data_root='data/stl10',
        data_prefix='train',
        metainfo=dict(classes=stl10_classes),
        pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root='data/stl10',
        data_prefix='test',
        metainfo=dict(classes=stl10_classes),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
