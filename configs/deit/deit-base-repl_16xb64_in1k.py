# ImageNet-1k ViT-B/16 (DeiT-base widths: 768-d, 12 layers, 16x16 patches)
# with a RepL backbone at the paper's ViT sites (layers 3, 7, 11; spec
# §1), the paper's Table 2 setting, as a delta on upstream's
# deit-base_16xb64_in1k.py.
#   paper (A.3, for all its ImageNet runs): train: 224x224 random crop +
#     horizontal flip (upstream's RandomResizedCrop 224 + flip; upstream's
#     RandAugment, RandomErasing, Mixup and CutMix are removed); test: 224x224
#     centre crop (after upstream's resize of the short edge to 256).
#   upstream (the paper gives the ViT-T/S optimizer only, nothing for ViT-B):
#     AdamW, lr 1e-3 for a total batch of 1024 (16 GPUs x 64), weight decay
#     0.05, 300 epochs (20 of linear warm-up, then cosine), gradient clipping
#     at norm 5, label smoothing 0.1, stochastic depth 0.1, EMA, the
#     no-decay rules for norms, biases, cls_token and pos_embed.
#   ours: the no-decay rules of ../_base_/repl_paramwise.py for the mixing
#     scalars and site norms (spec §8), merged with upstream's custom_keys.
# (mmpretrain's arch='small' is another, 8-layer ViT: not this model.)
_base_ = [
    'mmpretrain::deit/deit-base_16xb64_in1k.py',
    '../_base_/repl_paramwise.py',
    '../_base_/datasets/imagenet_crop-flip_224.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='RepLVisionTransformer',
        arch='deit-base',
        replacement=dict(indices=[3, 7, 11])),
    # the paper's augmentation: no Mixup / CutMix batch augments
    train_cfg=None)

train_pipeline = {{_base_.crop_flip_train_pipeline}}
train_dataloader = dict(batch_size=64, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
