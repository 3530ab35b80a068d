# Demo: ViT-Tiny/8 (DeiT-tiny widths, 192-d, 12 layers, 8x8 patches of a
# 32x32 image) with RepL at the paper's ViT sites (indices 3, 7, 11; spec
# §1) on MNIST-5k, CPU-sized. AdamW as in the paper's ViT runs, our
# schedule.
_base_ = './resnet32-repl_1xb64_15e_mnist5k.py'
model = dict(
    backbone=dict(
        _delete_=True,
        type='RepLVisionTransformer',
        arch='deit-tiny',
        img_size=32,
        patch_size=8,
        drop_path_rate=0.1,
        replacement=dict(indices=[3, 7, 11])),
    neck=None,
    head=dict(
        _delete_=True,
        type='VisionTransformerClsHead',
        num_classes=10,
        in_channels=192,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            '.cls_token': dict(decay_mult=0.0),
            '.pos_embed': dict(decay_mult=0.0)
        }))
