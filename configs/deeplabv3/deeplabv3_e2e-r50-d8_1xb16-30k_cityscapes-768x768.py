# E2E twin of deeplabv3_repl-r50-d8_1xb16-30k_cityscapes-768x768.py
# (mode='none': every block kept, same plan). Point `load_from` at an E2E
# ImageNet-1k model (see the RepL config).
_base_ = './deeplabv3_repl-r50-d8_1xb16-30k_cityscapes-768x768.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
