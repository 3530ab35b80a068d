# E2E twin of retinanet_repl-r50_fpn_4xb2-scratch-adam-100e_coco.py: the same
# backbone class and plan with mode='none' (every block kept; identical to
# upstream's ResNet), the same from-scratch Adam schedule.
_base_ = './retinanet_repl-r50_fpn_4xb2-scratch-adam-100e_coco.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
