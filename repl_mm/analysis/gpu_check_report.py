"""The outputs of ``tools/gpu_check.py``: the checks table, the
benchmark table of the passed ``bench-*`` checks, and the result JSON
holding both (structured and as markdown).

Only the standard library is imported.
"""
import json
import os
import os.path as osp
from typing import List, Sequence

from .gpu_check_configs import Context
from .gpu_check_runner import FAIL, PASS, SKIP, exit_code


# -- outputs ---------------------------------------------------------------
def _cell(text) -> str:
    return str(text).replace('|', '/').replace('\n', ' ')


def format_table(results: Sequence[dict]) -> str:
    """The checks as a markdown table: check, result, seconds, note."""
    lines = ['| check | result | seconds | note |', '|---|---|---|---|']
    lines += [
        f"| {r['name']} | {r['result']} | {r['seconds']:.1f} | "
        f"{_cell(r['note'])} |" for r in results
    ]
    counts = {
        k: sum(r['result'] == k for r in results)
        for k in (PASS, FAIL, SKIP)
    }
    lines.append('')
    lines.append(', '.join(f'{v} {k}' for k, v in counts.items()))
    return '\n'.join(lines)


def benchmark_rows(ctx: Context, results: Sequence[dict]) -> List[dict]:
    """One row per case and method of the passed ``bench-*`` checks."""
    rows = []
    for r in results:
        if not r['name'].startswith('bench-') or r['result'] != PASS:
            continue
        with open(osp.join(ctx.run_dir(r['name']), 'benchmark.json')) as f:
            res = json.load(f)
        for case in res['cases']:
            for m, v in case['methods'].items():
                rows.append(
                    dict(
                        case=case['name'],
                        device=case.get('device', 'cpu'),
                        batch=case['batch_size'],
                        input=case['input_size'],
                        method=m,
                        step_ms=v['time_ms']['median'],
                        time_ratio=v['time_ratio'],
                        peak_mb=v['peak_bytes'] / 2**20,
                        peak_ratio=v['peak_ratio'],
                        act_mb=v['saved_bytes'] / 2**20,
                        mem_ratio=v['mem_ratio'],
                        S_time=v['S_time'],
                        S_mem=v['S_mem']))
    return rows


def format_benchmark(rows: Sequence[dict]) -> str:
    """The benchmark rows as a markdown table (ratios to E2E)."""
    if not rows:
        return '(no benchmark ran)'

    def f(v, spec='.3f'):
        return '-' if v is None else format(v, spec)

    lines = [
        '| case | device | batch | method | step (ms) | time x E2E [IQR] | '
        'peak (MB) | peak x E2E | act. mem (MB) | act. x E2E | S_time | '
        'S_mem |', '|---' * 12 + '|'
    ]
    for r in rows:
        t = r['time_ratio']
        h, w = r['input']
        lines.append(
            f"| {r['case']} | {r['device']} | {r['batch']} x {h}x{w} | "
            f"{r['method']} | {r['step_ms']:.1f} | {t['median']:.3f} "
            f"[{t['q1']:.3f}, {t['q3']:.3f}] | {r['peak_mb']:.0f} | "
            f"{r['peak_ratio']:.3f} | {r['act_mb']:.0f} | "
            f"{r['mem_ratio']:.3f} | {f(r['S_time'])} | {f(r['S_mem'])} |")
    return '\n'.join(lines)


def write_result(path: str, meta: dict, results: Sequence[dict],
                 rows: Sequence[dict]) -> str:
    """Write both tables (structured and as markdown) to ``path``."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    out = dict(
        meta=meta,
        passed=not exit_code(results),
        checks=list(results),
        benchmark=list(rows),
        table=format_table(results),
        benchmark_table=format_benchmark(rows))
    with open(path, 'w') as f:
        json.dump(out, f, indent=1)
    return path


__all__ = [
    'format_table', 'benchmark_rows', 'format_benchmark', 'write_result'
]
