import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# `make test-compat` runs the suite a second time, on the users' stack
# (torch 2.1.2), and leaves out the tests listed in compat_excluded.txt:
# they cost minutes and exercise no code that differs between the stacks.
COMPAT_EXCLUDED = os.path.join(os.path.dirname(__file__),
                               'compat_excluded.txt')


def compat_excluded() -> dict:
    """Node-id prefix -> reason, from compat_excluded.txt."""
    out, reason = {}, ''
    with open(COMPAT_EXCLUDED, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if line.startswith('#'):
                reason = line.lstrip('# ')
            elif line:
                out[line] = reason
    return out


def pytest_collection_modifyitems(config, items):
    if not os.environ.get('REPL_MM_COMPAT_RUN'):
        return
    excluded = compat_excluded()
    keep, drop = [], []
    for item in items:
        (drop if any(item.nodeid.startswith(p) for p in excluded) else
         keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
