# E2E twin of deeplabv3_repl-r101-d8_4xb2-80k_cityscapes-512x1024.py
# (mode='none': every block kept, same plan).
_base_ = './deeplabv3_repl-r101-d8_4xb2-80k_cityscapes-512x1024.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
