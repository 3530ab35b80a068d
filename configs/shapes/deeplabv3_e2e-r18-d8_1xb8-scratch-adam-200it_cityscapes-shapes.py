# E2E twin of
# deeplabv3_repl-r18-d8_1xb8-scratch-adam-200it_cityscapes-shapes.py:
# the same backbone class and plan with mode='none' (every block kept;
# identical to upstream's ResNetV1c-18), the same data (synthetic
# cityscapes-shapes) and schedule.
_base_ = './deeplabv3_repl-r18-d8_1xb8-scratch-adam-200it_cityscapes-shapes.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
