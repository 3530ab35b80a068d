"""Running the checks of ``tools/gpu_check.py``, each a subprocess with
its own log, whatever the checks are.

A :class:`Check` is a list of commands (run in order from the repository
root, stdout and stderr into ``<work_dir>/logs/<name>.log``), an optional
``prepare`` step (writes the check's config) and a ``verify`` step that
reads what the run left behind and raises :class:`CheckFailed` (through
:func:`expect`) if anything is off. :func:`run_checks` runs them in order;
a check whose ``needs`` did not pass is skipped, and one failure never
stops the others. :func:`select` picks the checks of ``--only`` and those
they need.

Only the standard library is imported.
"""
import fnmatch
import os
import os.path as osp
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

from .gpu_check_configs import ROOT, Context

PASS, FAIL, SKIP = 'PASS', 'FAIL', 'SKIP'


class CheckFailed(Exception):
    """A check's outputs are not what the run should have left."""


def expect(condition: bool, message: str):
    """Raise :class:`CheckFailed` with ``message`` unless ``condition``."""
    if not condition:
        raise CheckFailed(message)


@dataclass
class Check:
    """One acceptance check (see the module doc).

    Args:
        name (str): Unique name (``--only``).
        description (str): One line for ``--list``.
        commands (list[list[str]] | callable): Run in order; any
            non-zero exit fails. A callable returning them is called when
            the check runs (after ``prepare``).
        verify (callable, optional): Reads the outputs; returns a short
            note, raises on a failure.
        needs (tuple[str]): Checks that must have passed first.
        skip (str, optional): Why the check does not apply here.
        prepare (callable, optional): Run before the commands (in this
            process), e.g. to write the check's config.
        env (callable, optional): Extra environment variables.
    """
    name: str
    description: str
    commands: Union[List[List[str]], Callable[[], List[List[str]]]] = \
        field(default_factory=list)
    verify: Optional[Callable[[], Optional[str]]] = None
    needs: tuple = ()
    skip: Optional[str] = None
    prepare: Optional[Callable[[], None]] = None
    env: Optional[Callable[[], dict]] = None


def select(checks: Sequence[Check], patterns: Sequence[str]) -> List[Check]:
    """The checks matching any of ``patterns`` (names or shell patterns,
    e.g. ``'train-*-hook'``) and those they need, in run order.

    Raises:
        ValueError: If a pattern matches no check (names the pattern).
    """
    if not patterns:
        return list(checks)
    by_name = {c.name: c for c in checks}
    chosen = set()
    for pat in patterns:
        hits = fnmatch.filter(by_name, pat)
        if not hits:
            raise ValueError(f'--only: {pat!r} matches no check; known: '
                             f'{", ".join(by_name)}')
        chosen.update(hits)
    todo = list(chosen)
    while todo:
        for need in by_name[todo.pop()].needs:
            if need not in chosen:
                chosen.add(need)
                todo.append(need)
    return [c for c in checks if c.name in chosen]


# -- running ---------------------------------------------------------------
def clear_folder(ctx: Context, folder: str):
    """Remove ``folder`` (inside the work dir only) so that nothing of an
    earlier run can pass for this one's output."""
    root = ctx.path()
    if osp.commonpath([root, osp.abspath(folder)]) != root:
        raise ValueError(f'refusing to clear {folder}: outside the work '
                         f'dir {root}')
    if osp.isdir(folder):
        shutil.rmtree(folder)


def _command_env(check: Check) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, env.get('PYTHONPATH')) if p)
    # The profiler's backend (kineto) logs every start/stop; its USDT lines
    # (torch 2.14) sit above level 5 and go quiet only at 6.
    env.setdefault('KINETO_LOG_LEVEL', '6')
    if check.env is not None:
        env.update(check.env())
    return env


def run_check(check: Check, ctx: Context) -> dict:
    """Run one check; return ``name``, ``result`` (PASS / FAIL), ``seconds``,
    ``note`` and ``log``."""
    log_path = ctx.log_path(check.name)
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    t0 = time.perf_counter()
    result, note = PASS, ''
    with open(log_path, 'w') as log:
        try:
            clear_folder(ctx, ctx.run_dir(check.name))
            os.makedirs(ctx.run_dir(check.name), exist_ok=True)
            if check.prepare is not None:
                check.prepare()
            commands = check.commands() if callable(
                check.commands) else check.commands
            env = _command_env(check)
            for i, cmd in enumerate(commands, 1):
                log.write(f'$ {subprocess.list2cmdline(cmd)}\n')
                log.flush()
                rc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=ctx.timeout).returncode
                if rc != 0:
                    raise CheckFailed(f'command {i} of {len(commands)} '
                                      f'exited with {rc}')
            if check.verify is not None:
                note = check.verify() or ''
        except subprocess.TimeoutExpired:
            result, note = FAIL, f'timed out after {ctx.timeout:g} s'
        except CheckFailed as e:
            result, note = FAIL, str(e)
        except Exception as e:  # a bug or a missing output: report it
            result, note = FAIL, f'{type(e).__name__}: {e}'
            log.write(traceback.format_exc())
        log.write(f'\n== {check.name}: {result} {note}\n')
    return dict(
        name=check.name,
        result=result,
        seconds=round(time.perf_counter() - t0, 1),
        note=note,
        log=log_path)


def run_checks(checks: Sequence[Check],
               ctx: Context,
               echo: Callable[[str], None] = print) -> List[dict]:
    """Run ``checks`` in order (module doc); one line each to ``echo``."""
    results: Dict[str, dict] = {}
    for i, check in enumerate(checks, 1):
        failed = [
            n for n in check.needs
            if n in results and results[n]['result'] != PASS
        ]
        missing = [n for n in check.needs if n not in results]
        if check.skip is not None:
            r = dict(
                name=check.name,
                result=SKIP,
                seconds=0.0,
                note=check.skip,
                log=None)
        elif failed or missing:
            why = ', '.join(f"{n} ({results[n]['result']})" for n in failed)
            why = why or ', '.join(f'{n} (not run)' for n in missing)
            r = dict(
                name=check.name,
                result=SKIP,
                seconds=0.0,
                note=f'needs {why}',
                log=None)
        else:
            echo(f'[{i}/{len(checks)}] {check.name} ...')
            r = run_check(check, ctx)
        results[check.name] = r
        echo(f"[{i}/{len(checks)}] {check.name}: {r['result']} "
             f"({r['seconds']:.1f} s) {r['note']}".rstrip())
    return list(results.values())


def exit_code(results: Sequence[dict]) -> int:
    """1 if any check failed, else 0."""
    return int(any(r['result'] == FAIL for r in results))


__all__ = [
    'PASS', 'FAIL', 'SKIP', 'CheckFailed', 'expect', 'Check', 'select',
    'clear_folder', 'run_check', 'run_checks', 'exit_code'
]
