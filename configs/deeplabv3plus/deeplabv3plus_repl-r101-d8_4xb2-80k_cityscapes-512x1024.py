# DeepLabV3+ R101-D8 on Cityscapes, upstream 80k schedule (SGD lr 0.01, 4 GPUs
# x 2, crop 512x1024), with a RepL ResNetV1c-101 backbone (k = 4: blocks 5, 9,
# 12, 16, 20, 24, 28, 32 replaced; the dilated stages keep their dilations).
# The kept blocks load from upstream's ImageNet-pretrained ResNetV1c-101
# (model.pretrained of the base config); the replaced blocks' keys are
# reported as unused (spec §6).
# SyncBN stays the GPU default; a single-process run reverts it to BN
# automatically; CPU DDP needs --cfg-options model.backbone.norm_cfg.type=BN
#   model.decode_head.norm_cfg.type=BN model.auxiliary_head.norm_cfg.type=BN
# (overriding the top-level `norm_cfg` alone changes nothing).
_base_ = [
    'mmseg::deeplabv3plus/'
    'deeplabv3plus_r101-d8_4xb2-80k_cityscapes-512x1024.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='RepLResNetV1c', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
