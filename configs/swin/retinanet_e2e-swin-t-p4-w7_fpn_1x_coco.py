# E2E twin of retinanet_repl-swin-t-p4-w7_fpn_1x_coco.py: the same backbone
# class and plan with mode='none' (every block kept; identical to upstream's
# SwinTransformer).
_base_ = './retinanet_repl-swin-t-p4-w7_fpn_1x_coco.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
