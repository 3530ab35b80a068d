# RetinaNet R50-FPN with a RepL ResNet-50 backbone (k = 4: blocks 5, 9, 12
# replaced) in the paper's COCO setting (Table 8, Sec. 3.4): trained from
# scratch, Adam lr 4e-5, batch 8 in total on 4 GPUs, 100 epochs.
#
# Where each value comes from (README.md of this folder says the same):
# - paper: no pretrained weights (spec §7), Adam, lr 4e-5, batch 8 on 4
#   GPUs (split 4 x 2), 100 epochs.
# - upstream (retinanet_r50_fpn_1x_coco.py): model, data pipeline, 500-iter
#   linear warm-up, weight decay 1e-4.
# - ours (the paper does not say): lr x 0.1 at epochs 67 and 92 (upstream's
#   1x milestones 8/12 and 11/12 scaled to 100 epochs); every backbone layer
#   trains (frozen_stages=-1, norm_eval=False: upstream freezes the stem and
#   the BN statistics of its ImageNet weights, which a from-scratch model does
#   not have); BN statistics are synchronised over the 4 GPUs (SyncBN: 2
#   images per GPU are too few). A single-process run (CPU or one GPU) reverts
#   SyncBN to BN automatically (mmengine's Runner); DDP on CPUs (gloo has no
#   SyncBN) needs --cfg-options model.backbone.norm_cfg.type=BN; validation
#   every 5 epochs.
_base_ = [
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
max_epochs = 100
model = dict(
    backbone=dict(
        type='RepLResNet',
        replacement=dict(interval=4),
        frozen_stages=-1,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        init_cfg=None))
train_dataloader = dict(batch_size=2)
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    optimizer=dict(_delete_=True, type='Adam', lr=4e-5, weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[67, 92],
        gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
default_hooks = dict(checkpoint=dict(interval=5, max_keep_ckpts=3))
# batch 8 = 4 GPUs x 2; --auto-scale-lr scales lr 4e-5 to another batch
auto_scale_lr = dict(base_batch_size=8)
