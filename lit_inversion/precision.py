"""Dtypes and matmul precision: what "auto" means on a device, and the float32 the verifier needs.

Inversion compares states and logits at tolerances of 1e-4 of their norm, so two of the usual GPU
speed-ups break it: TF32 matmuls (`torch.set_float32_matmul_precision("high")`, ~1e-3 relative error)
in the SIP-It verifier, and "true" half precision, which would cast the captured target states.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from lit_inversion.errors import InversionError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=None)  # the chains ask on every step; the answer never changes
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype option; "auto" picks a half dtype only where it is fast (CUDA, or a CPU with bf16 units)."""
    if name != "auto":
        if name not in DTYPES:
            raise InversionError(f"dtype '{name}' is unknown: use auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def weights_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a frozen model's weights load in: "auto" is half only on a GPU (a CPU's bf16 units
    speed up matmuls, not storage), so bfloat16 on CUDA (float16 where bf16 is not supported), else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto" and torch.device(device).type != "cuda":
        return torch.float32
    return resolve_dtype(name, torch.device(device))


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls in full precision inside, whatever the caller set (TF32 moves a state by ~1e-3
    of its norm, ten times the verifier's tolerance); the caller's setting is restored after."""
    before = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    if before == "highest" and not cudnn:
        yield
        return
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = cudnn


def model_dtype_region(device: torch.device | str):
    """Autocast off inside. Lightning's mixed precision autocasts the whole training step; the states
    the verifier compares, the first-position table, the token map's fit, PEZ's projection and the
    honest check must run in the model's own dtype instead."""
    return torch.autocast(torch.device(device).type, enabled=False)


def check_trainer_precision(precision: str) -> None:
    """Reject "true" half precision: it casts the module's inputs, i.e. the captured states."""
    if str(precision) in ("bf16-true", "16-true"):
        raise InversionError(
            f"--trainer.precision {precision} casts the captured states and the prompt parameters to half "
            "precision: use bf16-mixed (or 16-mixed), or load the model in half with --model.dtype bfloat16")
