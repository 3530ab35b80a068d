"""The converters on grouped-conv sites (spec §9.1): a static ResNeXt
equals the trained one, and the E2E -> RepL site fit recovers a grouped
site of its own family."""
import pytest
import torch
from mmpretrain.models.backbones.resnext import Bottleneck
from torch import nn

from repl_mm.converters.site_fit import fit_site
from repl_mm.converters.to_static import static_replacement
from repl_mm.core import ConvSite, StaticConvSite
from repl_mm.models.cls_resnext import RepLResNeXt
from .test_static import check_twin, randomize

# ResNeXt-50 at a quarter width, 4 groups of 4 (sites 5, 9, 12)
TINY = dict(
    depth=50, groups=4, width_per_group=4, stem_channels=16, base_channels=16)


@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
def test_static_resnext_equals_repl(mode):
    opts = dict(mode=mode)
    repl = randomize(RepLResNeXt(**TINY, replacement=opts))
    static = RepLResNeXt(**TINY, replacement=static_replacement(opts))
    check_twin(repl, static, torch.randn(2, 3, 32, 32))
    for site in static.site_modules().values():
        if mode == 'interpolate':
            assert isinstance(site, Bottleneck) and site.conv2.groups == 4
        else:
            assert isinstance(site, StaticConvSite)
            assert site.conv_groups == (1, 4, 1)


def _grouped_site(seed):
    torch.manual_seed(seed)
    convs = [[
        nn.Conv2d(16, 8, 1, bias=False),
        nn.Conv2d(8, 8, 3, groups=4, bias=False),
        nn.Conv2d(8, 16, 1, bias=False)
    ] for _ in range(2)]
    return ConvSite([(8, 16), (8, 8), (16, 8)],
                    [[('prev', p), ('next', n)] for p, n in zip(*convs)],
                    nn.BatchNorm2d(16),
                    nn.ReLU(),
                    conv_groups=(1, 4, 1)).eval()


def test_grouped_site_in_its_family_is_fitted_exactly():
    truth = _grouped_site(0)
    with torch.no_grad():
        for name, p in truth.named_parameters():
            if name.startswith('phi'):
                p.uniform_(0.3, 1.2)
        truth.site_norm.weight.uniform_(0.5, 1.5)
        truth.site_norm.bias.normal_()
        truth.site_norm.running_mean.normal_()
        truth.site_norm.running_var.uniform_(0.5, 2.0)
    x = torch.relu(torch.randn(8, 16, 5, 5))
    with torch.no_grad():
        branch = truth._update(x, *truth.weights(x))
        y = truth(x)
    fresh = _grouped_site(0)  # the same neighbours, fresh phi and norm
    before, after = fit_site(fresh, x, y, branch=branch, steps=30)
    assert before > 0.05 and after < 1e-3


def test_e2e_resnext_checkpoint_converts(tmp_path):
    """``convert`` (E2E -> RepL start) on a tiny mmpretrain ResNeXt: every
    grouped site's fit lowers its error, and the result loads strictly
    into the RepL model."""
    import textwrap

    from repl_mm.apis import init_model, load_checkpoint_state
    from repl_mm.converters.from_e2e import convert
    from repl_mm.datasets.writers import synthetic_images, write_cifar
    from .test_from_e2e import DEMO
    imgs, labels, classes = synthetic_images(2, img_size=16)
    write_cifar(
        str(tmp_path / 'data'), (imgs, labels), (imgs, labels), classes)
    backbone = dict(TINY, type='RepLResNeXt', stem_channels=8, base_channels=8)
    (tmp_path / 'repl.py').write_text(
        textwrap.dedent(f"""
        _base_ = '{DEMO}'
        model = dict(
            backbone=dict(_delete_=True, **{backbone!r}),
            head=dict(in_channels=256))
        train_pipeline = [dict(type='PackInputs')]
        train_dataloader = dict(batch_size=10, dataset=dict(
            data_root='{tmp_path / 'data'}', pipeline=train_pipeline))
        val_dataloader = dict(batch_size=10, dataset=dict(
            data_root='{tmp_path / 'data'}'))
        test_dataloader = val_dataloader
        """))
    (tmp_path / 'e2e.py').write_text(
        "_base_ = './repl.py'\n"
        "model = dict(backbone=dict(replacement=dict(mode='none')))\n")
    e2e = init_model(str(tmp_path / 'e2e.py'))
    ckpt = str(tmp_path / 'e2e.pth')
    torch.save(dict(state_dict=e2e.state_dict(), meta={}), ckpt)
    out = str(tmp_path / 'repl.pth')
    report = convert(
        str(tmp_path / 'e2e.py'),
        ckpt,
        str(tmp_path / 'repl.py'),
        out,
        num_batches=1,
        steps=5,
        evaluate_metrics=False)
    assert sorted(s.index for s in report.sites) == [5, 9, 12]
    # the least squares start of each grouped chain improves on fresh
    assert all(s.fitted_error < s.fresh_error for s in report.sites)
    repl = init_model(str(tmp_path / 'repl.py'))
    repl.load_state_dict(load_checkpoint_state(out), strict=True)
    site = repl.backbone.site_modules()[5]
    assert site.conv_groups == (1, 4, 1)
