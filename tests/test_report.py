"""benchmarks/report.py on small synthetic JSON files shaped like the benchmark scripts' output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report

DLMI_METHODS = ("paper", "dlmi", "gbda", "reinforce", "gcg")


def sipit_json(length: int = 20, scale: float = 1.0) -> dict:
    """The shape benchmarks/sipit.py writes (with --pez-steps 50); random prompts take twice as long."""
    rows = []
    for layer in (1, 15):
        for kind, slower in (("natural", 1.0), ("random", 2.0)):
            s = scale * slower
            rows.append(dict(layer=layer, kind=kind, prompts=2, exact=1.0, mean_s_per_token=0.1 * layer * s,
                             max_s_per_token=0.5 * layer * s, mean_candidates=64 * layer, max_candidates=640 * layer,
                             table_seconds=0.5, token_accuracy=1.0, prompt_seconds=[1.25 * layer * s, 2.75 * layer * s],
                             pez_exact=0.0, pez_token_accuracy=0.125, pez_prompt_seconds=[37.5 * s, 42.5 * s],
                             pez_candidates=50, brute_s_per_token=3.0 * layer, brute_candidates=24576,
                             brute_position_seconds=[2.0 * layer, 4.0 * layer], speedup_vs_brute=30.0))
    return dict(hardware="CPU test, 1 threads", model="tiny-test", torch="2.x", date="2026-01-02T03:04:05",
                length=length, prompts=2, brute_positions=2, pez_steps=50, rows=rows,
                costs={"1": {"reference": 100.0}, "15": {"reference": 110.0}})


def dlmi_json() -> dict:
    """The shape benchmarks/dlmi.py writes."""
    rows, traces = [], []
    for n in (10, 80):
        for i, method in enumerate(DLMI_METHODS):
            for k in (1, 6):
                exact = method == "dlmi" and k == 1
                rows.append(dict(id=f"k{k}-0", k=k, honest=1.0 if exact else 0.1 * (i + 1) / k, exact=exact,
                                 soft=0.5, steps=12 if exact else 64, s_per_step=0.5, copied=0.0, prompt="p",
                                 output="o", method=method, N=n))
            decay = {"paper": 0.95, "dlmi": 0.9}.get(method)
            tau = [100.0 * decay ** s for s in range(64)] if decay else [1.0] * 64
            # dlmi refines after 48 relaxed steps; the paper's method only relaxes; a baseline's phase is its name.
            phase = {"dlmi": ["relaxed"] * 48 + ["refine"] * 16, "paper": ["relaxed"] * 64}.get(method, [method] * 64)
            traces.append(dict(method=method, N=n, keys=["k1-0"], tau=tau, phase=phase))
    return dict(hardware="CPU test, 1 threads", model="tiny-test", steps=64, batch_size=1, gcg_width=64,
                date="2026-01-02T03:04:05", rows=rows, tau_traces=traces)


def robustness_json() -> dict:
    """The shape benchmarks/robustness.py writes."""
    rows = []
    for layer, delta in ((1, 0.03), (15, 5.0)):
        settings = [("clean", 0.0, None)] + [(f"sigma {m:g} sigma*", m, None) for m in (0.5, 32, 4096)]
        settings += [(f"round {kind}", None, kind) for kind in ("float16", "int8")]
        for name, multiple, kind in settings:
            noise = (multiple or 0.01) * delta / 2
            recovery = {4096: 0.25, 32: 1.0 if layer == 1 else 0.75}.get(multiple, 1.0)
            rows.append(dict(layer=layer, setting=name, sigma_multiple=multiple, rounding=kind, delta=delta,
                             sigma_star=delta / 48, noise_norm=noise, recovery=recovery,
                             confidence_right=0.9, confidence_wrong=None, seconds_per_token=0.3))
    return dict(hardware="CPU test, 1 threads", budget=256, rows=rows)


def write_inputs(directory: Path) -> list[str]:
    paths = {"sipit": directory / "sipit.json", "sipit10": directory / "sipit10.json",
             "dlmi": directory / "dlmi.json", "robustness": directory / "robustness.json"}
    paths["sipit"].write_text(json.dumps(sipit_json()))
    paths["sipit10"].write_text(json.dumps(sipit_json(length=10, scale=0.5)))
    paths["dlmi"].write_text(json.dumps(dlmi_json()))
    paths["robustness"].write_text(json.dumps(robustness_json()))
    return ["--sipit", str(paths["sipit"]), str(paths["sipit10"]), "--dlmi", str(paths["dlmi"]),
            "--robustness", str(paths["robustness"])]


def test_report_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "load_pyplot", lambda: None)  # tables only: fast, and no matplotlib needed
    text = report.main(write_inputs(tmp_path) + ["--out", str(tmp_path / "out")]).read_text()
    assert "matplotlib is not installed" in text
    assert "Every number below comes from the JSON runs" in text
    assert "tiny-test" in text and "CPU test, 1 threads" in text and "64 steps per target" in text
    # Table A: SIP-It mean +- std of [1.25, 2.75] s, brute force extrapolated 20 x 3 s +- sqrt(20) x 1.41 s, PEZ.
    assert "Table A." in text and "| time per prompt (s), mean ± std |" in text
    assert "| 20 | 1 | SIP-It | 2 natural | 100% | 100% | 2.00 ± 1.06 | 0.10 | 64 (max 640) |" in text
    assert "| 20 | 1 | Brute force | 2 sampled positions of natural prompts | 100% | – | ≈ 60.0 ± 6.32 (extrapolated) | 3.00 |" in text
    assert "| 20 | 1 | HardPrompts (PEZ, 50 steps) | 2 natural | 0% | 12% | 40.0 ± 3.54 | 2.00 | 50 (one per step) |" in text
    # Table B: dlmi wins at k = 1 in 12 steps of 0.5 s.
    assert "Table B." in text and "| N | method | k | honest LCS | exact | steps to success | seconds to success |" in text
    assert "| 10 | DLMI (lit-inversion) | 1 | 1.00 | 1/1 | 12 | 6.00 |" in text
    assert "| 80 | GCG | 6 | 0.08 | 0/1 | – | – |" in text
    assert "| 15 | 5 | sigma 4096 sigma* |" in text and "![" not in text


def test_report_missing_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "load_pyplot", lambda: None)
    text = report.main(["--out", str(tmp_path)]).read_text()
    assert "No SIP-It input" in text and "No DLMI input" in text and "No robustness input" in text


def test_report_figures(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    text = report.main(write_inputs(tmp_path) + ["--out", str(out)]).read_text()
    for name in ("sipit_time", "dlmi_lcs", "dlmi_tau", "robustness"):
        assert (out / f"{name}.png").stat().st_size > 0
        assert f"]({name}.png)" in text  # relative to report.md
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    stale = out / "tensorboard" / "events.out.tfevents.0.old.0"
    stale.write_bytes(b"")
    report.main(write_inputs(tmp_path) + ["--out", str(out)])
    assert not stale.exists() and len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
