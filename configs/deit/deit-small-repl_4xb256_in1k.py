# ImageNet-1k ViT-S/16 (DeiT-small widths: 384-d, 12 layers, 16x16 patches)
# with a RepL backbone at the paper's ViT sites (layers 3, 7, 11; spec
# §1), the paper's Table 2 setting, as a delta on upstream's
# deit-small_4xb256_in1k.py.
#   paper (A.3): AdamW, lr 7.5e-4, total batch 1024 on 4 GPUs (4 x 256);
#     train: 224x224 random crop + horizontal flip (upstream's
#     RandomResizedCrop 224 + flip; upstream's RandAugment, RandomErasing,
#     Mixup and CutMix are removed); test: 224x224 centre crop (after
#     upstream's resize of the short edge to 256).
#   upstream (the paper gives none): weight decay 0.05, 300 epochs (20 of
#     linear warm-up, then cosine), gradient clipping at norm 5, label
#     smoothing 0.1, no stochastic depth, the no-decay rules for norms,
#     biases, cls_token and pos_embed.
#   ours: the no-decay rules of ../_base_/repl_paramwise.py for the mixing
#     scalars and site norms (spec §8), merged with upstream's custom_keys.
# (mmpretrain's arch='small' is another, 8-layer ViT: not this model.)
_base_ = [
    'mmpretrain::deit/deit-small_4xb256_in1k.py',
    '../_base_/repl_paramwise.py',
    '../_base_/datasets/imagenet_crop-flip_224.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='RepLVisionTransformer',
        arch='deit-small',
        replacement=dict(indices=[3, 7, 11])),
    # the paper's augmentation: no Mixup / CutMix batch augments
    train_cfg=None)

train_pipeline = {{_base_.crop_flip_train_pipeline}}
train_dataloader = dict(batch_size=256, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    optimizer=dict(lr=7.5e-4),
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
