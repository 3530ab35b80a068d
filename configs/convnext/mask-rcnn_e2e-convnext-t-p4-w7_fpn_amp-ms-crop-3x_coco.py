# E2E twin of mask-rcnn_repl-convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py:
# the same backbone class and plan with mode='none' (every block kept;
# identical to upstream's ConvNeXt), the same schedule and param groups.
_base_ = './mask-rcnn_repl-convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
