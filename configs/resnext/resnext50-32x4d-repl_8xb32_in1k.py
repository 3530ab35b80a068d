# ImageNet ResNeXt-50 32x4d, upstream mmpretrain schedule (SGD, 100 epochs,
# batch 8 x 32), with a RepL backbone (k = 4: blocks 5, 9, 12 replaced; each
# site's conv2 is a grouped pointwise operator with 32 groups, spec §9.1).
_base_ = [
    'mmpretrain::resnext/resnext50-32x4d_8xb32_in1k.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='RepLResNeXt', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
