# ImageNet-1k Swin-T (16 GPUs x 64, upstream's 300-epoch AdamW schedule)
# with a RepL backbone (k = 4: blocks 4 and 8 of 12 replaced; spec §9.2), as
# a delta on upstream's swin-tiny_16xb64_in1k.py. Upstream's no-decay rules
# (norms, position embeddings, relative position bias tables) stay; ours for
# the mixing scalars and site norms are merged in.
_base_ = [
    'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
    '../_base_/repl_paramwise.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(type='RepLSwinTransformer', replacement=dict(interval=4)))
optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
