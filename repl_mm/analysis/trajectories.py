"""Trajectories of the sites' mixing weights over a training run.

``RepLLoggerHook`` logs, every logging interval, one scalar per site and
mixing weight, ``repl_site{i}_{name}``: ``phi_prev`` / ``phi_next`` (the
mean phi per neighbour of a CNN site, spec §3) or ``alpha`` / ``beta`` (ViT
and interpolated sites, spec §4). mmengine's ``LocalVisBackend`` writes them
to ``<work_dir>/<timestamp>/vis_data/scalars.json``, one JSON object per
line with its iteration in ``step``.

A work dir holds one timestamp folder per launch. Folders are read in time
order (their names are ``YYYYMMDD_HHMMSS``); a later launch supersedes the
earlier ones from its first logged step on. A resumed run (which re-logs
from its checkpoint's iteration) and a restart from scratch in the same
work dir thus both give one trajectory, de-duplicated by step. Folders
without RepL scalars (``tools/test.py`` runs) are ignored.

Only the standard library is imported here; matplotlib when plotting.
"""
import glob
import json
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

# ``train/`` is the MessageHub prefix (mmengine strips it in the file)
KEY = re.compile(r'^(?:train/)?repl_site(\d+)_(\w+)$')

Series = Dict[Tuple[int, str], Dict[int, float]]  # (site, name) -> {step: v}

# line style per weight: the prev neighbour's solid, the next one's dashed
STYLES = {'phi_prev': '-', 'alpha': '-', 'phi_next': '--', 'beta': '--'}


@dataclass
class Trajectories:
    """Mixing-weight trajectories of one work dir.

    Attributes:
        series (dict): ``(site index, name) -> (steps, values)``, steps
            increasing.
        runs (list): ``(scalars.json path, first step, last step)`` of each
            launch that logged RepL scalars, in time order.
    """
    series: Dict[Tuple[int, str], Tuple[List[int], List[float]]]
    runs: List[Tuple[str, int, int]] = field(default_factory=list)


def parse_scalars(path: str) -> Series:
    """The ``repl_site*`` scalars of one ``scalars.json``.

    Args:
        path (str): A ``vis_data/scalars.json`` (one JSON object per line).

    Returns:
        dict: ``(site, name) -> {step: value}``; empty if the file has no
        RepL scalar.

    Raises:
        ValueError: On a line that is not a JSON object, or a RepL scalar
            without an integer ``step`` (or ``iter``).
    """
    out: Series = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}:{lineno}: not JSON ({e})') from e
            if not isinstance(record, dict):
                raise ValueError(f'{path}:{lineno}: expected a JSON object, '
                                 f'got {type(record).__name__}')
            matches = [(KEY.match(k), v) for k, v in record.items()]
            matches = [(m, v) for m, v in matches if m]
            if not matches:
                continue
            step = record.get('step', record.get('iter'))
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f'{path}:{lineno}: RepL scalars without an '
                                 f'integer step, got step={step!r}')
            for m, value in matches:
                out.setdefault((int(m.group(1)), m.group(2)),
                               {})[step] = float(value)
    return out


def scalar_files(work_dir: str) -> List[str]:
    """The ``scalars.json`` files of ``work_dir`` in time order (sorted
    timestamp folder names); ``work_dir`` may also be one timestamp folder
    or the file itself."""
    if osp.isfile(work_dir):
        return [work_dir]
    if not osp.isdir(work_dir):
        raise FileNotFoundError(f'work dir {work_dir!r} does not exist')
    files = sorted(
        glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    own = osp.join(work_dir, 'vis_data', 'scalars.json')
    if osp.isfile(own):
        files.append(own)
    if not files:
        raise FileNotFoundError(
            f'no <timestamp>/vis_data/scalars.json under {work_dir!r}: is '
            'it the work dir of an mmengine training run?')
    return files


def read_trajectories(work_dir: str) -> Trajectories:
    """The merged mixing-weight trajectories of a work dir (module
    docstring: order, resumed runs).

    Raises:
        FileNotFoundError: If ``work_dir`` has no ``scalars.json``.
        ValueError: If none of them holds a ``repl_site*`` scalar.
    """
    files = scalar_files(work_dir)
    merged: Series = {}
    runs = []
    for path in files:
        series = parse_scalars(path)
        if not series:
            continue
        first = min(min(s) for s in series.values())
        last = max(max(s) for s in series.values())
        for key, points in merged.items():  # superseded from `first` on
            merged[key] = {s: v for s, v in points.items() if s < first}
        for key, points in series.items():
            merged.setdefault(key, {}).update(points)
        runs.append((path, first, last))
    if not runs:
        raise ValueError(
            f'no repl_site* scalars in {files}: was {work_dir!r} trained '
            'with a RepL backbone (mode synthesize or interpolate) and '
            'RepLLoggerHook (tools/train.py adds it)?')
    return Trajectories(
        series={
            key: ([s for s in sorted(p)], [p[s] for s in sorted(p)])
            for key, p in sorted(merged.items(), key=_order) if p
        },
        runs=runs)


def _order(item) -> tuple:
    (site, name), _ = item
    return site, list(STYLES).index(name) if name in STYLES else 9, name


def summary_table(traj: Trajectories) -> str:
    """Markdown: per (site, name), the first and last logged values."""
    lines = [
        '| site | weight | first step | first | last step | last |',
        '|---|---|---|---|---|---|'
    ]
    for (site, name), (steps, values) in traj.series.items():
        lines.append(f'| {site} | {name} | {steps[0]} | {values[0]:.6f} | '
                     f'{steps[-1]} | {values[-1]:.6f} |')
    return '\n'.join(lines) + '\n'


def plot_trajectories(traj: Trajectories, path: str, title: str = '') -> str:
    """One line per (site, name) against the iteration, into ``path``:
    a colour per site, a line style per weight; dotted verticals mark where
    a later launch took over."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    sites = sorted({s for s, _ in traj.series})
    colors = {s: f'C{k % 10}' for k, s in enumerate(sites)}
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for (site, name), (steps, values) in traj.series.items():
        ax.plot(
            steps,
            values,
            color=colors[site],
            linestyle=STYLES.get(name, ':'),
            label=f'site {site} {name}')
    for _, first, _ in traj.runs[1:]:
        ax.axvline(first, color='grey', linestyle=':', linewidth=1)
    ax.set_xlabel('iteration')
    ax.set_ylabel('mixing weight')
    ax.set_title(title or 'RepL mixing weights')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', ncol=max(1, len(sites) // 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
