"""What every benchmark script shares: the label of the hardware its times were measured on."""

from __future__ import annotations

import platform

import torch


def hardware() -> str:
    """The device the figures come from, e.g. 'CPU x86_64, 2 threads' or 'NVIDIA H100 (CUDA)'."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
