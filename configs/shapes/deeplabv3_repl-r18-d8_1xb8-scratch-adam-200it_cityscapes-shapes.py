# DeepLabV3 R18-D8 with a RepL ResNetV1c-18 backbone (k = 4: block 4 of 8
# replaced; the dilated stages keep their dilations), trained from scratch
# in minutes on one CPU on cityscapes-shapes.
# cityscapes-shapes is SYNTHETIC data (filled rectangles, circles and
# triangles on a textured background, Cityscapes layout and train ids:
# background 0 'road', rectangle 2, circle 7, triangle 8), written by
#   python tools/dataset_converters/make_datasets.py cityscapes-shapes \
#       --out data/cityscapes-shapes --num-train 500 --num-val 100
# (128x64 images, seed 0, deterministic). Its numbers say that a config
# learns, not how it does on Cityscapes. README.md of this folder has the
# results. mIoU averages the 4 classes that occur (mmseg skips classes
# absent from both labels and predictions); predicting background
# everywhere scores 23.1 on the val split (92.5% of its pixels).
#
# Changes to the paper-setting R50 config it inherits (all ours):
# - ResNetV1c-18 with BN (not SyncBN), no pretrained weights, and upstream's
#   r18 head widths halved (ASPP 64, auxiliary FCN 32 channels).
# - 64x64 crops of the 128x64 images resized by 0.5-2; whole-image test at
#   128x64.
# - Adam lr 1e-3 with poly decay (SGD lr 0.1 is for fine-tuning an ImageNet
#   model), batch 8, 200 iterations, validation once at the end.
_base_ = '../deeplabv3/deeplabv3_repl-r50-d8_1xb16-30k_cityscapes-768x768.py'
data_root = 'data/cityscapes-shapes/'  # synthetic
img_scale = (128, 64)
crop_size = (64, 64)
max_iters = 200
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(depth=18, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=512, channels=64, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=256, channels=32, norm_cfg=norm_cfg))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=img_scale,
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='Adam', lr=1e-3, weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(
        type='PolyLR',
        eta_min=1e-5,
        power=0.9,
        begin=50,
        end=max_iters,
        by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=25), checkpoint=dict(interval=max_iters))
auto_scale_lr = dict(base_batch_size=8)
