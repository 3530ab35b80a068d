"""Root pytest configuration, also read by ``pytest --doctest-modules
repl_mm`` (``make doctest``).

Building a RepL backbone logs its plan table through mmengine's logger. The
logger's console handler is made once, on first use, bound to the
``sys.stdout`` of that moment; made inside a doctest it would write into
the doctest's captured output and fail the example. Making it here, before
any example runs, keeps the examples' expected output what they print
themselves, whatever order they run in.
"""
from mmengine.logging import MMLogger

MMLogger.get_instance('mmengine')
