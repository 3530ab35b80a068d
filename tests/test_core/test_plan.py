import json

import pytest

from repl_mm.core.plan import (ReplacementConfig, ReplacementPlan, SiteRecord,
                               nearest_kept, select_sites)


def resnet_ok(stages, stage1_identity=True):
    """Replaceable flags of a ResNet: first block of a stage downsamples,
    except stage 1 when stem width == stage-1 width (Basic, CIFAR)."""
    ok = []
    for s, nb in enumerate(stages):
        for b in range(nb):
            ok.append(not (b == 0 and (s > 0 or not stage1_identity)))
    return ok


ARCHS = {
    'r18': resnet_ok((2, 2, 2, 2)),
    'r34': resnet_ok((3, 4, 6, 3)),
    'r50': resnet_ok((3, 4, 6, 3), False),
    'r101': resnet_ok((3, 4, 23, 3), False),
    'r152': resnet_ok((3, 8, 36, 3), False),
    'c20': resnet_ok((3, 3, 3)),
    'c32': resnet_ok((5, 5, 5)),
    'c110': resnet_ok((18, 18, 18)),
    'vit12': [True] * 12,
}


@pytest.mark.parametrize('arch,k,expected', [
    ('r50', 4, (5, 9, 12)),
    ('c32', 4, (4, 8, 12)),
    ('r18', 4, (4, )),
    ('vit12', 4, (4, 8)),
    ('c32', 2, (2, 4, 7, 8, 10, 12, 14)),
    ('r34', 4, (5, 9, 12)),
    ('vit12', 2, (2, 4, 6, 8, 10)),
    ('vit12', 6, (6, )),
    ('c20', 6, (6, )),
    ('r50', 6, (6, 12)),
    ('r18', 2, (2, 4, 6)),
])
def test_interval_plans(arch, k, expected):
    indices, _ = select_sites(ARCHS[arch], ReplacementConfig(interval=k))
    assert indices == expected


@pytest.mark.parametrize('arch', sorted(ARCHS))
@pytest.mark.parametrize('k', [2, 4, 6])
def test_plan_invariants(arch, k):
    ok = ARCHS[arch]
    n = len(ok)
    indices, _ = select_sites(ok, ReplacementConfig(interval=k))
    assert indices == tuple(sorted(set(indices)))
    assert all(ok[i - 1] for i in indices)
    assert n not in indices
    for i in indices:
        prev, nxt = nearest_kept(i, n, indices)
        assert nxt is not None and nxt not in indices and nxt > i
        assert prev is None or (prev not in indices and prev < i)


def test_offset_and_indices():
    assert select_sites([True] * 12,
                        ReplacementConfig(offset=1))[0] == (1, 5, 9)
    assert select_sites([True] * 12,
                        ReplacementConfig(indices=[3, 7, 11]))[0] == (3, 7, 11)
    # explicit index on a downsampling block shifts (default on_invalid)
    idx, notes = select_sites(ARCHS['r50'], ReplacementConfig(indices=[4]))
    assert idx == (5, ) and 'shifted to 5' in notes[0]


def test_on_invalid_modes():
    ok = ARCHS['r50']
    assert select_sites(ok, ReplacementConfig(on_invalid='skip'))[0] == (12, )
    with pytest.raises(ValueError, match='candidate block 4'):
        select_sites(ok, ReplacementConfig(on_invalid='error'))


def test_adjacent_sites_have_kept_neighbours():
    indices, _ = select_sites(ARCHS['c32'], ReplacementConfig(interval=2))
    assert nearest_kept(7, 15, indices) == (6, 9)
    assert nearest_kept(8, 15, indices) == (6, 9)
    assert nearest_kept(1, 12, (1, 5)) == (None, 2)


def test_shift_drops_when_nothing_left():
    ok = [True, True, True, False, True]
    idx, notes = select_sites(ok, ReplacementConfig(indices=[2, 3]))
    assert idx == (2, 3)
    ok = [True, True, True, True, False, True]
    idx, notes = select_sites(ok, ReplacementConfig(indices=[3, 4, 5]))
    assert idx == (3, 4) and 'dropped' in notes[-1]


@pytest.mark.parametrize('options,match', [
    (dict(interval=1), 'interval'),
    (dict(interval='4'), 'interval'),
    (dict(offset=4), 'offset'),
    (dict(offset=-1), 'offset'),
    (dict(mode='fold'), "mode.*'fold'"),
    (dict(neighbors='left'), "neighbors.*'left'"),
    (dict(vit_weights='qkv'), "vit_weights.*'qkv'"),
    (dict(on_invalid='ignore'), 'on_invalid'),
    (dict(num_scalars=3), 'num_scalars'),
    (dict(indices=[]), 'indices'),
    (dict(indices=[2, 2]), 'indices'),
    (dict(residual='yes'), 'residual'),
    (dict(intervall=4), 'intervall'),
])
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        ReplacementConfig.from_dict(options)


def test_invalid_indices_and_empty_plan():
    with pytest.raises(ValueError, match='indices: 12 is out of range'):
        select_sites([True] * 12, ReplacementConfig(indices=[12]))
    with pytest.raises(ValueError, match='indices: 0 is out of range'):
        select_sites([True] * 12, ReplacementConfig(indices=[0]))
    with pytest.raises(ValueError, match='leaves no site'):
        select_sites([True, False, False, True],
                     ReplacementConfig(interval=2, on_invalid='skip'))
    with pytest.raises(ValueError, match='leaves no site'):
        select_sites([True, True, True], ReplacementConfig(interval=4))


def test_plan_record_roundtrip_and_diff():
    cfg = ReplacementConfig()
    sites = [SiteRecord(4, 2, 1, 3, 5, {'conv1': ('prev', 'next')}, 10, 2)]
    plan = ReplacementPlan(cfg, 8, sites)
    d = plan.to_dict()
    assert d['indices'] == [4] and plan.indices == (4, )
    assert plan.diff(d) == []
    other = ReplacementPlan(
        ReplacementConfig(mode='drop'), 8,
        [SiteRecord(5, 2, 2, 4, 6, {}, 10, 0)]).to_dict()
    diff = plan.diff(other)
    assert any('site 4' in x for x in diff)
    assert any('site 5' in x for x in diff)
    assert any('mode' in x for x in diff)
    table = str(plan)
    assert 'conv1:prev+next' in table and '1 of 8 blocks' in table


@pytest.mark.parametrize('options,message', [
    (dict(mode=1), 'mode must be one of.*but got 1 \\(int\\)'),
    (dict(mode=None), 'mode must be one of.*None \\(NoneType\\)'),
    (dict(interval=4.0), 'interval must be an int >= 2, but got 4.0 '
     '\\(float\\)'),
    (dict(interval=True), 'interval.*True \\(bool\\)'),
    (dict(offset=True), 'offset must be an int.*True \\(bool\\)'),
    (dict(offset='0'), "offset.*'0' \\(str\\)"),
    (dict(indices='3'), "indices.*'3' \\(str\\)"),
    (dict(indices=3), 'indices.*3 \\(int\\)'),
    (dict(indices=[3.0]), 'indices.*entry 3.0 \\(float\\)'),
    (dict(indices=[2, True]), 'indices.*entry True \\(bool\\)'),
    (dict(indices=[2, None]), 'indices.*entry None \\(NoneType\\)'),
    (dict(on_invalid=0), 'on_invalid must be one of.*0 \\(int\\)'),
    (dict(neighbors=['prev']), "neighbors.*\\['prev'\\] \\(list\\)"),
    (dict(vit_weights=None), 'vit_weights.*None \\(NoneType\\)'),
    (dict(num_scalars=True), 'num_scalars must be an int \\(1 or 2\\), '
     'but got True \\(bool\\)'),
    (dict(num_scalars=2.0), 'num_scalars.*2.0 \\(float\\)'),
    (dict(num_scalars='2'), "num_scalars.*'2' \\(str\\)"),
    (dict(residual=1), 'residual must be a bool, but got 1 \\(int\\)'),
    (dict(zero_init='False'), "zero_init.*'False' \\(str\\)"),
    (dict(recompute=None), 'recompute.*None \\(NoneType\\)'),
    (dict(scale=True), 'scale must be a finite number, but got True '
     '\\(bool\\)'),
    (dict(scale='1.0'), "scale.*'1.0' \\(str\\)"),
    (dict(scale=float('inf')), 'scale.*inf \\(float\\)'),
    (dict(mode='static', static_from=1), 'static_from.*1 \\(int\\)'),
])
def test_options_of_a_wrong_type(options, message):
    with pytest.raises(ValueError, match=message):
        ReplacementConfig.from_dict(options)


def test_numbers_are_stored_plain():
    import json
    cfg = ReplacementConfig(interval=4, scale=1, indices=(3, 7))
    assert type(cfg.scale) is float and cfg.indices == (3, 7)
    json.dumps(cfg.to_dict())


CONV = {'conv1': ('prev', 'next'), 'conv2': ('prev', 'next')}
VIT = {'attn': ('prev', 'next'), 'mlp': ('prev', 'next')}


def make_plan(sources=CONV, **options):
    sites = [SiteRecord(4, 2, 1, 3, 5, dict(sources), 10, 2)]
    return ReplacementPlan(ReplacementConfig(**options), 8, sites)


# option -> (other value, [(mode, static_from, site kind)] where it must be
# compared): everywhere else it must not be.
COMPARED = {
    'residual': (False, [('synthesize', 'synthesize', CONV),
                         ('static', 'synthesize', CONV)]),
    'num_scalars': (1, [('synthesize', 'synthesize', VIT)]),
    'vit_weights': ('attn', [('synthesize', 'synthesize', VIT),
                             ('static', 'synthesize', VIT)]),
    'neighbors':
    ('prev', [(m, f, k)
              for m, f in (('synthesize', 'synthesize'), ('interpolate',
                                                          'synthesize'),
                           ('static', 'synthesize'), ('static', 'interpolate'))
              for k in (CONV, VIT)]),
    'static_from': ('interpolate', [('static', f, k)
                                    for f in ('synthesize', 'interpolate')
                                    for k in (CONV, VIT)]),
    'zero_init': (False, []),
    'recompute': (False, []),
    'interval': (2, []),  # through the sites only
    'offset': (1, []),
    'indices': ([4], []),
    'on_invalid': ('skip', []),
    'scale': (0.0, []),  # a warning, see below
}
CONTEXTS = [(m, f, k)
            for m, f in (('synthesize', 'synthesize'), ('interpolate',
                                                        'synthesize'),
                         ('drop', 'synthesize'), ('none', 'synthesize'),
                         ('static', 'synthesize'), ('static', 'interpolate'))
            for k in (CONV, VIT)]


@pytest.mark.parametrize('option', sorted(COMPARED))
@pytest.mark.parametrize(
    'mode,static_from,kind',
    CONTEXTS,
    ids=[f"{m}-{f}-{'conv' if k is CONV else 'vit'}" for m, f, k in CONTEXTS])
def test_equality_agrees_with_diff(option, mode, static_from, kind):
    value, where = COMPARED[option]
    base = dict(mode=mode, static_from=static_from)
    if option == 'static_from' and mode != 'static':
        return  # static_from applies to mode='static' only
    if option == 'static_from' and static_from == value:
        value = 'synthesize'
    a = make_plan(kind, **base)
    b = make_plan(kind, **{**base, option: value})
    differences = a.diff(b.to_dict())
    warnings = a.load_warnings(b.to_dict())
    compared = (mode, static_from, kind) in where
    assert bool(differences) == compared
    assert all(option in d for d in differences)
    assert bool(warnings) == (option == 'scale' and mode == 'synthesize')
    # == is "neither a difference nor a warning", both ways
    assert (a == b) == (not differences and not warnings)
    assert (a == b) == (b == a)
    assert bool(b.diff(a.to_dict())) == bool(differences)
    if a == b:
        assert hash(a) == hash(b)


def test_scale_is_a_warning_not_a_difference():
    a, b = make_plan(), make_plan(scale=0.0)
    assert a.diff(b.to_dict()) == []
    (warning, ) = a.load_warnings(b.to_dict())
    assert 'scale: checkpoint 0.0, model 1.0' in warning
    assert a != b  # equal plans describe one function
    assert make_plan(mode='drop') == make_plan(mode='drop', scale=0.0)


def test_sites_and_modes_make_plans_differ():
    a = make_plan()
    assert a == make_plan() and a != make_plan(mode='drop')
    other = ReplacementPlan(a.config, 8,
                            [SiteRecord(5, 2, 2, 4, 6, CONV, 10, 2)])
    assert a != other and a.diff(other.to_dict())
    assert a != make_plan(sources={'conv1': ('prev', ), 'conv2': ('own', )})


@pytest.mark.parametrize('option,value', [
    ('residual', False),
    ('num_scalars', 1),
    ('vit_weights', 'mlp'),
    ('neighbors', 'next'),
    ('scale', 0.5),
    ('static_from', 'interpolate'),
])
def test_recorded_plan_without_an_option_holds_its_default(option, value):
    kind = CONV if option == 'residual' else VIT
    mode = 'static' if option == 'static_from' else 'synthesize'
    old = make_plan(kind, mode=mode).to_dict()
    del old['config'][option]  # a plan written before the option existed
    model = make_plan(kind, mode=mode)
    assert model.diff(old) == [] and model.load_warnings(old) == []
    changed = make_plan(kind, mode=mode, **{option: value})
    assert changed.diff(old) or changed.load_warnings(old)


def test_block_kinds_are_their_strings():
    from repl_mm.core import BlockKind
    assert [k.value for k in BlockKind] == ['conv', 'transformer', 'convnext']
    assert BlockKind.CONV == 'conv' and f'{BlockKind.TRANSFORMER}' == \
        'transformer'
    assert json.dumps(BlockKind.CONV) == '"conv"'


def test_every_mode_builds_every_kind():
    from repl_mm.core import MODES, BlockKind
    from repl_mm.core.surgery import BUILDERS
    assert set(BUILDERS) == set(MODES)
    assert all(set(b) == set(BlockKind) for b in BUILDERS.values())


def test_replace_blocks_checks_kind_and_descriptions():
    import torch
    from torch import nn

    from repl_mm.core import BlockSlot, ConvBlock, replace_blocks

    class Block(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.norm1 = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.norm1(self.conv1(x)) + x)

    def describe(b):
        return ConvBlock(convs=[b.conv1], norm=b.norm1, act=b.relu)

    def blocks():
        seq = nn.Sequential(*[Block() for _ in range(4)])
        return seq, [BlockSlot(seq, i, 1, i + 1, True) for i in range(4)]

    with pytest.raises(ValueError, match="kind must be one of .*'mlp'"):
        replace_blocks(blocks()[1], None, 'mlp', describe)
    with pytest.raises(TypeError, match='needs a TransformerBlock'):
        replace_blocks(blocks()[1], dict(interval=2), 'transformer', describe)
    with pytest.raises(TypeError, match='describe returned a dict'):
        replace_blocks(blocks()[1], dict(interval=2), 'conv', lambda b: {})
    seq, slots = blocks()
    plan = replace_blocks(slots, dict(interval=2), 'conv', describe)
    assert plan.indices == (2, )
    x = torch.randn(2, 4, 8, 8)
    assert seq(x).shape == x.shape
