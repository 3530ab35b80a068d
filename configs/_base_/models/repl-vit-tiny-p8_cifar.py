# ViT-Tiny/8 (DeiT-tiny widths: 192-d, 12 layers, 3 heads; 8x8 patches of a
# 32x32 image) with RepL at the paper's ViT sites (layers 3, 7, 11 of 12;
# spec §1, appendix A.12) and a 10-class head.
#   upstream (DeiT-tiny, deit-tiny_4xb256_in1k.py; the paper gives none):
#     label smoothing 0.1, no stochastic depth, the initialisation
#     (trunc-normal linears).
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
