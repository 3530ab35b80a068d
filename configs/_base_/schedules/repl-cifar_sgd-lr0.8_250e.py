# The paper's CIFAR ResNet schedule (Table 1), as a delta on upstream's
# cifar10_bs128.py.
#   paper (A.3): SGD, lr 0.8, batch 1024 on 1 GPU, 250 epochs.
#   supplement (A.1; the main paper names no schedule and no weight decay
#     for its ResNets): cosine annealing, weight decay 1e-4 (= upstream's).
#   upstream: momentum 0.9.
#   ours: 5 epochs of linear warm-up from lr 0.8e-3 (the paper's ViT schedule
#     has one; lr 0.8 at batch 1024 is a large-batch rate), cosine down to 0;
#     the no-decay rules of ../repl_paramwise.py (spec §8).
_base_ = [
    'mmpretrain::_base_/schedules/cifar10_bs128.py',
    '../repl_paramwise.py',
]

optim_wrapper = dict(
    constructor='RepLOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=0.8, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={{_base_.repl_no_decay_keys}}))
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
        eta_min=0.0,
        by_epoch=True,
        begin=5,
        end=250,
        convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=250, val_interval=1)
# lr 0.8 is for a total batch of 1024 (--auto-scale-lr rescales it for others)
auto_scale_lr = dict(base_batch_size=1024)
