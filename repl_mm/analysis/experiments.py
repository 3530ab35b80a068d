"""Accuracy tables: train and test many short runs of our configs, in one
process, and summarise them (the tables of docs/results.md).

A :class:`Table` is a list of :class:`Run` s (a config, a seed and
``--cfg-options``-style overrides) laid out as rows x columns. Each run is
trained with the same runner as ``tools/train.py`` (:func:`train_and_test`)
and tested with its test loop; its result is written to
``<out_dir>/runs/<slug>.json`` as soon as it finishes, so an interrupted
table continues where it stopped. Each result carries the fingerprint of
the run's settings (:func:`run_fingerprint`): a result measured with other
settings (an edited config, other overrides) is set aside, not reused.
The tables themselves (which configs, seeds and budgets) are defined in
``tools/analysis/accuracy_table.py``.
"""
import hashlib
import json
import logging
import os
import os.path as osp
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from mmengine.config import Config
from mmengine.logging import print_log


@dataclass(frozen=True)
class Run:
    """One training run of a table.

    Args:
        row (str): Row label (e.g. the backbone and data).
        column (str): Column label (e.g. the method).
        config (str): Config file.
        seed (int): ``randomness.seed``.
        options (dict): ``--cfg-options`` style overrides (dotted keys).
    """

    row: str
    column: str
    config: str
    seed: int = 0
    options: Dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """File-system name of the run, unique within a table."""
        text = f'{self.row}__{self.column}__seed{self.seed}'
        return re.sub(r'[^A-Za-z0-9_.]+', '-', text).strip('-')


@dataclass
class Table:
    """A named grid of runs and how to read their results.

    Args:
        name (str): Identifier (the script's argument).
        title (str): Heading of the markdown table.
        metric (str): Key of the test metric (``accuracy/top1``,
            ``coco/bbox_mAP``, ``mIoU``).
        runs (list[Run]): The runs.
        notes (str): What the table measures, printed under it.
        smoke (dict): Overrides that make every run seconds long (CI).
    """

    name: str
    title: str
    metric: str
    runs: List[Run]
    notes: str = ''
    smoke: Dict = field(default_factory=dict)

    def __post_init__(self):
        slugs = [r.slug for r in self.runs]
        dup = sorted({s for s in slugs if slugs.count(s) > 1})
        if dup:
            raise ValueError(f'table {self.name}: runs {dup} repeat')

    @property
    def rows(self) -> List[str]:
        return list(dict.fromkeys(r.row for r in self.runs))

    @property
    def columns(self) -> List[str]:
        return list(dict.fromkeys(r.column for r in self.runs))


# mmengine validates after the last epoch whatever val_interval says
NO_VAL = {'val_dataloader': None, 'val_cfg': None, 'val_evaluator': None}


def cls_budget(epochs: int, fraction: float = 1.0) -> dict:
    """Overrides for the demo classification configs (configs/demo/, an
    epoch-based cosine ``param_scheduler``): train ``epochs`` (cosine over
    them) on ``fraction`` of the training split, no validation loop (the
    test loop runs once at the end), one checkpoint at the end."""
    return {
        'train_cfg.max_epochs': epochs,
        **NO_VAL,
        'param_scheduler.T_max': epochs,
        'train_dataloader.dataset.fraction': fraction,
        'default_hooks.checkpoint.interval': epochs,
        'default_hooks.checkpoint.max_keep_ckpts': 1,
        'default_hooks.logger.interval': 10,
    }


def load_run_config(run: Run,
                    work_dir: str,
                    extra: Optional[dict] = None) -> Config:
    """The run's config: file, overrides, seed, work dir, and a unique
    experiment name (several runners live in one process)."""
    cfg = Config.fromfile(run.config)
    cfg.merge_from_dict(dict(run.options, **(extra or {})))
    cfg.work_dir = work_dir
    cfg.launcher = 'none'
    cfg.randomness = dict(seed=run.seed, deterministic=False)
    cfg.experiment_name = f'{run.slug}_{time.strftime("%Y%m%d_%H%M%S")}'
    return cfg


def run_fingerprint(run: Run, extra: Optional[dict] = None) -> str:
    """SHA-256 of what a run's result depends on: its config as loaded
    (inherited files, ``run.options`` and ``extra`` merged in) and its
    seed. Work dir and experiment name, which differ per launch, are left
    out."""
    cfg = load_run_config(run, '', extra).to_dict()
    for key in ('work_dir', 'experiment_name', 'launcher'):
        cfg.pop(key, None)
    text = json.dumps(cfg, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_and_test(run: Run,
                   work_dir: str,
                   extra: Optional[dict] = None,
                   keep_checkpoint: bool = True) -> dict:
    """Train ``run`` with the runner of ``tools/train.py``, then test the
    final model with the config's test loop.

    Args:
        run (Run): The run.
        work_dir (str): Its work dir (logs, final checkpoint).
        extra (dict, optional): More overrides (e.g. the smoke budget).
        keep_checkpoint (bool): Keep the ``.pth`` files. Defaults to True.

    Returns:
        dict: ``metrics`` (all test metrics), ``params``, ``seconds``
        (training and testing wall time) and the run's fields.
    """
    from ..engine.runner import build_runner  # registers our modules
    cfg = load_run_config(run, work_dir, extra)
    t0 = time.perf_counter()
    runner = build_runner(cfg, train=True)
    runner.train()
    train_seconds = time.perf_counter() - t0
    metrics = runner.test()
    seconds = time.perf_counter() - t0
    params = count_params(runner.model)
    if not keep_checkpoint:
        for name in os.listdir(work_dir):
            if name.endswith('.pth'):
                os.remove(osp.join(work_dir, name))
    return dict(
        row=run.row,
        column=run.column,
        config=run.config,
        seed=run.seed,
        options=run.options,
        metrics={
            k: float(v)
            for k, v in metrics.items()
        },
        params=params,
        train_seconds=train_seconds,
        seconds=seconds,
        load=os.getloadavg())


def run_table(table: Table,
              out_dir: str,
              extra: Optional[dict] = None,
              keep_checkpoint: Callable[[Run], bool] = lambda r: True,
              trainer: Callable = train_and_test) -> List[dict]:
    """Run every run of ``table`` not finished yet under ``out_dir``.

    Results go to ``<out_dir>/runs/<slug>.json`` one by one; a run whose
    file exists with the run's :func:`run_fingerprint` is read back, not
    run again (delete the file to redo it). A file with another (or no)
    fingerprint was measured with other settings: it is renamed to
    ``<slug>.json.stale-<time>`` (kept, never read) and the run runs.
    ``extra`` overrides apply to every run (e.g. ``table.smoke``).

    Returns:
        list[dict]: The results of all runs, in table order.
    """
    runs_dir = osp.join(out_dir, 'runs')
    os.makedirs(runs_dir, exist_ok=True)
    results = []
    for i, run in enumerate(table.runs, 1):
        path = osp.join(runs_dir, f'{run.slug}.json')
        fingerprint = run_fingerprint(run, extra)
        if osp.isfile(path):
            with open(path) as f:
                res = json.load(f)
            if res.get('fingerprint') == fingerprint:
                results.append(res)
                continue
            stale = f'{path}.stale-{time.strftime("%Y%m%d_%H%M%S")}'
            os.replace(path, stale)
            print_log(
                f'[{table.name}] {run.slug}: the result on file was '
                'measured with other settings; kept as '
                f'{osp.basename(stale)}, running again',
                logger='current',
                level=logging.WARNING)
        print_log(
            f'[{table.name}] ({i}/{len(table.runs)}) {run.row} | '
            f'{run.column} | seed {run.seed}',
            logger='current')
        work_dir = osp.join(out_dir, 'work', run.slug)
        if osp.isdir(work_dir):
            shutil.rmtree(work_dir)  # a run killed half way starts over
        res = trainer(run, work_dir, extra, keep_checkpoint(run))
        res.update(work_dir=work_dir, fingerprint=fingerprint)
        with open(path + '.tmp', 'w') as f:
            json.dump(res, f, indent=1)
        os.replace(path + '.tmp', path)
        print_log(
            f'[{table.name}] {run.slug}: {table.metric} = '
            f'{res["metrics"].get(table.metric)} '
            f'({res["seconds"]:.0f} s)',
            logger='current')
        results.append(res)
    return results


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    if not values:
        raise ValueError('mean_std of no values')
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def summarize(table: Table, results: Sequence[dict]) -> Dict[str, dict]:
    """``{row: {column: dict(mean, std, n, values, params, seconds)}}``."""
    out: Dict[str, dict] = {}
    for res in results:
        value = res['metrics'].get(table.metric)
        if value is None:
            raise KeyError(f'table {table.name}: run {res["row"]} | '
                           f'{res["column"]} has no metric {table.metric!r} '
                           f'(it has {sorted(res["metrics"])})')
        cell = out.setdefault(res['row'], {}).setdefault(
            res['column'], dict(values=[], params=res['params'], seconds=[]))
        cell['values'].append(value)
        cell['seconds'].append(res['seconds'])
    for row in out.values():
        for cell in row.values():
            cell['mean'], cell['std'] = mean_std(cell['values'])
            cell['n'] = len(cell['values'])
            cell['seconds'] = statistics.fmean(cell['seconds'])
    return out


def _grid(table: Table, summary: Dict[str, dict], fmt) -> List[str]:
    """Markdown rows x columns, each cell ``fmt(cell)`` (blank if none)."""
    cols = table.columns
    lines = ['| | ' + ' | '.join(cols) + ' |', '|---|' + '---|' * len(cols)]
    for row in table.rows:
        cells = [summary.get(row, {}).get(c) for c in cols]
        lines.append(f'| {row} | ' +
                     ' | '.join('' if cell is None else fmt(cell)
                                for cell in cells) + ' |')
    return lines


def to_markdown(table: Table,
                summary: Dict[str, dict],
                digits: int = 2) -> str:
    """The rows x columns grid as ``mean ± std (n)``, then parameters and
    mean run time per cell."""

    def metric(cell):
        if cell['n'] == 1:
            return f'{cell["mean"]:.{digits}f}'
        return (f'{cell["mean"]:.{digits}f} ± {cell["std"]:.{digits}f} '
                f'(n={cell["n"]})')

    lines = [
        f'### {table.title}', '', *_grid(table, summary, metric), '',
        f'{table.metric}; mean ± sample std over seeds. '
        'Parameters / mean wall time per run:', '', *_grid(
            table, summary, lambda c: f'{c["params"] / 1e6:.3f} M / '
            f'{c["seconds"]:.0f} s')
    ]
    if table.notes:
        lines += ['', table.notes]
    return '\n'.join(lines) + '\n'


__all__ = [
    'NO_VAL', 'cls_budget', 'Run', 'Table', 'load_run_config',
    'run_fingerprint', 'train_and_test', 'run_table', 'mean_std', 'summarize',
    'to_markdown', 'count_params'
]
