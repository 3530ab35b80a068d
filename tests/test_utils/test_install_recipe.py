"""The README's install recipe for GPU users pins exactly what
``make test-compat`` installs (requirements/compat.txt) and tests; under
that venv, the installed versions are those pins."""
import os
import re
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from repl_mm.utils.compat import TORCH_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding='utf-8') as f:
        return f.read()


def _gpu_recipe() -> str:
    readme = _read('README.md')
    section = readme[readme.index('**GPU users**'):]
    return re.search(r'```bash\n(.*?)```', section, re.S).group(1)


def _compat_pins() -> dict:
    pins = {}
    for line in _read('requirements', 'compat.txt').splitlines():
        line = line.split('#')[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name] = req.specifier
    return pins


def _recipe_pins() -> dict:
    pins = {}
    for line in _gpu_recipe().splitlines():
        line = line.split('#')[0]
        if not line.startswith('pip install'):
            continue
        for word in line.split()[2:]:
            word = word.strip('"\'')
            if word.startswith('-') or word.startswith('http') or \
                    word.startswith('.') or '/' in word:
                continue
            req = Requirement(word)
            pins[req.name] = req.specifier
    return pins


def test_recipe_pins_are_the_compat_pins():
    compat, recipe = _compat_pins(), _recipe_pins()
    assert set(compat) == {'torch', 'torchvision', 'numpy'}
    for name, spec in compat.items():
        assert recipe.get(name) == spec, (name, recipe.get(name), spec)
    mmcv = re.search(r'MMCV_VERSION=(\S+)', _read('tools',
                                                  'setup_env.sh')).group(1)
    assert str(recipe['mmcv']) == f'=={mmcv}'


def test_recipe_installs_repl_mm_under_the_compat_constraints():
    assert '-c requirements/compat.txt' in _gpu_recipe()


@pytest.mark.skipif(
    TORCH_VERSION >= (2, 2), reason='checks the compat venv (torch 2.1)')
def test_compat_venv_has_the_pinned_versions():
    for name, spec in _compat_pins().items():
        assert spec.contains(version(name).split('+')[0]), \
            (name, version(name), spec)
    assert version('mmcv') == '2.1.0'
