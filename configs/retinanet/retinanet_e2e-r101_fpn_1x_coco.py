# E2E twin of retinanet_repl-r101_fpn_1x_coco.py: the same backbone class and
# plan with mode='none' (every block kept; identical to upstream's ResNet).
_base_ = './retinanet_repl-r101_fpn_1x_coco.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
