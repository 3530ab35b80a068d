# E2E twin of swin-tiny-repl_16xb64_in1k.py: the same backbone class and plan
# with mode='none' (every block kept; identical to upstream's
# SwinTransformer).
_base_ = './swin-tiny-repl_16xb64_in1k.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
