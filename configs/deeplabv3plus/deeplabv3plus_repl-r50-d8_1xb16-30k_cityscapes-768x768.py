# DeepLabV3+ R50-D8 with a RepL ResNetV1c-50 backbone (k = 4: blocks 5, 9, 12
# replaced) in the paper's Cityscapes fine-tuning setting (Table 13, A.5.5):
# SGD lr 0.1, 1 GPU x 16, crop 768x768, 30k iterations, from the paper's own
# ImageNet-1k RepL model (`load_from`; which values come from the paper,
# upstream or us, and how to load your ImageNet checkpoint: see the header of
# ../deeplabv3/deeplabv3_repl-r50-d8_1xb16-30k_cityscapes-768x768.py).
# Upstream's DeepLabV3+ model differs from its DeepLabV3 model only in the
# decode head (DepthwiseSeparableASPPHead with the stage-1 low-level
# features, c1_in_channels=256, c1_channels=48), so this config is the
# DeepLabV3 one with that head.
_base_ = '../deeplabv3/deeplabv3_repl-r50-d8_1xb16-30k_cityscapes-768x768.py'
model = dict(
    decode_head=dict(
        type='DepthwiseSeparableASPPHead', c1_in_channels=256, c1_channels=48))
load_from = None  # your ImageNet-1k RepL ResNetV1c-50 checkpoint
