# CIFAR-10 ResNet-110 (He et al.: 3 x 18 BasicBlocks, 16/32/64 channels)
# with a RepL backbone (k = 4: 13 of 54 blocks, sites 4, 8, ..., 52), the
# paper's Table 1 setting: the ResNet-32 config with depth 110 (the same
# paper / supplement / upstream / our values, listed there).
_base_ = './resnet32-repl_1xb1024_250e_cifar10.py'
model = dict(backbone=dict(depth=110))
