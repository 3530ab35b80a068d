import importlib.util
import os.path as osp

import pytest

TOOL = osp.join(
    osp.dirname(__file__), '..', '..', 'tools', 'dataset_converters',
    'make_datasets.py')


@pytest.fixture(scope='session')
def make_datasets():
    """The ``make_datasets.py`` CLI, imported as a module."""
    spec = importlib.util.spec_from_file_location('make_datasets', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if mmpretrain tries to download anything."""
    from mmpretrain.datasets import cifar, utils

    def fail(*args, **kwargs):
        pytest.fail(f'a download was attempted: {args} {kwargs}')

    for module in (cifar, utils):
        monkeypatch.setattr(module, 'download_and_extract_archive', fail)
