# E2E twin of retinanet_repl-r18_fpn_1xb8-scratch-adam-4e_coco-shapes.py:
# the same backbone class and plan with mode='none' (every block kept;
# identical to upstream's ResNet-18), the same data (synthetic coco-shapes)
# and schedule.
_base_ = './retinanet_repl-r18_fpn_1xb8-scratch-adam-4e_coco-shapes.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
