# The paper's small-dataset ViT schedule (Table 1).
#   paper (A.3, A.12): AdamW, lr 1e-3, weight decay 0.05, batch 512 on 1 GPU,
#     250 epochs, 5 epochs of linear warm-up then cosine decay.
#   upstream (DeiT-tiny, deit-tiny_4xb256_in1k.py; the paper gives none):
#     AdamW betas (0.9, 0.999) and eps 1e-8, warm-up from lr x 1e-3, cosine
#     down to 1e-5, gradient clipping at norm 5, the no-decay rules for norms,
#     biases, flat parameters, cls_token and pos_embed.
#   ours: the no-decay rules of ../repl_paramwise.py (spec §8), merged with
#     upstream's.
_base_ = '../repl_paramwise.py'

optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    optimizer=dict(
        type='AdamW', lr=1e-3, weight_decay=0.05, eps=1e-8,
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
