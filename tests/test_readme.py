"""The README is a contract: its commands parse, the options it names exist, its Python examples run,
and its quick start prints no warnings."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from lit_inversion.cli import main
from tests.conftest import ROOT, add_chat_template, cli_command, make_tiny_model

README = (ROOT / "README.md").read_text(encoding="utf-8")
CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)


def code_blocks(language: str) -> list[str]:
    return [body for lang, body in CODE_BLOCK.findall(README) if lang == language]


def readme_commands() -> list[list[str]]:
    """Every `lit-inversion ...` invocation in a bash block, as the arguments after the program."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line):
                words = shlex.split(part.split("#")[0])
                for i, word in enumerate(words):
                    if word.endswith("lit-inversion") or (word == "-m" and words[i + 1:i + 2] == ["lit_inversion"]):
                        commands.append(words[i + (1 if word.endswith("lit-inversion") else 2):])
                        break
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_both_methods_commands():
    configs = {c[c.index("--config") + 1] for c in COMMANDS if "--config" in c}
    assert {"configs/sipit.yaml", "configs/dlmi.yaml"} <= configs
    assert len(COMMANDS) >= 6


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_every_readme_command_parses(args, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(args + ["--print_config"])
    assert exit_.value.code in (0, None), out.getvalue()[-2000:]
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


@pytest.fixture(autouse=True)
def _program_name_only(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-inversion"])  # main(args) is how the shell would call it


def _class_options(kind: str, class_path: str) -> set[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", f"--{kind}.help", class_path])
    return set(re.findall(rf"--{kind}\.(\w+)", out.getvalue()))


def test_every_option_the_readme_names_exists():
    options: dict[str, set[str]] = {"model": set(), "data": set()}
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        loaded = yaml.safe_load(config.read_text())
        for kind in options:
            options[kind] |= _class_options(kind, loaded[kind]["class_path"])
    named = set(re.findall(r"--(model|data)\.(\w+)", README))
    missing = sorted(f"--{kind}.{name}" for kind, name in named if name not in options[kind])
    assert not missing, f"the README names options no config class accepts: {missing}"
    assert ("model", "prepend_bos") in named and ("data", "layer") in named


def test_every_method_option_the_readme_names_exists():
    from dataclasses import fields

    from lit_inversion.dlmi.config import CONFIGS
    from lit_inversion.sipit import PezConfig, SipItConfig

    configs = [SipItConfig, PezConfig, *CONFIGS.values()]
    known = {f.name for c in configs for f in fields(c)} | {"help"}
    named = set(re.findall(r"--model\.method\.(\w+)", README))
    assert named and not named - known, f"the README names method options no config has: {sorted(named - known)}"
    classes = set(re.findall(r"--model\.method (\w+)", README)) | set(re.findall(r"--model\.method\.help (\w+)", README))
    assert classes and classes <= {c.__name__ for c in configs}


def test_the_cli_reference_is_generated_from_the_code():
    from lit_inversion.reference import reference

    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == reference(), \
        "docs/cli.md is stale: run python -m lit_inversion.reference > docs/cli.md"


@pytest.fixture(scope="module")
def tiny_deep_model(tmp_path_factory):
    """Deep enough for the README's layer-15 example, small enough to run it in seconds."""
    from lit_inversion.models import load_model

    return load_model(str(add_chat_template(make_tiny_model(tmp_path_factory.mktemp("tiny-deep"), "llama", layers=16))))


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_examples_run_on_a_tiny_model(index, tiny_deep_model, monkeypatch):
    import lit_inversion

    block = code_blocks("python")[index]
    # The examples load the default model; here `load_model()` hands them the tiny one instead.
    monkeypatch.setattr(lit_inversion, "load_model", lambda *a, **k: tiny_deep_model)
    namespace = {"lm": tiny_deep_model}
    exec(compile(block, f"README python block {index}", "exec"), namespace)
    if "invert_hidden_states" in block:
        result = namespace["result"]
        assert result.recovered_ids and all(result.verified)
    if "invert_output" in block:
        assert 0.0 <= namespace["result"].lcs_ratio <= 1.0


def _quick_start() -> list[str]:
    sipit = [c for c in COMMANDS if c[:3] == ["fit", "--config", "configs/sipit.yaml"]]
    return sipit[0]


NOISE = re.compile(r"warn|deprecat|tip:", re.I)


def test_quick_start_is_quiet_and_a_changed_rerun_is_refused(tmp_path, tiny_deep_model, tiny_llama_dir):
    """The quick-start command (on a tiny model) prints results and a summary, no warnings; rerun with
    another layer into the same results file, it stops with one error line instead of doing nothing."""
    args = _quick_start() + ["--model.model_name_or_path", str(tiny_llama_dir), "--data.layer", "2",
                             "--data.num_tokens", "6", "--results_path", str(tmp_path / "results.jsonl"),
                             "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
                             str(tmp_path / "tb"), "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt")]
    run = subprocess.run(cli_command() + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    noisy = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noisy, noisy
    assert "exact match" in run.stdout and "SIP-It:" in run.stdout

    rerun = subprocess.run(cli_command() + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0
    assert "nothing to do: all" in rerun.stdout and "No training batches" not in rerun.stdout + rerun.stderr

    other_layer = subprocess.run(cli_command() + args + ["--data.layer", "1"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=600)
    assert other_layer.returncode == 2
    lines = [line for line in other_layer.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("lit-inversion: error: ") and "layer=2" in lines[-1] and "--results_path" in lines[-1]
    assert "Traceback" not in other_layer.stderr


@pytest.mark.slow
def test_verbose_brings_the_library_messages_back(tmp_path, tiny_llama_dir):
    args = _quick_start() + ["--model.model_name_or_path", str(tiny_llama_dir), "--data.layer", "1",
                             "--data.num_tokens", "3", "--data.limit", "1", "--results_path",
                             str(tmp_path / "results.jsonl"), "--trainer.logger", "false",
                             "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"), "--verbose"]
    run = subprocess.run(cli_command() + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GPU available" in run.stdout + run.stderr


def test_tests_never_write_to_the_users_cache(tiny_llama, test_cache, monkeypatch):
    """The tests' tables go to their own cache dir (the user's may hold real, expensive tables)."""
    from lit_inversion.cache import cache_dir
    from lit_inversion.sipit.table import first_position_table
    from lit_inversion.states import LayerProbe

    assert cache_dir() == test_cache
    monkeypatch.delenv("LIT_INVERSION_CACHE")
    users = cache_dir()
    before = sorted(users.rglob("*")) if users.exists() else []
    monkeypatch.setenv("LIT_INVERSION_CACHE", str(test_cache))
    with LayerProbe(tiny_llama, 1) as probe:
        first_position_table(probe, [1])
    assert list((test_cache / "tables").glob("*-layer1.pt"))
    assert (sorted(users.rglob("*")) if users.exists() else []) == before
