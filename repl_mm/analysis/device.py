"""The device the analysis tools measure on, and how a call is timed and its
memory measured there: the only device-specific code of the benchmark and
of the static model's timing.

- :func:`resolve_device`: ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` as a
  :class:`torch.device`, with an error naming the option and the value.
- :func:`device_timer`: seconds of one call; on CUDA the queue is drained
  (``torch.cuda.synchronize``) before and after the call, so the time is
  the kernels' and not only their launch.
- :func:`peak_memory`: the allocator's high-water mark during one call,
  above its level when the call starts. CPU: the torch profiler's memory
  events (:func:`peak_allocated`); CUDA: ``reset_peak_memory_stats`` and
  ``max_memory_allocated`` minus ``memory_allocated`` at the start.

Torch-only.
"""
import re
import time
from typing import Callable, Union

import torch

from ..utils.compat import event_start_ns

DeviceLike = Union[str, torch.device]
_CUDA = re.compile(r'cuda(?::(\d+))?')


def resolve_device(spec: DeviceLike, option: str = 'device') -> torch.device:
    """``spec`` as a :class:`torch.device`: ``'cpu'``, ``'cuda'`` (the
    current CUDA device, made explicit: ``cuda:0`` unless set otherwise) or
    ``'cuda:N'``.

    Args:
        spec (str | torch.device): The device.
        option (str): Name of the option in error messages (a script
            passes ``'--device'``). Defaults to ``'device'``.

    Raises:
        ValueError: If ``spec`` is none of these, or names CUDA on a
            machine without it or a CUDA device that does not exist.
    """
    text = str(spec).strip()
    if text == 'cpu':
        return torch.device('cpu')
    match = _CUDA.fullmatch(text)
    if match is None:
        raise ValueError(f"{option} {text!r}: expected 'cpu', 'cuda' or "
                         "'cuda:N' (N a device index)")
    if not torch.cuda.is_available():
        raise ValueError(
            f'{option} {text!r}: CUDA is not available here (torch '
            f'{torch.__version__}, built for CUDA {torch.version.cuda}); '
            "use 'cpu'")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if match.group(1) is None else int(
        match.group(1))
    if index >= count:
        raise ValueError(f'{option} {text!r}: there is no CUDA device '
                         f'{index} ({count} visible: cuda:0..cuda:'
                         f'{count - 1})')
    return torch.device('cuda', index)


def synchronize(device: torch.device):
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def device_timer(device: DeviceLike = 'cpu') -> Callable[[Callable], float]:
    """A function ``timed(fn) -> seconds`` that runs ``fn()`` once and
    returns its wall time (``time.perf_counter``); on CUDA it synchronizes
    before starting the clock and before stopping it."""
    device = torch.device(device)
    if device.type == 'cpu':

        def timed(fn: Callable[[], None]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    else:

        def timed(fn: Callable[[], None]) -> float:
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            return time.perf_counter() - t0

    return timed


def peak_allocated(fn: Callable[[], None]) -> int:
    """High-water mark (bytes) of torch's CPU allocator while ``fn`` runs,
    above its level when it starts: the cumulative sum of the profiler's
    memory events (frees of earlier tensors are not reported, so they
    never lower it)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    events = [
        e for e in p.profiler.kineto_results.events()
        if e.name() == '[memory]' and e.device_type().name == 'CPU'
    ]
    events.sort(key=event_start_ns)
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def cuda_peak_allocated(fn: Callable[[], None], device: torch.device) -> int:
    """High-water mark (bytes) of the CUDA caching allocator's allocated
    memory on ``device`` while ``fn`` runs, above its level at the start
    (tensors the allocator holds, not the memory it has reserved)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def peak_memory(fn: Callable[[], None], device: DeviceLike = 'cpu') -> int:
    """Peak bytes allocated on ``device`` while ``fn`` runs, above the
    level at the start (:func:`peak_allocated` on CPU,
    :func:`cuda_peak_allocated` on CUDA)."""
    device = torch.device(device)
    if device.type == 'cpu':
        return peak_allocated(fn)
    if device.type == 'cuda':
        return cuda_peak_allocated(fn, device)
    raise ValueError(f'peak memory: unsupported device {device}')


def describe_device(device: DeviceLike = 'cpu') -> dict:
    """What the measurements ran on, for the record: the device, and for
    CUDA the GPU's name, compute capability, memory and torch's CUDA."""
    device = torch.device(device)
    out = dict(device=str(device))
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        out.update(
            name=props.name,
            capability=f'{props.major}.{props.minor}',
            memory_gib=round(props.total_memory / 2**30, 2),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version())
    return out


__all__ = [
    'resolve_device', 'synchronize', 'device_timer', 'peak_allocated',
    'cuda_peak_allocated', 'peak_memory', 'describe_device'
]
