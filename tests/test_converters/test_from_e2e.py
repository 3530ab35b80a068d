"""Starting RepL from an E2E checkpoint: the fits recover
sites that lie in the site's family, kept weights are copied bit-exactly,
the result loads strictly, and bad inputs fail by name."""
import textwrap

import pytest
import torch
from torch import nn

from repl_mm.apis import init_model, load_checkpoint_state
from repl_mm.converters.from_e2e import convert
from repl_mm.converters.site_fit import (calibrate_norms, fit_chain, fit_site,
                                         relative_error, site_error, to_pixels)
from repl_mm.core.cnn_site import ConvSite
from repl_mm.core.synthesis import collapse_kernel
from repl_mm.core.vit_site import TransformerSite

ROOT = __import__('pathlib').Path(__file__).resolve().parents[2]
DEMO = ROOT / 'configs/demo/resnet32-repl_1xb64_15e_mnist5k.py'


# -- tensor math ------------------------------------------------------------
def test_fit_chain_recovers_a_chain_in_its_family():
    c = 5
    x = torch.randn(4000, c)
    srcs = [[torch.randn(c, c), torch.randn(c, c)] for _ in range(2)]
    true = [[torch.rand(c) + 0.2, torch.rand(c) - 0.5] for _ in range(2)]
    mats = [
        sum(p[:, None] * s for p, s in zip(ps, ss))
        for ps, ss in zip(true, srcs)
    ]
    d = torch.randn(c)
    target = x @ mats[0].T @ mats[1].T + d
    start = [[torch.full((c, ), 0.5)] * 2 for _ in range(2)]
    coefs, off = fit_chain(x, target, srcs, start)
    fit = [
        sum(p[:, None].float() * s for p, s in zip(ps, ss))
        for ps, ss in zip(coefs, srcs)
    ]
    pred = x @ fit[0].T @ fit[1].T + off.float()
    assert relative_error(pred, target) < 1e-4


def _linears(d):
    return (nn.Linear(d, 3 * d), nn.Linear(d, d)), (nn.Linear(d, 4 * d),
                                                    nn.Linear(4 * d, d))


def test_transformer_site_fit_recovers_alpha_beta_and_ln():
    d = 8
    (qp, pp), (f1p, f2p) = _linears(d)
    (qn, pn), (f1n, f2n) = _linears(d)
    srcs = {
        'attn': [('prev', (qp, pp)), ('next', (qn, pn))],
        'mlp': [('prev', (f1p, f2p)), ('next', (f1n, f2n))]
    }

    def site():
        return TransformerSite(d, srcs, nn.LayerNorm(d), nn.GELU()).eval()

    truth = site()
    with torch.no_grad():
        truth.alpha.fill_(0.3)
        truth.beta.fill_(0.9)
        truth.site_norm.weight.copy_(torch.rand(d) + 0.5)
        truth.site_norm.bias.copy_(torch.randn(d))
    x = torch.randn(16, 5, d)
    with torch.no_grad():
        y = truth(x)
    fresh = site()
    before, after = fit_site(fresh, x, y, steps=50)
    assert before > 0.1 and after < 1e-4
    assert site_error(fresh, x, y) == pytest.approx(after)


# -- tiny models from configs ---------------------------------------------
@pytest.fixture(scope='module')
def configs(tmp_path_factory):
    """A tiny CIFAR-format set and RepL / E2E / drop / interpolate configs
    of a 4-8-16-channel ResNet-20 (sites 5 and 8) on it."""
    from repl_mm.datasets.writers import synthetic_images, write_cifar
    root = tmp_path_factory.mktemp('e2e_to_repl')
    imgs, labels, classes = synthetic_images(2, img_size=8)
    write_cifar(str(root / 'data'), (imgs, labels), (imgs, labels), classes)
    (root / 'repl.py').write_text(
        textwrap.dedent(f"""
        _base_ = '{DEMO}'
        model = dict(
            backbone=dict(depth=20, stem_channels=4, base_channels=4),
            head=dict(in_channels=16))
        train_pipeline = [dict(type='PackInputs')]
        train_dataloader = dict(batch_size=10, dataset=dict(
            data_root='{root / 'data'}', pipeline=train_pipeline))
        val_dataloader = dict(batch_size=10, dataset=dict(
            data_root='{root / 'data'}'))
        test_dataloader = val_dataloader
        """))
    for name, extra in dict(
            e2e="mode='none'",
            drop="mode='drop'",
            interp="mode='interpolate'",
            e2e_k2="mode='none', interval=2").items():
        (root / f'{name}.py').write_text(
            f"_base_ = './repl.py'\n"
            f'model = dict(backbone=dict(replacement=dict({extra})))\n')
    return {p.stem: str(p) for p in root.glob('*.py')}


def _in_family(e2e_model):
    """Make E2E block 5 compute what a ConvSite with known phi computes:
    1x1 convs (centre taps) mixed from its neighbours 4 and 6, bn1 an
    affine map that keeps the ReLU between them inactive, bn2 arbitrary."""
    bb = e2e_model.backbone
    blocks = [b for name in bb.res_layers for b in getattr(bb, name)]
    b4, b5, b6 = blocks[3:6]
    with torch.no_grad():
        # conv1: block 4 down-samples (16 -> 8 channels), only 6 serves.
        w1 = 0.7 * collapse_kernel(b6.conv1.weight)
        w2 = (
            torch.rand(8, 1) * collapse_kernel(b4.conv2.weight) +
            torch.rand(8, 1) * collapse_kernel(b6.conv2.weight))
        for conv, w in ((b5.conv1, w1), (b5.conv2, w2)):
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = w
        b5.norm1.running_mean.zero_()
        b5.norm1.running_var.fill_(1.0)
        b5.norm1.weight.fill_(1.0)
        b5.norm1.bias.fill_(20.0)
        b5.norm2.weight.copy_(torch.rand(8) + 0.5)
        b5.norm2.bias.copy_(torch.randn(8))
        b5.norm2.running_mean.copy_(torch.randn(8))
        b5.norm2.running_var.copy_(torch.rand(8) + 0.5)
    return b5


@pytest.fixture(scope='module')
def converted(configs, tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    e2e = init_model(configs['e2e'])
    b5 = _in_family(e2e)
    ckpt = str(root / 'e2e.pth')
    torch.save(dict(state_dict=e2e.state_dict(), meta={}), ckpt)
    out = str(root / 'repl.pth')
    report = convert(
        configs['e2e'],
        ckpt,
        configs['repl'],
        out,
        num_batches=2,
        evaluate_metrics=False)
    return dict(report=report, e2e=ckpt, out=out, block5=b5)


def test_site_in_its_family_is_fitted_exactly(converted):
    fits = {s.index: s for s in converted['report'].sites}
    assert sorted(fits) == [5, 8]
    assert fits[5].fresh_error > 0.05
    assert fits[5].fitted_error < 1e-3


def test_fit_lowers_the_error_of_a_random_block(converted):
    s8 = next(s for s in converted['report'].sites if s.index == 8)
    assert s8.fitted_error < s8.fresh_error


def test_kept_weights_bit_exact_and_strict_load(converted, configs):
    e2e = load_checkpoint_state(converted['e2e'])
    out = torch.load(converted['out'], map_location='cpu', weights_only=True)
    assert set(out) == {'state_dict', 'meta'}
    sd = out['state_dict']
    site_keys = [
        k for k in sd
        if k.startswith(('backbone.layer2.1.', 'backbone.layer3.1.'))
    ]
    assert 'backbone.layer2.1.phi2_prev' in site_keys
    for k, v in sd.items():
        if k in e2e:
            assert torch.equal(v, e2e[k]), k
    assert sorted(set(sd) - set(e2e)) == sorted(site_keys +
                                                ['backbone.replacement_plan'])
    repl = init_model(configs['repl'])
    repl.load_state_dict(sd, strict=True)
    # The fitted site, evaluated in the loaded model, matches E2E block 5.
    x = torch.rand(3, 8, 4, 4)
    with torch.no_grad():
        y = converted['block5'].eval()(x.clone())
        z = repl.backbone.site_modules()[5](x.clone())
    assert relative_error(z, y) < 1e-3


def test_interpolated_block_fit_recovers_alpha_beta(configs):
    model = init_model(configs['interp'])
    site = model.backbone.site_modules()[8]
    x = torch.relu(torch.randn(12, 16, 2, 2))
    with torch.no_grad():
        site.alpha.fill_(0.3)
        site.beta.fill_(0.8)
        calibrate_norms(site, x)  # truth: BN statistics of the data
        y = site(x)
        site.alpha.fill_(0.5)
        site.beta.fill_(0.5)
    before, after = fit_site(site, x, y, steps=50)
    assert before > 1e-2 and after < 1e-4
    # Each interpolated conv feeds a BN, so only alpha / beta is
    # identifiable (conv1 draws from 'next' alone).
    assert site.alpha.item() / site.beta.item() == pytest.approx(
        0.3 / 0.8, rel=1e-3)


def test_conv_site_fit_without_branch_still_improves():
    c = 4
    prev, nxt = nn.Conv2d(c, c, 3), nn.Conv2d(c, c, 3)
    site = ConvSite([(c, c)], [[('prev', prev), ('next', nxt)]],
                    nn.BatchNorm2d(c), nn.ReLU()).eval()
    x = torch.relu(torch.randn(8, c, 5, 5))
    y = torch.relu(x + torch.randn(8, c, 5, 5).mul(0.3) + 0.5 * x.flip(1))
    before, after = fit_site(site, x, y, branch=None, steps=30)
    assert after < before
    assert to_pixels(x).shape == (8 * 25, c)


def _gn_site(seed=1, gain=1.0):
    """A one-position ConvSite with a GroupNorm site norm."""
    c = 8
    torch.manual_seed(seed)
    prev, nxt = nn.Conv2d(c, c, 3), nn.Conv2d(c, c, 3)
    with torch.no_grad():
        prev.weight.mul_(gain)
        nxt.weight.mul_(gain)
    return ConvSite([(c, c)], [[('prev', prev), ('next', nxt)]],
                    nn.GroupNorm(2, c), nn.ReLU()).eval()


def test_gn_site_in_its_family_is_fitted_on_whole_maps():
    # A GN mixes the pixels of a map: fitting it pixel by pixel (1x1
    # maps) fits another function (relative error 0.125 here).
    truth = _gn_site()
    c = 8
    with torch.no_grad():
        truth.phi1_prev.copy_(torch.rand(c))
        truth.phi1_next.copy_(torch.rand(c) - .5)
        truth.site_norm.weight.copy_(torch.rand(c) + .5)
        truth.site_norm.bias.copy_(torch.randn(c))
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, c, 6, 6))
    with torch.no_grad():
        y = truth(x)
    before, after = fit_site(_gn_site(), x, y, None, steps=100)
    assert before > 0.5 and after < 0.05


@pytest.mark.parametrize('steps', [0, 5])
def test_fit_never_returns_a_worse_site(steps):
    # E2E block with a small branch; a GN site (no least-squares start)
    # with large neighbours: gamma 0 -> 1 alone is far worse than fresh.
    site = _gn_site(seed=0, gain=5.0)
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 8, 5, 5))
    y = torch.relu(x + 0.1 * torch.randn(8, 8, 5, 5))
    fresh = {k: v.clone() for k, v in site.state_dict().items()}
    before, after = fit_site(site, x, y, branch=None, steps=steps)
    assert after <= before
    assert site_error(site, x, y) == pytest.approx(after)
    if after == before:  # put back as it was
        for k, v in site.state_dict().items():
            assert torch.equal(v, fresh[k]), k


@pytest.mark.parametrize('max_points', [1, 0, -5])
def test_max_points_below_two_is_rejected(max_points):
    c = 4
    site = ConvSite([(c, c)], [[('prev', nn.Conv2d(c, c, 3)),
                                ('next', nn.Conv2d(c, c, 3))]],
                    nn.BatchNorm2d(c), nn.ReLU()).eval()
    fresh = {k: v.clone() for k, v in site.state_dict().items()}
    x = torch.relu(torch.randn(4, c, 5, 5))
    with pytest.raises(
            ValueError, match=f'max_points must be .*got {max_points}'):
        fit_site(site, x, x, x * 0.5, steps=3, max_points=max_points)
    for k, v in site.state_dict().items():
        assert torch.equal(v, fresh[k]), k


# -- errors --------------------------------------------------------------
def test_errors_name_the_problem(configs, converted, tmp_path):
    out = str(tmp_path / 'o.pth')
    kw = dict(num_batches=1, evaluate_metrics=False)
    with pytest.raises(ValueError, match="mode='drop'.*nothing to fit"):
        convert(configs['e2e'], converted['e2e'], configs['drop'], out, **kw)
    with pytest.raises(
            ValueError, match=r'plans sites \[2, 5, 6, 8\].*'
            r'sites \[5, 8\]'):
        convert(configs['e2e_k2'], converted['e2e'], configs['repl'], out,
                **kw)
    with pytest.raises(ValueError, match="must be the mode='none' twin"):
        convert(configs['repl'], converted['e2e'], configs['repl'], out, **kw)
    with pytest.raises(ValueError, match='is a RepL checkpoint'):
        convert(configs['e2e'], converted['out'], configs['repl'], out, **kw)
    state = load_checkpoint_state(converted['e2e'])
    state.pop('head.fc.bias')
    state['backbone.extra.weight'] = torch.zeros(1)
    bad = str(tmp_path / 'bad.pth')
    torch.save(dict(state_dict=state), bad)
    with pytest.raises(
            ValueError,
            match=r'missing keys \[head\.fc\.bias\]'
            r'.*unexpected keys \[backbone\.extra\.weight\]'):
        convert(configs['e2e'], bad, configs['repl'], out, **kw)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        convert(
            configs['e2e'],
            converted['e2e'],
            configs['repl'],
            out,
            split='val',
            **kw)
    with pytest.raises(ValueError, match='max_points must be .*got 1'):
        convert(
            configs['e2e'],
            converted['e2e'],
            configs['repl'],
            out,
            max_points=1,
            **kw)


def _no_work(monkeypatch):
    """Make any model build fail: the checks must come before it."""
    import repl_mm.converters.from_e2e as from_e2e

    def init_model(*args, **kwargs):
        raise AssertionError('work started before the output check')

    monkeypatch.setattr(from_e2e, 'init_model', init_model)


def test_output_never_overwrites_an_input(configs, converted, monkeypatch):
    _no_work(monkeypatch)
    kw = dict(num_batches=1, evaluate_metrics=False)
    e2e = converted['e2e']
    data = open(e2e, 'rb').read()
    for force in (False, True):
        with pytest.raises(
                ValueError,
                match=r"out_file '.*e2e\.pth' is "
                r'the input e2e_checkpoint'):
            convert(
                configs['e2e'], e2e, configs['repl'], e2e, force=force, **kw)
        with pytest.raises(
                ValueError,
                match=r"out_file '.*repl\.py' is "
                'the input repl_config'):
            convert(
                configs['e2e'],
                e2e,
                configs['repl'],
                configs['repl'],
                force=force,
                **kw)
    assert open(e2e, 'rb').read() == data


def test_existing_output_needs_force(configs, converted, tmp_path,
                                     monkeypatch):
    out = tmp_path / 'exists.pth'
    out.write_bytes(b'keep me')
    kw = dict(num_batches=1, steps=1, evaluate_metrics=False)
    with monkeypatch.context() as m:
        _no_work(m)
        with pytest.raises(
                FileExistsError,
                match=r"out_file '.*exists\.pth'"
                r' already exists.*--force'):
            convert(configs['e2e'], converted['e2e'], configs['repl'],
                    str(out), **kw)
    assert out.read_bytes() == b'keep me'
    convert(
        configs['e2e'],
        converted['e2e'],
        configs['repl'],
        str(out),
        force=True,
        **kw)
    assert torch.load(out, weights_only=True)['meta']['site_fit']


# -- the tool --------------------------------------------------------------
def _tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'e2e_to_repl', ROOT / 'tools/model_converters/e2e_to_repl.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli_end_to_end(configs, converted, tmp_path, capsys):
    tool = _tool()
    out = str(tmp_path / 'cli.pth')
    report = tool.main([
        configs['e2e'], converted['e2e'], configs['repl'], out,
        '--num-batches', '1', '--steps', '5', '--split', 'test'
    ])
    text = capsys.readouterr().out
    assert 'fresh err' in text and 'RepL, fitted sites: accuracy/top1=' \
        in text
    assert set(report.metrics) == {'e2e', 'repl_fresh', 'repl_fitted'}
    for m in report.metrics.values():
        assert 0 <= m['accuracy/top1'] <= 100
    assert torch.load(out, weights_only=True)['meta']['site_fit']


def test_cli_output_checks(configs, converted, tmp_path, capsys):
    tool = _tool()
    args = [configs['e2e'], converted['e2e'], configs['repl']]
    opts = ['--num-batches', '1', '--steps', '1', '--no-eval']
    with pytest.raises(SystemExit):
        tool.main(args + [str(tmp_path / 'o.pth'), '--max-points', '1'])
    assert '--max-points must be >= 2, but got 1' in capsys.readouterr().err
    with pytest.raises(ValueError, match='is the input e2e_checkpoint'):
        tool.main(args + [converted['e2e'], '--force'] + opts)
    out = tmp_path / 'cli.pth'
    out.write_bytes(b'keep me')
    with pytest.raises(FileExistsError, match='--force'):
        tool.main(args + [str(out)] + opts)
    assert out.read_bytes() == b'keep me'
    tool.main(args + [str(out), '--force'] + opts)
    assert torch.load(out, weights_only=True)['meta']['site_fit']


@pytest.mark.parametrize('mode', ['synthesize', 'interpolate'])
def test_swin_sites_fit_with_hw_shape(mode):
    """A Swin block is called as block(x, hw_shape): the record keeps
    hw_shape and the fit calls an interpolated Swin block with it; a
    record at two input sizes is refused."""
    from repl_mm.converters.from_e2e import record_blocks
    from repl_mm.models.det_swin import RepLSwinTransformer
    kw = dict(
        embed_dims=16,
        depths=(2, 6, 1),
        num_heads=(1, 2, 4),
        strides=(4, 2, 2),
        window_size=2,
        out_indices=(0, 1, 2),
        drop_path_rate=0.0)
    torch.manual_seed(0)
    e2e = RepLSwinTransformer(**kw, replacement=dict(mode='none'))
    repl = RepLSwinTransformer(**kw, replacement=dict(mode=mode))
    repl.load_state_dict(e2e.state_dict(), strict=False)

    class Task(nn.Module):

        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def data_preprocessor(self, data, training):
            return data

        def extract_feat(self, x):
            return self.backbone(x)

    block = e2e.stages[1].blocks[1]  # site 4
    batches = [dict(inputs=torch.rand(2, 3, 32, 32)) for _ in range(2)]
    rec = record_blocks(Task(e2e), {'b4': block}, batches)['b4']
    assert rec['args'] == ((4, 4), ) and rec['x'].shape == (4, 16, 32)
    site = repl.stages[1].blocks[1]
    before, after = fit_site(
        site, rec['x'], rec['y'], steps=5, block_args=rec['args'])
    assert after <= before and after < 1
    mixed = [dict(inputs=torch.rand(2, 3, s, s)) for s in (32, 64)]
    with pytest.raises(ValueError, match='one input size'):
        record_blocks(Task(e2e), {'b4': block}, mixed)


def test_convnext_e2e_to_repl(tmp_path):
    """The converter's whole route on a tiny ConvNeXt: the blocks are
    recorded, each site fitted (fit_convnext_site), kept weights copied;
    the result loads strictly."""
    from repl_mm.datasets.writers import synthetic_images, write_cifar
    imgs, labels, classes = synthetic_images(2, img_size=32)
    write_cifar(
        str(tmp_path / 'data'), (imgs, labels), (imgs, labels), classes)
    (tmp_path / 'repl.py').write_text(
        textwrap.dedent(f"""
        _base_ = '{DEMO}'
        model = dict(
            backbone=dict(
                _delete_=True,
                type='RepLConvNeXt',
                arch=dict(depths=[2, 2, 6, 2], channels=[8, 16, 24, 32]),
                layer_scale_init_value=1.0),
            neck=None,
            head=dict(in_channels=32))
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
    torch.manual_seed(0)
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
        evaluate_metrics=False)
    assert [s.index for s in report.sites] == [4, 8]
    assert all(s.fitted_error < s.fresh_error for s in report.sites)
    repl = init_model(str(tmp_path / 'repl.py'))
    repl.load_state_dict(load_checkpoint_state(out))  # strict
    e2e_sd = e2e.state_dict()
    sites = ('backbone.stages.1.1.', 'backbone.stages.2.3.')
    for k, v in repl.state_dict().items():
        if k in e2e_sd and not k.startswith(sites):
            assert torch.equal(v, e2e_sd[k]), k
