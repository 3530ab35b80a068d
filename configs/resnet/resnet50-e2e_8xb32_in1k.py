# E2E twin of resnet50-repl_8xb32_in1k.py (mode='none', same plan).
_base_ = './resnet50-repl_8xb32_in1k.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
