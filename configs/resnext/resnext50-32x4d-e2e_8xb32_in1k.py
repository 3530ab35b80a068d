# E2E twin of resnext50-32x4d-repl_8xb32_in1k.py (mode='none', same plan).
_base_ = './resnext50-32x4d-repl_8xb32_in1k.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
