# He et al.'s 3-stage CIFAR ResNet-32 (3 x 5 BasicBlocks, 16/32/64 channels)
# with a RepL backbone (k = 4: sites 4, 8, 12), global average pooling and a
# 10-class linear head, as a delta on upstream's resnet18_cifar.py.
_base_ = 'mmpretrain::_base_/models/resnet18_cifar.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='RepLResNet_CIFAR',
        depth=32,
        replacement=dict(interval=4)),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(num_classes=10, in_channels=64))
