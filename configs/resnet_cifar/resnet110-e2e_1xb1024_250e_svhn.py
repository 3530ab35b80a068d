# E2E twin of resnet110-repl_1xb1024_250e_svhn.py
# (mode='none': every block kept, same plan and schedule; the paper's E2E
# row of Table 1).
_base_ = './resnet110-repl_1xb1024_250e_svhn.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
