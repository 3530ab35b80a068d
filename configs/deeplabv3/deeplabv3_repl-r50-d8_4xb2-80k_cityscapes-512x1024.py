# DeepLabV3 R50-D8 on Cityscapes, upstream 80k schedule, with a RepL
# ResNetV1c-50 backbone (k = 4; the dilated stages keep their dilations).
# SyncBN stays the GPU default of the base config; single-process CPU runs
# fall back to BN, CPU DDP runs need
# --cfg-options norm_cfg.type=BN model.backbone.norm_cfg.type=BN ...
_base_ = [
    'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(type='RepLResNetV1c', replacement=dict(interval=4)))
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
