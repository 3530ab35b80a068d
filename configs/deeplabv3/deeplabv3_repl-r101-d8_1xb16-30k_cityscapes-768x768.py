# DeepLabV3 R101-D8 with a RepL ResNetV1c-101 backbone (k = 4: blocks 5, 9,
# 12, 16, 20, 24, 28, 32 replaced) in the paper's Cityscapes fine-tuning
# setting (Table 13): the R50 config (SGD lr 0.1, 1 GPU x 16, crop 768x768,
# 30k iterations; see its header for where each value comes from and for
# `load_from`) with depth 101, as upstream derives R101.
_base_ = './deeplabv3_repl-r50-d8_1xb16-30k_cityscapes-768x768.py'
model = dict(backbone=dict(depth=101))
load_from = None  # your ImageNet-1k RepL ResNetV1c-101 checkpoint
