"""What every benchmark script shares: the label of the hardware its times were measured on, and the timer."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def hardware() -> str:
    """The device the figures come from, e.g. 'CPU x86_64, 2 threads' or 'NVIDIA H100 (CUDA)'."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of `repeats` calls of `fn`, after one warm-up call (allocator, kernel selection)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
