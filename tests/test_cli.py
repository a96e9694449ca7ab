"""The `lit-inversion` CLI: a YAML-configured run, one-line errors, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from lit_inversion.results import read_results
from tests.conftest import cli_command


BRUTE_FORCE_ONE_AT_A_TIME = """    method:
      class_path: lit_inversion.sipit.SipItConfig
      init_args: {policy: random, batch_size: 1}
"""


def _write_config(tmp_path: Path, model_dir: Path, prompts: Path, extra_model: str = "", layer: int = 2) -> Path:
    return _job_config(tmp_path, f"""
model:
  class_path: lit_inversion.sipit.SipItModule
  init_args:
    model_name_or_path: {model_dir}
{extra_model}
data:
  class_path: lit_inversion.sipit.HiddenStatesDataModule
  init_args: {{layer: {layer}, prompts_file: {prompts}}}
""")


def _job_config(tmp_path: Path, model_and_data: str) -> Path:
    config = tmp_path / "job.yaml"
    config.write_text(f"""
seed_everything: 0
results_path: {tmp_path}/results.jsonl
trainer:
  accelerator: cpu
  devices: 1
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path}/runs, name: tb}}
  callbacks:
    - class_path: lit_inversion.checkpointing.LastCheckpoint
      init_args: {{dirpath: {tmp_path}/ckpt}}
""" + model_and_data)
    return config


def _prompts(tmp_path: Path, count: int, length: int) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(3, 96, (length,), generator=g)) for _ in range(count)]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_fit_with_yaml_config(tmp_path, tiny_llama_dir):
    config = _write_config(tmp_path, tiny_llama_dir, _prompts(tmp_path, 3, 6))
    run = subprocess.run(cli_command() + ["fit", "--config", str(config)], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_results(tmp_path / "results.jsonl")
    assert [r["id"] for r in records] == ["prompts-1", "prompts-2", "prompts-3"]
    for record in records:
        assert record["exact_match"] is True and record["recovered_ids"] == record["true_ids"]
        assert set(record) >= {"id", "true_ids", "recovered_ids", "recovered_text", "exact_match", "token_accuracy",
                               "seconds", "candidates_tested", "max_distance"}
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert "exact" in run.stdout
    assert "SIP-It: 3 targets" in run.stdout and "exact match 3/3 (100%)" in run.stdout


def test_cli_bad_input_is_one_line(tmp_path, tiny_llama_dir):
    config = _write_config(tmp_path, tiny_llama_dir, _prompts(tmp_path, 1, 4), layer=9)
    run = subprocess.run(cli_command() + ["fit", "--config", str(config)], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert run.returncode == 2
    assert "lit-inversion: error: layer 9 is out of range for a model with 4 layers" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "results.jsonl").exists() or read_results(tmp_path / "results.jsonl") == []


def _kill_after(command: list[str], results: Path, records: int, timeout: float = 240) -> None:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= records:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_resume_after_sigkill(tmp_path, tiny_llama_dir):
    # Brute force with one candidate per forward makes each target slow enough to kill mid-run.
    count = 6
    config = _write_config(tmp_path, tiny_llama_dir, _prompts(tmp_path, count, 12),
                           extra_model=BRUTE_FORCE_ONE_AT_A_TIME, layer=4)
    command = cli_command() + ["fit", "--config", str(config), "--ckpt_path", "last"]
    results = tmp_path / "results.jsonl"
    for kill_point in (2, 4):
        _kill_after(command, results, kill_point)
    done_before = len(read_results(results))
    assert 4 <= done_before < count
    run = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_results(results)
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(f"prompts-{i}" for i in range(1, count + 1))  # each exactly once
    assert all(r["exact_match"] for r in records)
    lines = results.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # no cut or corrupt line survived


def _dlmi_config(tmp_path: Path, model_dir: Path, num_steps: int, checkpoint_every: int = 4) -> Path:
    import json as _json

    from lit_inversion.dlmi.batch import greedy_decode
    from lit_inversion.models import load_model

    loaded = load_model(str(model_dir))
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(4):  # targets that some 3-token prompt does produce
        prompt = torch.randint(3, 96, (1, 3), generator=g)
        out = greedy_decode(loaded.model, torch.cat([torch.tensor([[1]]), prompt], 1), 4)[0].tolist()
        lines.append(_json.dumps({"id": f"t{i}", "ids": out}))
    (tmp_path / "targets.jsonl").write_text("\n".join(lines) + "\n")
    return _job_config(tmp_path, f"""
model:
  class_path: lit_inversion.dlmi.DlmiModule
  init_args:
    model_name_or_path: {model_dir}
    prompt_length: 3
    num_steps: {num_steps}
    checkpoint_every: {checkpoint_every}
    method:
      class_path: lit_inversion.dlmi.DlmiConfig
      init_args: {{check_every: 4, compute_dtype: float32}}
data:
  class_path: lit_inversion.dlmi.OutputTargetsDataModule
  init_args: {{targets_file: {tmp_path}/targets.jsonl, batch_size: 2}}
""")


def run_dlmi_cli(config: Path, *extra: str) -> tuple[list[dict], str]:
    """Run a DLMI job config; check it wrote one full record per target t0..t3; return them and stdout."""
    run = subprocess.run(cli_command() + ["fit", "--config", str(config), *extra],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_results(config.parent / "results.jsonl")
    assert sorted(r["id"] for r in records) == ["t0", "t1", "t2", "t3"]
    for r in records:
        assert set(r) >= {"id", "target_ids", "prompt_ids", "prompt_text", "output_ids", "exact_match", "lcs_ratio",
                          "soft_lcs_ratio", "steps", "seconds", "prompt_target_lcs"}
    return records, run.stdout


@pytest.mark.slow
def test_dlmi_cli_run_writes_records_and_tensorboard(tmp_path, tiny_llama_dir):
    records, _ = run_dlmi_cli(_dlmi_config(tmp_path, tiny_llama_dir, num_steps=24), "--model.num_steps", "32")
    for r in records:
        assert len(r["prompt_ids"]) == 3 and len(r["output_ids"]) == len(r["target_ids"]) == 4
        assert 1 <= r["steps"] <= 32
        assert r["exact_match"] == (r["output_ids"] == r["target_ids"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    # The default search has no temperature, so no dlmi/mean_tau (the relaxed phase logs it).
    assert {"dlmi/loss", "dlmi/soft_lcs", "dlmi/honest_lcs", "dlmi/forwards", "dlmi/gradient_passes"} <= set(events.Tags()["scalars"])
    assert "dlmi/mean_tau" not in events.Tags()["scalars"]
    assert "dlmi/finished_targets/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
def test_dlmi_resume_after_sigkill_continues_the_targets_in_flight(tmp_path, tiny_llama_dir):
    # Targets long enough (160 steps) that a kill right after the first mid-target checkpoint lands mid-target.
    config = _dlmi_config(tmp_path, tiny_llama_dir, num_steps=160, checkpoint_every=2)
    # The relaxed (Adam) phase only, so the optimiser state has to survive the kill.
    command = cli_command() + ["fit", "--config", str(config), "--ckpt_path", "last", "--model.method.check_every", "1000",
                               "--model.method.refine_fraction", "0.0"]
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # last.ckpt is replaced atomically: safe to read
        if ckpt.exists() and torch.load(ckpt, weights_only=False).get("dlmi_slots"):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = torch.load(ckpt, weights_only=False)
    slots = saved.get("dlmi_slots")
    assert slots and len(slots) == 2, "no mid-target state was checkpointed"  # both slots of --data.batch_size 2
    steps_at_kill = {name: slot["steps"] for name, slot in slots.items()}
    for slot in slots.values():
        adam = slot["state"]["_extra_state"]["optimizer"]["state"]
        assert adam and all("exp_avg" in moments for moments in adam.values())  # Adam moments travel too
    run = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_results(tmp_path / "results.jsonl")
    assert sorted(r["id"] for r in records) == ["t0", "t1", "t2", "t3"]
    assert min(steps_at_kill.values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs(tmp_path, tiny_llama_dir, precision):
    """SIP-It stays exact under the trainer's autocast (it verifies in float32); DLMI runs and checks honestly."""
    sipit = tmp_path / "sipit"
    sipit.mkdir()
    run = subprocess.run(cli_command() + ["fit", "--config", str(_write_config(sipit, tiny_llama_dir, _prompts(sipit, 3, 8))),
                                          "--trainer.precision", precision], capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(r["exact_match"] for r in read_results(sipit / "results.jsonl"))
    dlmi = tmp_path / "dlmi"
    dlmi.mkdir()
    run = subprocess.run(cli_command() + ["fit", "--config", str(_dlmi_config(dlmi, tiny_llama_dir, num_steps=24)),
                                          "--trainer.precision", precision], capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_results(dlmi / "results.jsonl")
    assert len(records) == 4
    for r in records:  # the recorded output is what the model really decodes (float32) from the prompt
        assert r["exact_match"] == (r["output_ids"] == r["target_ids"])


@pytest.mark.slow
def test_dlmi_killed_at_random_points_gives_the_uninterrupted_results(tmp_path, tiny_llama_dir):
    """Several SIGKILLs at random moments; each restart resumes (Adam, noise, refinement state) and the
    final results equal an uninterrupted run's, every target once, no corrupt line."""
    import random

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    outputs = {}
    for directory in (reference, killed):
        directory.mkdir()
        config = _dlmi_config(directory, tiny_llama_dir, num_steps=60, checkpoint_every=2)
        # Half relaxed (Adam state and noise must survive a kill), half swap search (its state too).
        command = cli_command() + ["fit", "--config", str(config), "--ckpt_path", "last", "--model.method.check_every", "1000",
                                   "--model.method.refine_fraction", "0.5"]
        if directory == killed:
            rng = random.Random(7)
            ckpt = directory / "ckpt" / "last.ckpt"
            for _ in range(3):
                proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
                seen = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
                deadline = time.time() + 240
                while time.time() < deadline and proc.poll() is None:  # a fresh mid-target checkpoint
                    if ckpt.exists() and ckpt.stat().st_mtime_ns != seen:
                        break
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.3))  # then a random moment of the run
                assert proc.poll() is None, "the run ended before the kill: give its targets more steps"
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                assert ckpt.exists(), "killed before any checkpoint was on disk"
                done = read_results(directory / "results.jsonl") if (directory / "results.jsonl").exists() else []
                assert len(done) < 4
        run = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = (directory / "results.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)
        outputs[directory] = {r["id"]: {k: v for k, v in r.items() if k != "seconds"}
                              for r in read_results(directory / "results.jsonl")}
        assert len(outputs[directory]) == len(lines) == 4  # every target exactly once
    assert outputs[killed] == outputs[reference]


def test_method_is_a_typed_config_on_the_cli(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """`--model.method GcgConfig --model.method.<field>` picks the method's config and sets its fields;
    the stable shortcuts set the method's own fields; another method's option is refused by name."""
    import sys

    import yaml

    monkeypatch.setattr(sys, "argv", ["lit-inversion"])  # pytest's own arguments are not the CLI's
    from lit_inversion.cli import main
    from lit_inversion.dlmi import DlmiModule, GcgConfig

    config = _dlmi_config(tmp_path, tiny_llama_dir, num_steps=8)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.method", "GcgConfig", "--model.method.search_width", "8",
              "--model.method.fill_token", "x", "--print_config"])
    assert exit_info.value.code in (0, None)
    method = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["method"]
    assert method["class_path"].endswith("GcgConfig")
    assert method["init_args"]["search_width"] == 8 and method["init_args"]["fill_token"] == "x"
    assert "refine_candidates" not in method["init_args"]  # no DLMI-only fields on GCG
    assert method["init_args"]["check_every"] == 4  # shared options the config set carry over to the new method

    module = DlmiModule(method=GcgConfig(search_width=8), prompt_length=5, num_steps=7)
    assert module.config == GcgConfig(search_width=8, prompt_length=5, num_steps=7)
    assert module.hparams.method == GcgConfig(search_width=8)

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.method", "GcgConfig", "--model.method.refine_topk", "3"])
    assert exit_info.value.code == 2
    assert "refine_topk" in capsys.readouterr().err


def test_method_help_shows_each_fields_docstring(capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["lit-inversion"])
    from lit_inversion.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--model", "lit_inversion.dlmi.DlmiModule", "--model.method.help", "GcgConfig"])
    out = capsys.readouterr().out
    assert "--method.search_width" in out and "Candidate prompts scored per step" in out


@pytest.mark.slow
def test_dlmi_cli_accepts_the_copy_seed(tmp_path, tiny_llama_dir):
    records, _ = run_dlmi_cli(_dlmi_config(tmp_path, tiny_llama_dir, num_steps=8), "--model.init", "repeat",
                              "--model.prompt_length", "10")
    assert all(len(r["prompt_ids"]) == 10 for r in records)
    # the copy seed repeats the target: its prompts share most of it
    assert max(r["prompt_target_lcs"] for r in records) >= 0.75


@pytest.mark.slow
def test_sigterm_saves_the_state_and_exits_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, tiny_llama_dir):
    """SIGTERM (a scheduler's preemption): the run stops within seconds, non-zero, with one line on stderr,
    last.ckpt holds the targets in flight; `--ckpt_path last` then finishes with the uninterrupted results."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    outputs = {}
    for directory in (reference, stopped):
        directory.mkdir()
        config = _dlmi_config(directory, tiny_llama_dir, num_steps=60, checkpoint_every=1000)
        command = cli_command() + ["fit", "--config", str(config), "--ckpt_path", "last",
                                   "--model.method.check_every", "1000", "--model.method.refine_fraction", "0.5"]
        if directory == stopped:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
            chunks: list[bytes] = []  # the progress bar (stdout) redraws with \r, no newline: read bytes as they come
            reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stdout.fileno(), 4096), b"")),
                                      daemon=True)
            reader.start()
            deadline = time.time() + 240
            # Wait for the progress bar to pass step 5: the targets are mid-flight (only SIGTERM saves last.ckpt).
            while time.time() < deadline and proc.poll() is None and not re.search(
                    rb"steps:[^\r\n]*?\|\s*([5-9]|\d\d+)/", b"".join(chunks)):
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before SIGTERM: give its targets more steps"
            assert not (directory / "ckpt" / "last.ckpt").exists()
            sent = time.time()
            proc.send_signal(signal.SIGTERM)
            stderr = proc.communicate(timeout=60)[1].decode()
            reader.join(timeout=10)
            assert time.time() - sent < 10, "SIGTERM took too long to stop the run"
            assert proc.returncode == 128 + signal.SIGTERM
            assert "stopped by SIGTERM" in stderr and "--ckpt_path last" in stderr and "Traceback" not in stderr
            saved = torch.load(directory / "ckpt" / "last.ckpt", weights_only=False)
            assert saved["dlmi_slots"] and all(s["steps"] > 0 for s in saved["dlmi_slots"].values())
        run = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[directory] = {r["id"]: {k: v for k, v in r.items() if k != "seconds"}
                              for r in read_results(directory / "results.jsonl")}
        assert len(outputs[directory]) == 4
    assert outputs[stopped] == outputs[reference]
