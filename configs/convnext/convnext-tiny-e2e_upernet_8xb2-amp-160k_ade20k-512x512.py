# E2E twin of convnext-tiny-repl_upernet_8xb2-amp-160k_ade20k-512x512.py:
# the same backbone class and plan with mode='none' (every block kept;
# identical to upstream's ConvNeXt), the same schedule and param groups.
_base_ = './convnext-tiny-repl_upernet_8xb2-amp-160k_ade20k-512x512.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
