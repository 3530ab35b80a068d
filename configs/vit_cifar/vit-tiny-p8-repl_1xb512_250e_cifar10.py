# CIFAR-10 ViT-Tiny/8 (DeiT-tiny widths: 192-d, 12 layers, 3 heads; 8x8
# patches of a 32x32 image) with RepL at the paper's ViT sites (layers 3, 7,
# 11 of 12; spec §1, appendix A.12), the paper's Table 1 setting, on
# upstream's CIFAR-10 data config (cifar10_bs16.py) and DeiT-tiny recipe
# (deit-tiny_4xb256_in1k.py).
#   paper (A.3, A.12): AdamW, lr 1e-3, weight decay 0.05, batch 512 on 1 GPU,
#     250 epochs, 5 epochs of linear warm-up then cosine decay; train:
#     4-pixel reflection padding, random 32x32 crop, horizontal flip p=0.5.
#   upstream (DeiT-tiny; the paper gives none): AdamW betas (0.9, 0.999) and
#     eps 1e-8, warm-up from lr x 1e-3, cosine down to 1e-5, gradient
#     clipping at norm 5, label smoothing 0.1, no stochastic depth, the
#     initialisation (trunc-normal linears), the no-decay rules for norms,
#     biases, flat parameters, cls_token and pos_embed; CIFAR-10 mean/std,
#     test images as they are.
#   ours: no RandAugment / Mixup / CutMix / RandomErasing (the paper lists
#     only crop + flip); the no-decay rules of ../_base_/repl_paramwise.py
#     (spec §8), merged with upstream's.
_base_ = [
    'mmpretrain::_base_/datasets/cifar10_bs16.py',
    'mmpretrain::_base_/default_runtime.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='RepLVisionTransformer',
        arch='deit-tiny',
        img_size=32,
        patch_size=8,
        replacement=dict(indices=[3, 7, 11])),
    neck=None,
    head=dict(
        type='VisionTransformerClsHead',
        num_classes=10,
        in_channels=192,
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
    ),
    init_cfg=[
        dict(type='TruncNormal', layer='Linear', std=.02),
        dict(type='Constant', layer='LayerNorm', val=1., bias=0.),
    ])

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4, padding_mode='reflect'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=512, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    optimizer=dict(
        type='AdamW',
        lr=1e-3,
        weight_decay=0.05,
        eps=1e-8,
        betas=(0.9, 0.999)),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        # upstream DeiT's custom_keys plus repl_paramwise.py's (a `{{ }}`
        # reference cannot be merged with other keys in one dict)
        custom_keys=dict(
            **_base_.repl_no_decay_keys,  # noqa: F821
            **{
                '.cls_token': dict(decay_mult=0.0),
                '.pos_embed': dict(decay_mult=0.0)
            })),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        begin=0,
        end=5,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=245,
        eta_min=1e-5,
        by_epoch=True,
        begin=5,
        end=250,
        convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=250, val_interval=1)
val_cfg = dict()
test_cfg = dict()
# lr 1e-3 is for a total batch of 512 (--auto-scale-lr rescales it for others)
auto_scale_lr = dict(base_batch_size=512)
