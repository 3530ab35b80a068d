"""Mixing-weight trajectories (tools/analysis/plot_mixing.py): the reader
on hand-written ``scalars.json`` files (values and steps, resumed runs
merged by step, folders without RepL scalars ignored, clear errors), the
plot and the CLI end to end."""
import importlib.util
import json
from pathlib import Path

import pytest

from repl_mm.analysis.trajectories import (parse_scalars, plot_trajectories,
                                           read_trajectories, summary_table)

ROOT = Path(__file__).resolve().parents[2]


def write_run(work_dir: Path, stamp: str, records) -> Path:
    """``<work_dir>/<stamp>/vis_data/scalars.json``, one record a line."""
    folder = work_dir / stamp / 'vis_data'
    folder.mkdir(parents=True)
    path = folder / 'scalars.json'
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def train_line(step, site4_prev, site4_next, site8_prev=0.5):
    return {
        'lr': 0.1,
        'loss': 1.0,
        'repl_site4_phi_prev': site4_prev,
        'repl_site4_phi_next': site4_next,
        'repl_site8_phi_prev': site8_prev,
        'epoch': 1,
        'iter': step,
        'step': step
    }


def test_parse_values_and_steps(tmp_path):
    path = write_run(
        tmp_path,
        '20260101_000000',
        [
            train_line(10, 0.5, 0.5),
            train_line(20, 0.52, 0.48, 0.49),
            {
                'accuracy/top1': 90.0,
                'data_time': 0.1,
                'step': 1
            },  # val line
            {
                'train/repl_site2_alpha': 0.7,
                'repl_site2_beta': 0.25,
                'step': 30
            },  # prefixed key (MessageHub name), ViT weights
        ])
    series = parse_scalars(str(path))
    assert series == {
        (4, 'phi_prev'): {
            10: 0.5,
            20: 0.52
        },
        (4, 'phi_next'): {
            10: 0.5,
            20: 0.48
        },
        (8, 'phi_prev'): {
            10: 0.5,
            20: 0.49
        },
        (2, 'alpha'): {
            30: 0.7
        },
        (2, 'beta'): {
            30: 0.25
        },
    }


def test_resumed_run_merged_in_time_order_by_step(tmp_path):
    # written out of order on disk: the folder names give the time order
    write_run(
        tmp_path,
        '20260101_020000',
        [  # resumed from step 20
            train_line(30, 0.60, 0.40),
            train_line(40, 0.70, 0.30),
            train_line(50, 0.80, 0.20)
        ])
    write_run(
        tmp_path,
        '20260101_010000',
        [  # crashed after step 35
            train_line(10, 0.51, 0.49),
            train_line(20, 0.52, 0.48),
            train_line(30, 0.53, 0.47),
            train_line(35, 0.54, 0.46)
        ])
    # a later tools/test.py run in the same work dir: no RepL scalars
    write_run(tmp_path, '20260101_030000', [{
        'accuracy/top1': 91.0,
        'step': 5
    }])
    traj = read_trajectories(str(tmp_path))
    steps, values = traj.series[(4, 'phi_prev')]
    # 10, 20 from the first launch; 30 on from the resumed one (its 35,
    # never reached by the model that went on, is superseded)
    assert steps == [10, 20, 30, 40, 50]
    assert values == [0.51, 0.52, 0.60, 0.70, 0.80]
    assert traj.series[(4, 'phi_next')][1] == [0.49, 0.48, 0.40, 0.30, 0.20]
    assert [(Path(p).parts[-3], a, b)
            for p, a, b in traj.runs] == [('20260101_010000', 10, 35),
                                          ('20260101_020000', 30, 50)]
    # prev before next, sites in order
    assert list(traj.series) == [(4, 'phi_prev'), (4, 'phi_next'),
                                 (8, 'phi_prev')]
    table = summary_table(traj)
    assert '| 4 | phi_prev | 10 | 0.510000 | 50 | 0.800000 |' in table


def test_format_written_by_mmengine_is_read(tmp_path):
    """What mmengine's LocalVisBackend writes (as RepLLoggerHook's scalars
    reach it) parses back to the same values."""
    from mmengine.visualization import LocalVisBackend
    backend = LocalVisBackend(str(tmp_path / '20260101_000000' / 'vis_data'))
    backend.add_scalars(
        {
            'lr': 0.1,
            'repl_site3_alpha': 0.5,
            'repl_site3_beta': 0.5
        }, step=5)
    backend.add_scalars(
        {
            'lr': 0.1,
            'repl_site3_alpha': 0.625,
            'repl_site3_beta': 0.375
        },
        step=10)
    backend.close()
    traj = read_trajectories(str(tmp_path))
    assert traj.series == {
        (3, 'alpha'): ([5, 10], [0.5, 0.625]),
        (3, 'beta'): ([5, 10], [0.5, 0.375])
    }


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        read_trajectories(str(tmp_path / 'missing'))
    with pytest.raises(FileNotFoundError, match='no <timestamp>/vis_data'):
        read_trajectories(str(tmp_path))
    e2e = tmp_path / 'e2e'
    write_run(e2e, '20260101_000000', [{'loss': 1.0, 'step': 10}])
    with pytest.raises(ValueError, match='no repl_site\\* scalars'):
        read_trajectories(str(e2e))
    bad = tmp_path / 'bad'
    path = write_run(bad, '20260101_000000', [train_line(10, 0.5, 0.5)])
    with open(path, 'a') as f:
        f.write('{"repl_site4_phi_prev": 0.5, \n')
    with pytest.raises(ValueError, match='scalars.json:2: not JSON'):
        read_trajectories(str(bad))
    nostep = tmp_path / 'nostep'
    write_run(nostep, '20260101_000000', [{'repl_site4_phi_prev': 0.5}])
    with pytest.raises(ValueError, match='without an integer step'):
        read_trajectories(str(nostep))


def test_plot_written(tmp_path):
    write_run(
        tmp_path, '20260101_000000',
        [train_line(s, 0.5 + s / 1000, 0.5 - s / 1000) for s in (10, 20, 30)])
    write_run(tmp_path, '20260101_010000', [train_line(30, 0.6, 0.4)])
    out = plot_trajectories(
        read_trajectories(str(tmp_path)), str(tmp_path / 'plot.png'))
    assert Path(out).read_bytes()[:4] == b'\x89PNG'


def load_tool():
    path = ROOT / 'tools/analysis/plot_mixing.py'
    spec = importlib.util.spec_from_file_location('plot_mixing', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_end_to_end(tmp_path):
    work = tmp_path / 'work'
    write_run(work, '20260101_000000',
              [train_line(10, 0.5, 0.5),
               train_line(20, 0.55, 0.45)])
    tool = load_tool()
    out = tmp_path / 'figs' / 'mixing.png'
    traj = tool.main([str(work), '--out', str(out)])
    assert out.read_bytes()[:4] == b'\x89PNG'
    assert traj.series[(4, 'phi_prev')] == ([10, 20], [0.5, 0.55])
    tool.main([str(work)])  # default: inside the work dir
    assert (work / 'mixing_weights.png').is_file()
    with pytest.raises(SystemExit):
        tool.main([str(work), '--out', str(tmp_path / 'mixing.pdf')])
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / 'missing')])
