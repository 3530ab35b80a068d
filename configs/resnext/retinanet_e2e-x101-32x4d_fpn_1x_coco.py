# E2E twin of retinanet_repl-x101-32x4d_fpn_1x_coco.py: the same backbone
# class and plan with mode='none' (every block kept; identical to upstream's
# ResNeXt).
_base_ = './retinanet_repl-x101-32x4d_fpn_1x_coco.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
