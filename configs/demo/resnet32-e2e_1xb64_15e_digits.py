# E2E twin of resnet32-repl_1xb64_15e_digits.py (mode='none', same plan).
_base_ = './resnet32-repl_1xb64_15e_digits.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
