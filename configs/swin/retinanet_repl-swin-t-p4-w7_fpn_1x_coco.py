# RetinaNet Swin-T-FPN, upstream 1x schedule, with a RepL Swin-T backbone
# (k = 4: blocks 4 and 8 of 12 replaced; site 4 draws from block 3 only, its
# next neighbour lies across the patch merging; spec §9.2). The kept blocks
# load from upstream's ImageNet-pretrained Swin-T (init_cfg of the base
# config); the replaced blocks' keys are reported as unused (spec §6).
_base_ = [
    'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(type='RepLSwinTransformer', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
