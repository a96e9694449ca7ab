"""What every benchmark script shares: the label of the hardware its times were measured on, the timer, and
the record of the run (command, commit, date) that each JSON carries for benchmarks/report.py."""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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


def command(argv: list[str] | None = None) -> str:
    """The command that reproduces this run from the repository root: `python benchmarks/<script> <its arguments>`
    (also when it was started as `python -m benchmarks.<script>`)."""
    argv = sys.argv if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(argv[0]).name}"] + ([shlex.join(argv[1:])] if argv[1:] else []))


def commit() -> str | None:
    """The checked-out commit (7-digit hash), with `-dirty` when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


# The commit and date when the script started: a long run's JSON is saved after each method, and the tree
# may be committed or edited meanwhile; the code it runs is the code it imported.
_STARTED = {"commit": commit(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def run_record() -> dict:
    """What every benchmark JSON records about its run, for the generated pages in docs/results/: the command
    that reproduces it, and the commit and date at which it started."""
    return {"command": command(), **_STARTED}


def shipped_config(**options):
    """configs/dlmi.yaml's method (a DlmiConfig), with its prompt length and step cap; `options` over them."""
    import yaml

    from lit_inversion.dlmi.config import DlmiConfig

    init = yaml.safe_load((ROOT / "configs/dlmi.yaml").read_text())["model"]["init_args"]
    method = dict(init["method"].get("init_args") or {})
    return DlmiConfig(**{**method, "prompt_length": init["prompt_length"], "num_steps": init["num_steps"], **options})
