# RetinaNet R50-FPN, upstream 1x schedule, with a RepL ResNet-50 backbone
# (k = 4: blocks 5, 9, 12 replaced). The kept blocks load from upstream's
# ImageNet-pretrained torchvision ResNet-50 (init_cfg of the base config);
# the replaced blocks' keys are reported as unused (spec §6).
_base_ = [
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='RepLResNet', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
