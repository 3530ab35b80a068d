"""AutocastOptimWrapper: bfloat16 only, and only where the device computes
it (the CUDA branch is exercised by faking CUDA's answers)."""
import pytest
import torch
from torch import nn

from repl_mm.engine import AutocastOptimWrapper
from repl_mm.utils import compat


def optimizer():
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


def test_bfloat16_on_the_cpu():
    wrapper = AutocastOptimWrapper(optimizer=optimizer())
    assert wrapper.cast_dtype is torch.bfloat16
    model = nn.Linear(2, 2)
    with wrapper.optim_context(model):
        assert model(torch.rand(1, 2)).dtype is torch.bfloat16


def test_float16_is_refused_for_amp_optim_wrapper():
    with pytest.raises(ValueError, match=r"dtype='float16'.*AmpOptimWrapper"):
        AutocastOptimWrapper(dtype='float16', optimizer=optimizer())


def test_other_dtypes_are_refused():
    with pytest.raises(
            ValueError, match="must be 'bfloat16', but got "
            "'float32'"):
        AutocastOptimWrapper(dtype='float32', optimizer=optimizer())


def fake_cuda(monkeypatch, supported, major=None):
    """A CUDA device whose ``is_bf16_supported`` is ``supported`` (a
    function of the torch version's signature) and, for the signature
    without ``including_emulation``, compute capability ``major``."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', supported)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a:
                        (major, 0))


@pytest.mark.parametrize(
    'supported',
    [
        lambda: False,  # torch 2.1: native support only
        lambda including_emulation=True: including_emulation,  # emulated
    ])
def test_bfloat16_without_cuda_support_is_refused(monkeypatch, supported):
    fake_cuda(monkeypatch, supported, major=7)
    with pytest.raises(
            RuntimeError,
            match=r"dtype='bfloat16'.*does not "
            r'support bfloat16.*AmpOptimWrapper'):
        AutocastOptimWrapper(optimizer=optimizer())


@pytest.mark.parametrize(
    'supported, major, native',
    [
        (lambda: False, 8, False),
        (lambda: True, 8, True),  # 2.1, or a release counting emulation
        (lambda: True, 7, False),  # a release counting emulation (V100, T4)
        (lambda including_emulation=True: including_emulation, 7, False),
        (lambda including_emulation=True: True, 8, True),
    ])
def test_cuda_bf16_native(monkeypatch, supported, major, native):
    fake_cuda(monkeypatch, supported, major)
    monkeypatch.setattr(torch.version, 'hip', None)
    assert compat.cuda_bf16_native() is native


@pytest.mark.skipif(torch.cuda.is_available(), reason='a CPU-only check')
def test_cuda_bf16_native_without_cuda():
    assert compat.cuda_bf16_native() is False


def test_bfloat16_with_cuda_support_builds(monkeypatch):
    fake_cuda(monkeypatch, lambda including_emulation=True: True, major=8)
    assert AutocastOptimWrapper(
        optimizer=optimizer()).cast_dtype is torch.bfloat16
