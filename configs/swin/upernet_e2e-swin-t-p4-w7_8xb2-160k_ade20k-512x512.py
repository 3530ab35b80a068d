# E2E twin of upernet_repl-swin-t-p4-w7_8xb2-160k_ade20k-512x512.py: the same
# backbone class and plan with mode='none' (every block kept; identical to
# upstream's SwinTransformer).
_base_ = './upernet_repl-swin-t-p4-w7_8xb2-160k_ade20k-512x512.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
