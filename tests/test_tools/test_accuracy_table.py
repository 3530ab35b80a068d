"""The accuracy tables of docs/results.md and the README's main job: each
table's smoke runs end to end on tiny data (what CI can afford), the
summary arithmetic is right, and ``tools/demo.py`` prints its table."""
import importlib.util
import json

import pytest

from repl_mm.analysis.experiments import (Run, Table, mean_std, run_table,
                                          summarize)
from .test_cls_pipeline import ROOT, data, run  # noqa: F401 (fixture)

TOOL = ROOT / 'tools' / 'analysis' / 'accuracy_table.py'


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('accuracy_table', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_std_and_summary():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    table = Table('t', 'T', 'acc', [
        Run('r', 'a', 'c.py', 0),
        Run('r', 'a', 'c.py', 1),
        Run('r', 'b', 'c.py', 0)
    ])
    res = [
        dict(
            row=r.row,
            column=r.column,
            metrics={'acc': v},
            params=10,
            seconds=2.0) for r, v in zip(table.runs, (90.0, 94.0, 50.0))
    ]
    out = summarize(table, res)
    assert out['r']['a']['mean'] == 92.0 and out['r']['a']['n'] == 2
    assert out['r']['a']['std'] == pytest.approx(2**0.5 * 2)
    assert out['r']['b']['values'] == [50.0]
    res[2]['metrics'] = {'other': 1.0}
    with pytest.raises(KeyError, match="no metric 'acc'"):
        summarize(table, res)
    with pytest.raises(ValueError, match='repeat'):
        Table('t', 'T', 'acc', [Run('r', 'a', 'c.py'), Run('r', 'a', 'c.py')])


def test_resume_reuses_only_results_of_the_same_settings(tmp_path):
    config = str(ROOT / 'configs/demo/resnet32-repl_1xb64_15e_digits.py')
    table = Table('t', 'T', 'acc',
                  [Run('r', 'a', config, 0),
                   Run('r', 'a', config, 1)])
    calls = []

    def trainer(run, work_dir, extra, keep):
        calls.append((run.seed, dict(extra or {})))
        return dict(
            row=run.row,
            column=run.column,
            seed=run.seed,
            metrics={'acc': float(len(calls))},
            params=1,
            seconds=0.0)

    short = {'train_cfg.max_epochs': 1}
    first = run_table(table, str(tmp_path), short, trainer=trainer)
    assert [c[0] for c in calls] == [0, 1]
    # same settings: read back, not run again
    assert run_table(table, str(tmp_path), short, trainer=trainer) == first
    assert len(calls) == 2
    # other settings (here the budget): both run again, the old results
    # are kept aside and never read
    second = run_table(table, str(tmp_path), None, trainer=trainer)
    assert calls[2:] == [(0, {}), (1, {})]
    assert [r['metrics']['acc'] for r in second] == [3.0, 4.0]
    runs = tmp_path / 'runs'
    assert len(list(runs.glob('*.json'))) == 2
    stale = sorted(runs.glob('*.json.stale-*'))
    assert [json.loads(p.read_text())['metrics']['acc']
            for p in stale] == [1.0, 2.0]
    # another seed is another run (and another fingerprint)
    fps = {r['fingerprint'] for r in second}
    assert len(fps) == 2


SMOKE_RUNS = {'main-r32': 3, 'main-vit': 3, 'ablations': 12}


@pytest.mark.parametrize('name', sorted(SMOKE_RUNS))
def test_table_smoke(tool, data, tmp_path, name):  # noqa: F811 (fixture)
    table = tool.TABLES[name]()
    opts = [
        f'{k}.dataset.data_root={data}'
        for k in ('train_dataloader', 'test_dataloader')
    ]
    argv = [
        name, '--smoke', '--out-dir',
        str(tmp_path), '--cfg-options', *opts,
        'train_dataloader.dataset.fraction=1.0'
    ]
    run(str(TOOL), *argv)  # a process of its own, as a user runs it
    out = tmp_path / f'{name}-smoke'  # never beside measured tables
    assert not (tmp_path / name).exists()
    runs = sorted((out / 'runs').glob('*.json'))
    # one run per distinct model: the regimes of a main table differ only
    # in the budget, which the smoke replaces
    assert len(runs) == SMOKE_RUNS[name]
    for path in runs:
        res = json.loads(path.read_text())
        assert 0.0 <= res['metrics']['accuracy/top1'] <= 100.0
        assert res['params'] > 0
    md = (out / 'table.md').read_text()
    for col in table.columns:
        assert col in md
    assert not (tmp_path / 'accuracies.json').exists()  # smoke: no numbers
    # a second call reads the finished runs back instead of training again
    mtimes = [p.stat().st_mtime_ns for p in runs]
    run(str(TOOL), *argv)
    assert [p.stat().st_mtime_ns for p in runs] == mtimes


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    for kind in ('coco-shapes', 'cityscapes-shapes'):
        run('tools/dataset_converters/make_datasets.py', kind, '--out',
            str(root / kind), '--num-train', '4', '--num-val', '4')
    return root


@pytest.mark.parametrize('name,kind,metric', [
    ('shapes-det', 'coco-shapes', 'coco/bbox_mAP'),
    ('shapes-seg', 'cityscapes-shapes', 'mIoU'),
])
def test_shapes_table_smoke(shapes, tmp_path, name, kind, metric):
    root = shapes / kind
    opts = [
        f'{k}.dataset.data_root={root}/'
        for k in ('train_dataloader', 'test_dataloader')
    ]
    if name == 'shapes-det':
        opts.append('test_evaluator.ann_file='
                    f'{root}/annotations/instances_val2017.json')
    run(
        str(TOOL), name, '--smoke', '--out-dir', str(tmp_path),
        '--cfg-options', *opts)
    runs = sorted((tmp_path / f'{name}-smoke' / 'runs').glob('*.json'))
    assert [json.loads(p.read_text())['column']
            for p in runs] == ['E2E', 'RepL (k=4)']
    for path in runs:
        assert metric in json.loads(path.read_text())['metrics']


def test_demo_prints_one_table(data, tmp_path):  # noqa: F811 (fixture)
    out = run('tools/demo.py', '--epochs', '1', '--data-root',
              str(data), '--batch-size', '4', '--repeats', '1', '--out-dir',
              str(tmp_path))
    md = (tmp_path / 'demo.md').read_text()
    assert md in out.stdout + out.stderr
    rows = [
        line for line in md.splitlines()
        if line.startswith('| E2E') or line.startswith('| RepL')
    ]
    assert len(rows) == 2
    assert rows[0].count('(1.000)') == 5  # E2E against itself
    for name in ('ratios.png', 'accuracy_memory.png', 'benchmark.json'):
        assert (tmp_path / name).is_file()
    acc = json.loads((tmp_path / 'demo.json').read_text())['accuracy']
    assert set(acc) == {'e2e', 'repl'}
