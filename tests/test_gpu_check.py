"""benchmarks/gpu_check.sh --cpu: every part of the GPU check runs (tiny sizes) or says why it is skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("setup", "env", "cuda-tests", "model-tiny", "sipit-bf16-tiny", "dlmi-bf16-tiny", "model-1b", "sipit-bf16-1b",
         "dlmi-bf16-1b", "ddp")
RUN_ON_CPU = ("setup", "env", "model-tiny", "sipit-bf16-tiny", "dlmi-bf16-tiny")


@pytest.mark.slow
def test_gpu_check_passes_in_cpu_mode(tmp_path):
    # The script uses the `python` on PATH: this interpreter's, as on a GPU machine its own.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path))
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], run.stdout + run.stderr[-3000:]
    status = {}
    for line in lines:
        match = re.match(r"(PASS|SKIP) (\S+) \(", line)
        if match:
            status[match.group(2)] = match.group(1)
    assert set(status) == set(PARTS), run.stdout
    assert all(status[name] == "PASS" for name in RUN_ON_CPU), run.stdout
    assert re.search(r"^PASS sipit-bf16-tiny \(.*exact 2/2", run.stdout, re.M)
    report = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert "torch: " in report and "hardware: " in report
    assert all(line in report for line in lines if line.startswith(("PASS", "SKIP")))
    assert not list(tmp_path.glob("gpu_check.*"))  # its work directory is removed
