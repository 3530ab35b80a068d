# E2E twin of resnet110-repl_1xb1024_250e_cifar10.py
# (mode='none': every block kept, same plan and schedule; the paper's E2E
# row of Table 1).
_base_ = './resnet110-repl_1xb1024_250e_cifar10.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
