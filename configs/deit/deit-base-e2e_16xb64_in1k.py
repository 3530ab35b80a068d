# E2E twin of deit-base-repl_16xb64_in1k.py
# (mode='none': every layer kept, same plan and schedule; the paper's
# E2E row of Table 2).
_base_ = './deit-base-repl_16xb64_in1k.py'
model = dict(backbone=dict(replacement=dict(mode='none')))
