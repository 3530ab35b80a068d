# The same demo on scikit-learn's handwritten digits (1,797 8x8 scans,
# upsampled to 32x32; `make_datasets.py digits --out data/digits`).
_base_ = './resnet32-repl_1xb64_15e_mnist5k.py'
data_preprocessor = dict(mean=[77.9] * 3, std=[95.9] * 3)  # measured on digits
train_dataloader = dict(dataset=dict(data_root='data/digits'))
val_dataloader = dict(dataset=dict(data_root='data/digits'))
test_dataloader = val_dataloader
