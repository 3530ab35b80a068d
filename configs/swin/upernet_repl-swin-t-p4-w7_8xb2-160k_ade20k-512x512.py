# UperNet Swin-T on ADE20K (512x512, 160k iterations, 8 GPUs x 2), with a
# RepL Swin-T backbone (k = 4: blocks 4 and 8 of 12 replaced; spec §9.2).
# The kept blocks load from upstream's ImageNet-1k Swin-T (init_cfg of the
# base config); the replaced blocks' keys are reported as unused (spec §6).
# Upstream's AdamW no-decay rules (position embeddings, relative position
# bias tables, norms) stay; ours for the mixing scalars and site norms are
# merged in.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_'
    '8xb2-160k_ade20k-512x512.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(type='RepLSwinTransformer', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
