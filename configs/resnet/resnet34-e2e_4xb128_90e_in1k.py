# E2E twin of resnet34-repl_4xb128_90e_in1k.py (mode='none': every block
# kept, same plan and schedule; the paper's E2E row of Table 2).
_base_ = './resnet34-repl_4xb128_90e_in1k.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
