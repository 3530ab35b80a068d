# UperNet ConvNeXt-T on ADE20K, upstream's 160k AMP schedule (AdamW lr 1e-4,
# weight decay 0.05, 8 GPUs x 2, crop 512x512), with a RepL ConvNeXt-T
# backbone (k = 4: blocks 4, 8, 12, 16 of 18 replaced; spec §9.3). The kept
# blocks load from upstream's ImageNet-1k ConvNeXt-T checkpoint (init_cfg
# of the base config); the replaced blocks' keys are reported as unused
# (spec §6).
#   upstream: model, data, AMP, schedule, AdamW, stage-wise lr decay
#     (0.9 over 6 stages) and its no-decay rule for 1-D parameters and
#     biases.
#   ours: RepLLearningRateDecayOptimizerConstructor, which runs mmseg's
#     LearningRateDecayOptimizerConstructor unchanged and then applies
#     ../_base_/repl_paramwise.py's custom_keys (upstream's ignores them and
#     would decay the 0-d mixing scalars alpha, beta; spec §8).
_base_ = [
    'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(
    imports=['mmpretrain.models', 'repl_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        type='mmpretrain.RepLConvNeXt', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLLearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
