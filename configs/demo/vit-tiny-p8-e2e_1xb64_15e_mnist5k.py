# E2E twin of vit-tiny-p8-repl_1xb64_15e_mnist5k.py (mode='none').
_base_ = './vit-tiny-p8-repl_1xb64_15e_mnist5k.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
