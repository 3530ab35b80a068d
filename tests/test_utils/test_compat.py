import pickle

import pytest
import torch

from repl_mm.utils import compat


@pytest.mark.parametrize('text, want', [('2.1.2', (2, 1)),
                                        ('2.14.1+cu130', (2, 14)),
                                        ('2.6.0a0+git1234', (2, 6)),
                                        ('2.15.0.dev20261101', (2, 15))])
def test_torch_version(text, want):
    assert compat.torch_version(text) == want


def test_installed_torch_in_supported_range():
    assert (2, 1) <= compat.TORCH_VERSION < (2, 15)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_is_autocast_enabled_follows_cpu_autocast(dtype):
    assert not compat.is_autocast_enabled('cpu')
    try:
        with torch.autocast('cpu', dtype=dtype):
            pass
    except RuntimeError as e:  # torch 2.1: AutocastCPU supports bf16 only
        pytest.skip(f'no {dtype} CPU autocast on torch '
                    f'{torch.__version__}: {e}')
    with torch.autocast('cpu', dtype=dtype):
        assert compat.is_autocast_enabled('cpu')
        assert not compat.is_autocast_enabled('cuda')
        with torch.autocast('cpu', enabled=False):
            assert not compat.is_autocast_enabled('cpu')
    assert not compat.is_autocast_enabled('cpu')


def test_is_autocast_enabled_unknown_device_type():
    assert compat.is_autocast_enabled('meta') is False


class _Weird:
    pass


def test_safe_globals_scopes_weights_only_load(tmp_path):
    path = tmp_path / 'x.pth'
    torch.save({'obj': _Weird()}, path)
    with compat.safe_globals([_Weird]):
        if compat.TORCH_VERSION >= (2, 5):
            obj = torch.load(path, weights_only=True)['obj']
            assert isinstance(obj, _Weird)
    if compat.TORCH_VERSION >= (2, 5):
        # outside the context the allow-list is gone again
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)


class _EventNs:

    def start_ns(self):
        return 1500


class _EventUs:

    def start_us(self):
        return 1.5


def test_event_start_ns_both_apis():
    assert compat.event_start_ns(_EventNs()) == 1500
    assert compat.event_start_ns(_EventUs()) == 1500


def test_event_start_ns_real_profiler_events():
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        torch.ones(1000) * 2
    starts = [
        compat.event_start_ns(e) for e in p.profiler.kineto_results.events()
    ]
    assert starts and all(isinstance(s, int) and s >= 0 for s in starts)


def test_numpy_multiarray_is_where_arrays_pickle_from():
    import numpy as np
    multiarray = compat.numpy_multiarray()
    assert np.ndarray.__reduce__(np.zeros(1))[0] is \
        multiarray._reconstruct


def test_load_allowing_loads_exactly_the_allowed_globals(tmp_path):
    path = tmp_path / 'x.pth'
    torch.save({'obj': _Weird(), 't': torch.ones(2)}, path)
    out = compat.load_allowing(path, [_Weird], map_location='cpu')
    assert isinstance(out['obj'], _Weird) and out['t'].sum() == 2
    if compat.TORCH_VERSION >= (2, 5):
        with pytest.raises(pickle.UnpicklingError):
            compat.load_allowing(path, [], map_location='cpu')
