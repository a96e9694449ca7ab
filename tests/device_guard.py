"""A torch-function mode that records every tensor factory lit_inversion calls without a device.

Why a mode and not a `meta` (or fake CUDA) default device: with `torch.set_default_device("meta")`
every CPU bookkeeping tensor would break too (`.tolist()` on meta fails), far from the call that
forgot its device, and a tensor that should be on the CPU would be indistinguishable from a bug. The
mode sees each factory call with its arguments and the caller's file and line, so a test on the CPU
names the exact line that would put a tensor on the wrong device on CUDA (where the default device
is the CPU, or whatever a context manager made it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = str(Path(__file__).resolve().parents[1] / "lit_inversion")
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace}


class RequireDevice(TorchFunctionMode):
    """Inside, `missing` collects `file:line factory` for each factory call from lit_inversion that
    gives no `device=` (a `torch.tensor`/`as_tensor` of a tensor keeps that tensor's device: fine).
    `torch.Generator()` without a device is recorded too."""

    def __init__(self):
        super().__init__()
        self.missing: list[str] = []
        self._generator = torch.Generator

    def _record(self, name: str, depth: int) -> None:
        frame = sys._getframe(depth + 1)
        if frame.f_code.co_filename.startswith(PACKAGE):
            where = f"{Path(frame.f_code.co_filename).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno}"
            self.missing.append(f"{where} {name}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            copies = func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], torch.Tensor)
            if not copies:
                self._record(func.__name__, 1)
        return func(*args, **kwargs)

    def __enter__(self):
        mode, original = self, self._generator

        class Generator(original):  # records a CPU generator made by default
            def __new__(cls, device=None):
                if device is None:
                    mode._record("Generator", 1)
                return original(device="cpu" if device is None else device)

        torch.Generator = Generator
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Generator = self._generator
        return super().__exit__(*exc)
