# SVHN variant of vit-tiny-p8-repl_1xb512_250e_cifar10.py (the same model,
# paper optimizer and schedule, batch 512), the paper's Table 1 setting; the
# data block is ../_base_/datasets/svhn_bs16.py.
_base_ = [
    '../_base_/models/repl-vit-tiny-p8_cifar.py',
    '../_base_/datasets/svhn_bs16.py',
    '../_base_/schedules/repl-vit_adamw-lr1e-3_250e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)

train_dataloader = dict(batch_size=512)
