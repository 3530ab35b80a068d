"""Root pytest configuration, also read by ``pytest --doctest-modules
repl_mm`` (``make doctest``).

Building a RepL backbone logs its plan table through mmengine's logger. The
logger's console handler is made once, on first use, bound to the
``sys.stdout`` of that moment; made inside a doctest it would write into
the doctest's captured output and fail the example. Making it here, before
any example runs, keeps the examples' expected output what they print
themselves, whatever order they run in.
"""
import os

from mmengine.logging import MMLogger

MMLogger.get_instance('mmengine')


def pytest_configure(config):
    """In a pytest-xdist worker (``make test`` runs one per core), torch
    computes with one thread, and so do the processes the tests start:
    two workers with a thread per core each would oversubscribe the cores
    and spend their time waiting on each other."""
    if os.environ.get('PYTEST_XDIST_WORKER'):
        import torch
        torch.set_num_threads(1)
        for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
            os.environ[name] = '1'


def pytest_sessionfinish(session, exitstatus):
    session.config._repl_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    """On torch < 2.14 (the compat stack), end the process right after the
    summary, skipping interpreter teardown: there, after the whole suite
    has passed (torch 2.1.2, numpy 1.26), the interpreter's own teardown
    segfaulted (no Python frame; each test directory alone exits cleanly),
    which would turn a green run red. The exit status is pytest's."""
    import sys

    from repl_mm.utils.compat import torch_version
    if torch_version() < (2, 14) and hasattr(config, '_repl_exitstatus'):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config._repl_exitstatus)
