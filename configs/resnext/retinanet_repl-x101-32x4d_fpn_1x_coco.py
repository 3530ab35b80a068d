# RetinaNet X101-32x4d-FPN, upstream 1x schedule (SGD lr 0.01, 8 GPUs x 2,
# 12 epochs), with a RepL ResNeXt-101 32x4d backbone (k = 4: blocks 5, 9,
# 12, 16, 20, 24, 28, 32 replaced; each site's conv2 is a grouped pointwise
# operator with 32 groups, spec §9.1). The kept blocks load from upstream's
# ImageNet-pretrained open-mmlab://resnext101_32x4d (init_cfg of the base
# config); the replaced blocks' keys are reported as unused (spec §6).
_base_ = [
    'mmdet::retinanet/retinanet_x101-32x4d_fpn_1x_coco.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='RepLResNeXt', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
