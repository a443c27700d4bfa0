"""Peak memory of one training step, for ``ftikd bench``'s memory column.

What is measured: the highest amount of memory the step held *above* what was allocated when it
began (activations, gradients, optimizer temporaries, a method's own buffers), i.e. what a batch
costs on top of the resident model, data and caches.

- CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus the allocation at start.
- CPU: the PyTorch CPU allocator has no peak counter, so the step runs once under
  ``torch.profiler`` with ``profile_memory=True`` and the peak is the running maximum of its
  allocation events in time order. Blocks allocated before the step and freed during it (e.g.
  old gradients) have no size in the profile, so the CPU figure can only overstate, by at most the
  size of such blocks (the parameter count in bytes for gradients set to None).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def step_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak MiB held above the start of one call of ``step`` on ``device`` (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return peak_of(allocation_events(prof.profiler.kineto_results.experimental_event_tree())) / 2**20


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null: the profiler's C++ side prints a start and a stop line
    per session there, whatever the log level, which would bury the bench's own output. Python
    exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocation_events(events: Iterable[Any]) -> list[tuple[int, int]]:
    """(time ns, bytes) of every CPU allocation (+) and free (-) in a profiler event tree."""
    from torch._C._profiler import _EventType  # the profiler's event kinds; no public name yet

    found: list[tuple[int, int]] = []
    stack = list(events)
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            found.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    return found


def peak_of(events: list[tuple[int, int]]) -> int:
    """The running maximum of allocated bytes over ``events`` taken in time order (0 if none)."""
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak
