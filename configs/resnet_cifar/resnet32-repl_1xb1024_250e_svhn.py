# SVHN variant of resnet32-repl_1xb1024_250e_cifar10.py (the same model,
# paper optimizer and schedule, batch 1024), the paper's Table 1 setting;
# the data block is ../_base_/datasets/svhn_bs16.py.
_base_ = [
    '../_base_/models/repl-resnet32_cifar.py',
    '../_base_/datasets/svhn_bs16.py',
    '../_base_/schedules/repl-cifar_sgd-lr0.8_250e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['repl_mm'], allow_failed_imports=False)

train_dataloader = dict(batch_size=1024)
