# ImageNet-1k ConvNeXt-T, upstream's recipe (AdamW lr 4e-3, batch 4096 on
# 32 GPUs x 128, 300 epochs, Mixup/CutMix, label smoothing, stochastic
# depth 0.1, EMA), with a RepL ConvNeXt-T backbone (k = 4: blocks 4, 8, 12,
# 16 of 18 replaced; spec §9.3).
#   upstream: everything but the backbone type and the param groups' keys.
#   ours: ../_base_/repl_paramwise.py's no-decay keys for the mixing
#     weights and site norms (spec §8), merged with upstream's custom_keys.
_base_ = [
    'mmpretrain::convnext/convnext-tiny_32xb128_in1k.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='RepLConvNeXt', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
