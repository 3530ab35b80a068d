"""The compat run's exclusion list names tests that exist, each with a
reason, so it cannot rot silently."""
import os

from tests.conftest import compat_excluded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_every_excluded_test_exists_and_has_a_reason():
    excluded = compat_excluded()
    assert excluded, 'compat_excluded.txt lists nothing'
    for nodeid, reason in excluded.items():
        assert reason, f'{nodeid} has no reason above it'
        path, _, rest = nodeid.partition('::')
        full = os.path.join(ROOT, path)
        assert os.path.exists(full), f'{path} does not exist'
        if rest:
            name = rest.split('::')[-1].split('[')[0]
            with open(full, encoding='utf-8') as f:
                text = f.read()
            assert f'def {name}(' in text or f'class {name}' in text, \
                f'{nodeid}: no {name} in {path}'
