# E2E twin of vit-tiny-p8-repl_1xb512_250e_svhn.py
# (mode='none': every layer kept, same plan and schedule; the paper's E2E
# row of Table 1).
_base_ = './vit-tiny-p8-repl_1xb512_250e_svhn.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
