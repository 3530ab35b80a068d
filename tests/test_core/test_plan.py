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
    assert select_sites([True] * 12, ReplacementConfig(
        indices=[3, 7, 11]))[0] == (3, 7, 11)
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
        select_sites([True, False, False, True], ReplacementConfig(
            interval=2, on_invalid='skip'))
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
