# E2E twin of convnext-tiny-repl_32xb128_in1k.py: the same backbone class
# and plan with mode='none' (every block kept; identical to upstream's
# ConvNeXt), the same recipe.
_base_ = './convnext-tiny-repl_32xb128_in1k.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
