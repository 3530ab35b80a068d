"""The benchmark's and the static converter's device handling: ``--device``
parsed and checked, and the CUDA timing and memory paths exercised with
torch.cuda's functions replaced by recording fakes (this machine has no
GPU; the fakes check the calls, their order and the arithmetic)."""
import importlib.util
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from repl_mm.analysis import benchmark, device
from repl_mm.analysis.device import (cuda_peak_allocated, device_timer,
                                     peak_memory, resolve_device)
from .test_benchmark import r20_case

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda with 2 devices and a scripted allocator; ``calls`` logs
    what was called, in order."""
    state = dict(allocated=1000, peak=1000, calls=[])
    calls = state['calls']

    def sync(dev=None):
        calls.append(('synchronize', str(dev)))

    def reset(dev=None):
        calls.append(('reset', str(dev)))
        state['peak'] = state['allocated']

    def allocated(dev=None):
        calls.append(('allocated', str(dev)))
        return state['allocated']

    def peak(dev=None):
        calls.append(('max', str(dev)))
        return state['peak']

    for name, fn in dict(
            is_available=lambda: True,
            device_count=lambda: 2,
            current_device=lambda: 1,
            synchronize=sync,
            reset_peak_memory_stats=reset,
            memory_allocated=allocated,
            max_memory_allocated=peak).items():
        monkeypatch.setattr(torch.cuda, name, fn)
    return state


@pytest.mark.parametrize(
    'spec',
    ['gpu', 'cuda:x', 'cuda:-1', 'cuda0', 'CPU', '', 'cuda:0:1', 'mps'])
def test_bad_device_strings_are_refused(spec):
    with pytest.raises(
            ValueError,
            match=f"device {spec!r}: expected 'cpu', "
            "'cuda' or 'cuda:N'"):
        resolve_device(spec)


def test_cpu_and_cuda_without_cuda(monkeypatch):
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device(torch.device('cpu')) == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for spec in ('cuda', 'cuda:0'):
        with pytest.raises(
                ValueError,
                match=f"--device {spec!r}: CUDA is "
                'not available here'):
            resolve_device(spec, option='--device')


def test_cuda_indices(fake_cuda):
    assert resolve_device('cuda') == torch.device('cuda', 1)  # current
    assert resolve_device('cuda:0') == torch.device('cuda', 0)
    with pytest.raises(
            ValueError,
            match=r"'cuda:2': there is no CUDA "
            r'device 2 \(2 visible: cuda:0..cuda:1\)'):
        resolve_device('cuda:2')


def test_cpu_timer_and_memory_do_not_touch_cuda(fake_cuda):
    timed = device_timer('cpu')
    assert timed(lambda: time.sleep(0.01)) >= 0.01
    x = []
    assert peak_memory(lambda: x.append(torch.ones(1000)), 'cpu') >= 4000
    assert fake_cuda['calls'] == []


def test_cuda_timer_synchronizes_around_the_call(fake_cuda):
    calls = fake_cuda['calls']
    timed = device_timer(torch.device('cuda', 0))
    t = timed(lambda: (calls.append('fn'), time.sleep(0.02)))
    assert calls == [('synchronize', 'cuda:0'), 'fn',
                     ('synchronize', 'cuda:0')]
    assert t >= 0.02


def test_cuda_peak_is_above_the_level_at_start(fake_cuda):
    calls = fake_cuda['calls']

    def step():
        calls.append('fn')
        fake_cuda['peak'] = 5000  # allocated up to 5000, freed again

    dev = torch.device('cuda', 0)
    assert cuda_peak_allocated(step, dev) == 4000
    assert calls == [('synchronize', 'cuda:0'), ('reset', 'cuda:0'),
                     ('allocated', 'cuda:0'), 'fn', ('synchronize', 'cuda:0'),
                     ('max', 'cuda:0')]
    calls.clear()
    fake_cuda['peak'] = 0
    assert peak_memory(step, dev) == 4000 and 'fn' in calls
    with pytest.raises(ValueError, match='unsupported device meta'):
        peak_memory(step, 'meta')


def test_round_robin_times_each_call_synchronized(fake_cuda):
    calls = fake_cuda['calls']
    steps = {n: (lambda n=n: calls.append(n)) for n in 'ab'}
    times = benchmark.time_round_robin(
        steps, repeats=2, warmup=1, device=torch.device('cuda', 0))
    assert {n: len(t) for n, t in times.items()} == dict(a=2, b=2)
    order = [c for c in calls if isinstance(c, str)]
    assert order == list('ab'
                         'ba'
                         'ab')
    sync = ('synchronize', 'cuda:0')
    assert calls == [x for n in order for x in (sync, n, sync)]


def test_measure_memory_takes_the_cuda_peak(fake_cuda):
    """The CPU model's saved bytes are the device-independent figure; the
    peak comes from the CUDA allocator's statistics, not the profiler."""
    model = benchmark_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.rand(2, 3, 8, 8), )
    cpu = benchmark.measure_memory(model, opt, batch)
    fake_cuda['allocated'], fake_cuda['peak'] = 10, 10
    torch_reset = torch.cuda.reset_peak_memory_stats

    def reset(dev=None):
        torch_reset(dev)
        fake_cuda['peak'] = 777  # what "the step" will have reached

    torch.cuda.reset_peak_memory_stats = reset
    try:
        cuda = benchmark.measure_memory(model, opt, batch,
                                        torch.device('cuda', 0))
    finally:
        torch.cuda.reset_peak_memory_stats = torch_reset
    assert cuda['peak_bytes'] == 767
    assert cuda['saved_bytes'] == cpu['saved_bytes'] > 0
    assert cpu['peak_bytes'] >= cpu['saved_bytes']


def benchmark_tiny():
    from mmengine.model import BaseModel

    class Tiny(BaseModel):

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

        def forward(self, x, data_samples=None, mode='tensor'):
            return self.net(x)

        def loss(self, x):
            return dict(loss=self.net(x).sum())

    return Tiny()


def test_to_device_leaves_a_cpu_batch_alone():
    batch = (torch.rand(1, 3, 4, 4), [object()])
    assert benchmark.to_device(batch, 'cpu') is batch


def test_markdown_names_the_device_only_off_the_cpu():
    method = dict(
        time_ratio=dict(median=1.0, q1=1.0, q3=1.0),
        flops=dict(step=1e9, synthesis_step=0.0),
        saved_bytes=1,
        mem_ratio=1.0,
        synthesis_kept_bytes=0,
        peak_bytes=1,
        peak_ratio=1.0,
        time_ms=dict(median=1.0),
        sites=[],
        S_mem=None,
        S_mem_large_batch=None,
        S_peak=None,
        S_time=None,
        S_flops=None,
        params=1)
    case = dict(
        name='c',
        backbone='B',
        batch_size=2,
        input_size=[8, 8],
        repeats=1,
        methods=dict(e2e=method))
    head = benchmark.to_markdown(dict(cases=[case])).splitlines()[0]
    assert head == '### c: B, batch 2 x 3x8x8, 1 trials'
    case['device'] = 'cuda:0'
    head = benchmark.to_markdown(dict(cases=[case])).splitlines()[0]
    assert head == '### c: B, batch 2 x 3x8x8, 1 trials, on cuda:0'


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TOOLS = [
    ('tools/analysis/benchmark.py', ['--suite', 'cifar-r32']),
    ('tools/model_converters/repl_to_static.py', ['cfg.py', 'ck.pth', 'out']),
]


@pytest.mark.parametrize('path, argv', TOOLS, ids=['benchmark', 'static'])
def test_cli_device_option(path, argv, monkeypatch, capsys):
    tool = load(path, 'device_cli')
    assert tool.parse_args(argv).device == torch.device('cpu')  # default
    with pytest.raises(SystemExit):
        tool.parse_args(argv + ['--device', 'gpu0'])
    assert "--device 'gpu0': expected 'cpu', 'cuda' or 'cuda:N'" in \
        capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit):
        tool.parse_args(argv + ['--device', 'cuda'])
    assert "--device 'cuda': CUDA is not available" in \
        capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert tool.parse_args(argv + ['--device', 'cuda:1']).device == \
        torch.device('cuda', 1)
    with pytest.raises(SystemExit):
        tool.parse_args(argv + ['--device', 'cuda:2'])
    assert "--device 'cuda:2': there is no CUDA device 2" in \
        capsys.readouterr().err


def test_benchmark_records_the_device(tmp_path):
    """The CPU run as before, with the device in the case and the meta."""
    case = r20_case(repeats=1)
    res = benchmark.run_benchmark([case], str(tmp_path), ['e2e', 'repl'])
    assert res['cases'][0]['device'] == 'cpu'
    assert res['meta']['device'] == 'cpu'
    assert device.describe_device('cpu') == dict(device='cpu')
