"""Rendering of the benchmark's results: markdown tables, plots, the
record of the machine, and the output files.

Nothing here measures: every function reads a results dict (as
:func:`repl_mm.analysis.benchmark.run_case` returns it and
``benchmark.json`` stores it), so a finished run renders again. Step
times taken on a loaded machine (``load`` of a case:
:func:`repl_mm.analysis.profiling.load_record`) are marked
``unreliable`` wherever a time or a figure derived from it is printed
(:func:`time_ratio_text`).

matplotlib is imported by the plots only.
"""
import functools
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

MB = 2.0**20


def _fmt(v, spec='.3f'):
    return '-' if v is None else format(v, spec)


# -- load marks ------------------------------------------------------------
def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def load_note(load: Optional[dict]) -> str:
    """``'unreliable: load 3.1 > 2 threads'`` for a timing taken on a
    loaded machine, else ``''`` (also for results without a load
    record)."""
    if not load or load.get('reliable') is not False:
        return ''
    return f"unreliable: load {load['max']:.1f} > {_threads(load['threads'])}"


def time_ratio_text(value: float,
                    load: Optional[dict] = None,
                    spec: str = '.2f',
                    unit: str = ' x E2E') -> str:
    """A time ratio for a printout: ``'1.08 x E2E'``, or ``'1.08 x E2E
    (unreliable: load 3.1 > 2 threads)'`` when the timing is unreliable.

    Example:
        >>> time_ratio_text(1.08, dict(reliable=False, max=3.1, threads=2))
        '1.08 x E2E (unreliable: load 3.1 > 2 threads)'
    """
    note = load_note(load)
    text = f'{value:{spec}}{unit}'
    return f'{text} ({note})' if note else text


def _load_line(load: Optional[dict], marked: str) -> List[str]:
    """The paragraph under a table heading that says why its ``marked``
    columns are marked."""
    note = load_note(load)
    if not note:
        return []
    return [
        f"Step times {note} (load average {_fmt(load['before'], '.1f')} "
        f"before, {_fmt(load['after'], '.1f')} after the timing, "
        f"{_threads(load['threads'])} of torch): {marked} are marked "
        '"(unreliable)".', ''
    ]


def _reference_free(method: str, load: Optional[dict]) -> Optional[dict]:
    """``load`` for a method's row, None for E2E's: its ratio is 1 and its
    S is 0 by construction, whatever the load."""
    return None if method == 'e2e' else load


def _mark(text: str, load: Optional[dict]) -> str:
    return f'{text} (unreliable)' if load_note(load) and text != '-' else text


# -- markdown --------------------------------------------------------------
def _method_rows(methods: Dict[str, dict], load: Optional[dict]) -> list:
    rows = []
    for m, r in methods.items():
        tr, f = r['time_ratio'], r['flops']
        mark = _reference_free(m, load)
        rows.append(
            f"| {m} | {r['sites'] or '-'} | {r['params'] / 1e6:.2f} | "
            f"{f['step'] / 1e9:.2f} | {f['synthesis_step'] / 1e9:.4f} | "
            f"{r['saved_bytes'] / MB:.1f} | {r['mem_ratio']:.3f} | "
            f"{r['synthesis_kept_bytes'] / MB:.1f} | "
            f"{r['peak_bytes'] / MB:.1f} | {r['peak_ratio']:.3f} | "
            f"{r['time_ms']['median']:.0f} | " + _mark(
                f"{tr['median']:.3f} [{tr['q1']:.3f}, {tr['q3']:.3f}]", mark) +
            ' | ' + ' | '.join(
                [_fmt(r[k])
                 for k in ('S_mem', 'S_mem_large_batch', 'S_peak')] +
                [_mark(_fmt(r['S_time']), mark),
                 _fmt(r['S_flops'])]) + ' |')
    return rows


def _compiled_rows(methods: Dict[str, dict], load: Optional[dict]) -> list:
    rows = []
    for m, r in methods.items():
        if r.get('failed'):
            why = r['failed'].replace('|', '\\|')
            rows.append(f'| {m} | failed: {why} |' + ' - |' * 8)
            continue
        tr, mark = r['time_ratio'], _reference_free(m, load)
        ratio = '-' if tr is None else _mark(
            f"{tr['median']:.3f} [{tr['q1']:.3f}, {tr['q3']:.3f}]", mark)
        rows.append(f"| {m} | {r['compile_seconds']:.1f} | "
                    f"{r['saved_bytes'] / MB:.1f} | {_fmt(r['mem_ratio'])} | "
                    f"{r['peak_bytes'] / MB:.1f} | {_fmt(r['peak_ratio'])} | "
                    f"{r['time_ms']['median']:.0f} | {ratio} | "
                    f"{_mark(_fmt(r['S_time']), mark)} | {_fmt(r['S_mem'])} |")
    return rows


def to_markdown(results: dict) -> str:
    """One table per case (and one for its compiled variants, if any),
    then the targets table."""
    lines = []
    for c in results['cases']:
        h, w = c['input_size']
        on = '' if c.get('device', 'cpu') == 'cpu' else f", on {c['device']}"
        load = c.get('load')
        lines += [
            f"### {c['name']}: {c['backbone']}, batch {c['batch_size']} x "
            f'3x{h}x{w}, {c["repeats"]} trials{on}', ''
        ] + _load_line(load, 'the time ratios and S_time') + [
            '| method | sites | params (M) | GFLOPs/step | synth. GFLOPs/'
            'step | act. mem (MB) | x E2E | of it synth. (MB) | peak (MB) | '
            'x E2E | step (ms) | time x E2E [IQR] | S_mem | S_mem B->inf | '
            'S_peak | S_time | S_flops |', '|---' * 17 + '|'
        ]
        lines += _method_rows(c['methods'], load)
        lines.append('')
        comp = c.get('compiled')
        if comp:
            lines += [
                f"#### {c['name']}, compiled (torch.compile, backend "
                f"{comp['backend']}; ratios and S against compiled E2E and "
                'compiled drop)', '',
                '| method | compile + warm-up (s) | act. mem (MB) | x E2E | '
                'peak (MB) | x E2E | step (ms) | time x E2E [IQR] | S_time | '
                'S_mem |', '|---' * 10 + '|'
            ]
            lines += _compiled_rows(comp['methods'], load)
            lines.append('')
    if results.get('targets'):
        lines += [
            '### Targets', '', '| case | target | value | met |',
            '|---|---|---|---|'
        ]
        for t in results['targets']:
            met = 'yes' if t['met'] else 'no'
            if t.get('reliable') is False:
                met += ' (unreliable)'
            lines.append(f"| {t['case']} | {t['target']} | "
                         f"{t['value']:.3f} | {met} |")
        lines.append('')
    return '\n'.join(lines)


def blocks_markdown(result: dict) -> str:
    """The single-block table of :func:`repl_mm.analysis.blocks.
    measure_blocks`: per site, the site's fwd+bwd time, training FLOPs and
    saved bytes over those of the block it replaces, for each option."""
    opts = result['options']
    load = result.get('load')
    backend = result.get('compile_backend')
    how = f', compiled ({backend})' if backend else ''
    lines = [
        f"### {result['name']}: {result['backbone']}, single blocks{how}, "
        f"{result['repeats']} trials (zero_init=False)", ''
    ] + _load_line(load, 'the time ratios')
    head = ['block', 'shape', 'block fwd+bwd (ms)']
    head += [f'site/block time ({o})' for o in opts]
    head += [f'FLOPs site/block ({o})' for o in opts]
    head += [f'bytes site/block ({o})' for o in opts]
    lines += ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for r in result['rows']:
        cells = [
            f"{r['index']} ({r['name']})", 'x'.join(map(str, r['shape'])),
            f"{r['block']['time_ms']['median']:.2f}"
        ]
        cells += [
            _mark(
                f"{r['sites'][o]['time_ratio']['median']:.3f} "
                f"[{r['sites'][o]['time_ratio']['q1']:.3f}, "
                f"{r['sites'][o]['time_ratio']['q3']:.3f}]", load)
            for o in opts
        ]
        cells += [f"{r['sites'][o]['flops_ratio']:.3f}" for o in opts]
        cells += [f"{r['sites'][o]['bytes_ratio']:.3f}" for o in opts]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
    return '\n'.join(lines)


def _op_label(name: str) -> str:
    """An op's name for a table: without ``aten::``; inductor's generated
    code (``## Call CompiledFxGraph <hash> ##``) as ``compiled graph``."""
    if 'CompiledFxGraph' in name:
        return 'compiled graph'
    return name.replace('aten::', '')


def profile_markdown(result: dict, top: int = 3) -> str:
    """The per-op profile of a :func:`repl_mm.analysis.blocks.
    measure_blocks` run with ``profile``: per site, the block's step and
    each option's site step, with its timed fwd+bwd (the median of the
    timing), its time under the profiler, the ops' self time per call
    and the share of the profiled time spent outside them (Python, the
    autograd engine, dispatch between ops), the ``aten`` calls, the share
    of conv/matmul, norm and other ops in the ops' time, and the ``top``
    ops. Empty when the run has no profile."""
    rows = result['rows']
    if not rows or 'profile' not in rows[0]['block']:
        return ''
    opts = result['options']
    backend = result.get('compile_backend')
    how = f', compiled ({backend})' if backend else ''
    lines = [
        f"### {result['name']}: where the time goes (per-op profile{how}, "
        'self CPU time per fwd+bwd)', '',
        '| block | module | fwd+bwd (ms) | profiled (ms) | ops self time '
        '(ms) | outside ops '
        '| aten calls | conv/matmul | norm | other | top ops |',
        '|---' * 11 + '|'
    ]
    for r in rows:
        modules = [('block', r['block'])]
        modules += [(f'site ({o})', r['sites'][o]) for o in opts]
        for label, m in modules:
            p = m['profile']
            ops = ', '.join(f"{_op_label(t['op'])} {t['share']:.0%}"
                            for t in p['top'][:top])
            timed = m['time_ms']['median']
            lines.append('| ' + ' | '.join([
                f"{r['index']} ({r['name']})", label, f'{timed:.2f}',
                f"{p['wall_ms']:.2f}", f"{p['self_ms']:.2f}",
                f"{1 - p['self_ms'] / p['wall_ms']:.0%}",
                f"{p['aten_calls']:.0f}", *(f'{p["shares"][c]:.0%}'
                                            for c in ('conv/matmul', 'norm',
                                                      'other')), ops
            ]) + ' |')
    lines.append('')
    return '\n'.join(lines)


# -- plots -----------------------------------------------------------------
def plot_ratios(results: dict, path: str):
    """Bars of time (median, IQR whiskers), activation-memory and peak
    ratios to E2E per method, one panel per case."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cases = results['cases']
    cols = min(3, len(cases))
    rows = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, c in zip(axes.flat, cases):
        names = list(c['methods'])
        x = np.arange(len(names))
        ms = [c['methods'][n] for n in names]
        tr = np.array([[m['time_ratio'][k] for k in ('median', 'q1', 'q3')]
                       for m in ms])
        unreliable = ' (unreliable)' if load_note(c.get('load')) else ''
        ax.bar(
            x - 0.27,
            tr[:, 0],
            0.27,
            label='step time' + unreliable,
            yerr=[tr[:, 0] - tr[:, 1], tr[:, 2] - tr[:, 0]],
            capsize=2)
        ax.bar(x, [m['mem_ratio'] for m in ms], 0.27, label='act. memory')
        ax.bar(
            x + 0.27, [m['peak_ratio'] for m in ms], 0.27, label='peak memory')
        ax.axhline(1.0, color='k', lw=0.6)
        ax.set_xticks(x, names, rotation=45, ha='right', fontsize=7)
        ax.set_title(c['name'], fontsize=9)
        ax.set_ylabel('ratio to E2E')
    for ax in list(axes.flat)[len(cases):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_accuracies(path: str) -> Dict[str, Dict[str, float]]:
    """``{case: {method: top-1 or mAP or mIoU}}`` from a JSON file."""
    with open(path) as f:
        acc = json.load(f)
    if not isinstance(acc, dict) or not all(
            isinstance(v, dict) and all(
                isinstance(a, (int, float)) for a in v.values())
            for v in acc.values()):
        raise ValueError(f'{path}: expected {{case: {{method: number}}}}')
    return acc


def plot_accuracy_memory(results: dict, accuracies: Dict[str, Dict[str,
                                                                   float]],
                         path: str) -> bool:
    """Accuracy against activation memory (ratio to E2E), bubble area
    proportional to step time, one panel per case with accuracies (like
    the paper's Fig. 1). Returns False (and writes nothing) when no case
    has both results and accuracies."""
    cases = [
        c for c in results['cases']
        if set(accuracies.get(c['name'], {})) & set(c['methods'])
    ]
    if not cases:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(
        1, len(cases), figsize=(4.5 * len(cases), 3.8), squeeze=False)
    for ax, c in zip(axes.flat, cases):
        for m, a in accuracies[c['name']].items():
            r = c['methods'].get(m)
            if r is None:
                continue
            ax.scatter(
                r['mem_ratio'],
                a,
                s=400 * r['time_ratio']['median'],
                alpha=0.5)
            ax.annotate(m, (r['mem_ratio'], a), fontsize=7, ha='center')
        ax.set_xlabel('activation memory (x E2E)')
        ax.set_ylabel('accuracy')
        unreliable = ', unreliable' if load_note(c.get('load')) else ''
        ax.set_title(f"{c['name']} (area: step time{unreliable})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the record and the files ----------------------------------------------
def machine_info() -> dict:
    """Versions, machine, command, and the code's git commit (``+dirty``
    when the work tree differs from it), for the record."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

    def git(*args):
        try:
            return subprocess.run(['git', '-C', root, *args],
                                  capture_output=True,
                                  text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ''

    dirty = git('status', '--porcelain', '--', 'repl_mm')
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        argv=sys.argv,
        commit=git('rev-parse', 'HEAD') + ('+dirty' if dirty else ''),
        date=time.strftime('%Y-%m-%d %H:%M:%S'))


def write_outputs(results: dict,
                  out_dir: str,
                  accuracies: Optional[dict] = None) -> List[str]:
    """Write ``benchmark.json``, ``benchmark.md``, ``ratios.png`` and,
    given accuracies, ``accuracy_memory.png`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    path = functools.partial(os.path.join, out_dir)
    with open(path('benchmark.json'), 'w') as f:
        json.dump(results, f, indent=1)
    with open(path('benchmark.md'), 'w') as f:
        f.write(to_markdown(results))
    plot_ratios(results, path('ratios.png'))
    written = [
        path(n) for n in ('benchmark.json', 'benchmark.md', 'ratios.png')
    ]
    if accuracies and plot_accuracy_memory(results, accuracies,
                                           path('accuracy_memory.png')):
        written.append(path('accuracy_memory.png'))
    return written
