# RetinaNet R101-FPN with a RepL ResNet-101 backbone (k = 4: blocks 5, 9, 12,
# 16, 20, 24, 28, 32 replaced) in the paper's COCO setting (Table 8): the R50
# config (from scratch, Adam lr 4e-5, 4 GPUs x 2, 100 epochs; see its header
# for where each value comes from) with depth 101, as upstream derives R101.
_base_ = './retinanet_repl-r50_fpn_4xb2-scratch-adam-100e_coco.py'
model = dict(backbone=dict(depth=101))
