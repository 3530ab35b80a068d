# SVHN variant of resnet110-repl_1xb1024_250e_cifar10.py: the ResNet-32
# SVHN config (its data settings are listed there) with depth 110, the
# paper's Table 1 setting.
_base_ = './resnet32-repl_1xb1024_250e_svhn.py'
model = dict(backbone=dict(depth=110))
