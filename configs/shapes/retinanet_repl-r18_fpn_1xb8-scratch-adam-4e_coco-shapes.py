# RetinaNet R18-FPN with a RepL ResNet-18 backbone (k = 4: block 4 of 8
# replaced), trained from scratch in minutes on one CPU on coco-shapes.
# coco-shapes is SYNTHETIC data (filled rectangles, circles and triangles on
# a textured background, 3 classes, COCO format), written by
#   python tools/dataset_converters/make_datasets.py coco-shapes \
#       --out data/coco-shapes --num-train 1000 --num-val 100 \
#       --height 72 --width 96
# (96x72 images, seed 0, deterministic). Its numbers say that a config
# learns, not how it does on COCO. README.md of this folder has the results.
#
# Changes to the paper-setting R50 config it inherits (all ours):
# - ResNet-18 with BN (not SyncBN), no pretrained weights, and upstream's r18
#   slim neck; a 64-channel head with 4 convs per branch.
# - anchors of half upstream's size (octave_base_scale 2: 16-25 px at stride
#   8) for the 9-35 px objects of 96x72 images.
# - Adam lr 1e-3 (the paper's 4e-5 is for 100 COCO epochs), 50-iteration
#   warm-up, lr x 0.1 for the last 2 of 4 epochs (500 iterations); batch 8;
#   validation once at the end.
_base_ = '../retinanet/retinanet_repl-r50_fpn_4xb2-scratch-adam-100e_coco.py'
data_root = 'data/coco-shapes/'  # synthetic
metainfo = dict(classes=('rectangle', 'circle', 'triangle'))
img_scale = (96, 72)
max_epochs = 4
model = dict(
    backbone=dict(depth=18, norm_cfg=dict(type='BN', requires_grad=True)),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    bbox_head=dict(
        num_classes=3,
        in_channels=64,
        feat_channels=64,
        anchor_generator=dict(octave_base_scale=2)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1,
    dataset=dict(
        data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[max_epochs - 2],
        gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
auto_scale_lr = dict(base_batch_size=8)
