"""Several processes: disjoint shards, no gradient averaging, no padding by repetition, one results file."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lit_inversion.distributed import finished_ids, merge_rank_results, shard
from lit_inversion.results import ResultsWriter, read_results
from tests.conftest import cli_command
from tests.test_cli import _dlmi_config, _env, _job_config, _prompts, _write_config

VOLATILE = {"seconds"}


def test_shard_is_disjoint_and_padded_with_empty_slots():
    items = list(range(5))
    shards = [shard(items, rank, 2) for rank in range(2)]
    assert shards == [[0, 2, 4], [1, 3, None]]
    assert sorted(i for s in shards for i in s if i is not None) == items
    assert shard([], 0, 3) == []


def test_shard_by_size_balances_the_load():
    items = [1, 1, 9, 1, 8, 1, 1, 1]  # round robin alone would give rank 0 both long items
    shards = [shard(items, rank, 2, size=lambda x: x) for rank in range(2)]
    assert sorted(i for s in shards for i in s if i is not None) == sorted(items)
    loads = [sum(i for i in s if i is not None) for s in shards]
    assert abs(loads[0] - loads[1]) <= 1 and len(shards[0]) == len(shards[1]) == 4


def test_ddp_names_build_independent_ranks_with_a_long_timeout():
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    from lit_inversion.distributed import INVERSION_TIMEOUT, IndependentRanks, use_for_ddp

    use_for_ddp()
    for name in ("ddp", "ddp_spawn", "inversion_ddp"):
        strategy = StrategyRegistry.get(name)
        assert type(strategy) is IndependentRanks and strategy._timeout == INVERSION_TIMEOUT
    assert StrategyRegistry.get("ddp_spawn")._start_method == "spawn"
    strategy = IndependentRanks()
    strategy.model = sentinel = object()
    strategy.configure_ddp()  # no DistributedDataParallel wrapper, on any device
    assert strategy.model is sentinel and isinstance(strategy, DDPStrategy)


def test_a_plain_ddp_strategy_is_rejected_with_the_fix():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from lit_inversion.distributed import IndependentRanks, check_strategy
    from lit_inversion.errors import InversionError

    with pytest.raises(InversionError, match="strategy='inversion_ddp'"):
        check_strategy(SimpleNamespace(strategy=DDPStrategy()))
    check_strategy(SimpleNamespace(strategy=IndependentRanks()))


def test_distributed_patches_no_private_lightning_attribute():
    import ast
    import inspect

    import lit_inversion.distributed as module

    tree = ast.parse(inspect.getsource(module))
    assigned = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Attribute)]
    assert assigned == [], "distributed.py assigns attributes of other objects"


def test_merge_rank_results_keeps_each_id_once_and_is_rerunnable(tmp_path):
    main = tmp_path / "results.jsonl"
    ResultsWriter(main).write({"id": "a", "v": 0})
    ResultsWriter(f"{main}.rank0").write({"id": "b", "v": 1})
    part = ResultsWriter(f"{main}.rank1")
    part.write({"id": "a", "v": 9})  # already merged by an earlier, killed merge
    part.write({"id": "c", "v": 2})
    assert finished_ids(main) == {"a", "b", "c"}
    assert merge_rank_results(main) == 2
    assert [(r["id"], r["v"]) for r in read_results(main)] == [("a", 0), ("b", 1), ("c", 2)]
    assert not list(tmp_path.glob("results.jsonl.rank*"))
    assert merge_rank_results(main) == 0


def _run(config: Path, *extra: str) -> subprocess.CompletedProcess:
    # One thread per process in both runs, so float reductions (and DLMI's choices) agree bit for bit.
    run = subprocess.run(cli_command() + ["fit", "--config", str(config), *extra], capture_output=True, text=True,
                         env=dict(_env(), OMP_NUM_THREADS="1"), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _by_id(path: Path) -> dict[str, dict]:
    records = read_results(path)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"a target was inverted twice: {ids}"
    return {r["id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in records}


# Lightning's sampler is switched back on: it would pad the odd shard by repeating a target.
TWO_PROCESSES = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.use_distributed_sampler", "true")


def two_process_matches_one(tmp_path: Path, model_dir: Path, method: str, accelerator: str = "cpu") -> None:
    """One process and two (gloo on the CPU, NCCL on GPUs) give the same records, merged into one file."""
    single, double = tmp_path / "single", tmp_path / "double"
    for directory in (single, double):
        directory.mkdir()
        if method == "sipit":  # 5 targets: an odd split
            config = _write_config(directory, model_dir, _prompts(directory, 5, 6))
        else:  # 5 targets in batches of 2 + 2 + 1: an odd split of whole batches
            config = _dlmi_config(directory, model_dir, num_steps=24)
            lines = (directory / "targets.jsonl").read_text().splitlines()
            (directory / "targets.jsonl").write_text("\n".join(lines + [lines[0].replace('"t0"', '"t4"')]) + "\n")
        device = ("--trainer.accelerator", accelerator)
        run = _run(config, *device) if directory == single else _run(config, *device, *TWO_PROCESSES)
        assert "results:" in run.stdout
    one, two = _by_id(single / "results.jsonl"), _by_id(double / "results.jsonl")
    assert sorted(two) == sorted(one) and len(one) == 5
    assert two == one  # same per-target results: nothing was averaged across ranks
    assert not list(double.glob("results.jsonl.rank*"))  # merged into one file


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sipit", "dlmi"])
def test_two_gloo_processes_match_one_process(tmp_path, tiny_llama_dir, method):
    two_process_matches_one(tmp_path, tiny_llama_dir, method)


@pytest.mark.slow
def test_killed_two_process_run_resumes_in_one_process(tmp_path, tiny_llama_dir):
    """Rank files left by a killed multi-process run count as finished, and get merged."""
    config = _write_config(tmp_path, tiny_llama_dir, _prompts(tmp_path, 4, 6))
    main = tmp_path / "results.jsonl"
    _run(config, "--data.limit", "2")
    first, second = read_results(main)
    main.unlink()
    # What a killed 2-process run leaves: each rank's finished targets in its own part file.
    ResultsWriter(f"{main}.rank0").write(dict(first, marker="rank0"))
    ResultsWriter(f"{main}.rank1").write(dict(second, marker="rank1"))
    run = _run(config)
    records = read_results(main)
    assert sorted(r["id"] for r in records) == [f"prompts-{i}" for i in range(1, 5)]
    assert {r["id"]: r["marker"] for r in records if "marker" in r} == {"prompts-1": "rank0", "prompts-2": "rank1"}
    assert not list(tmp_path.glob("results.jsonl.rank*"))
    assert all(r["exact_match"] for r in records) and "exact match 4/4" in run.stdout


# ----- two nodes on one machine --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(config: Path, node_rank: int, port: int, *extra: str) -> subprocess.Popen:
    """One Lightning "node" of one process, as SLURM or torchrun would start it on another machine."""
    env = dict(_env(), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node_rank))
    command = cli_command() + ["fit", "--config", str(config), "--trainer.num_nodes", "2", "--trainer.devices", "1",
                               "--trainer.strategy", "ddp", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _two_nodes(config: Path, *extra: str) -> None:
    port = _free_port()
    nodes = [_node(config, rank, port, *extra) for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]


def _states_file(tmp_path: Path, model_dir: Path, count: int, length: int) -> tuple[Path, dict[str, list[int]]]:
    from lit_inversion.models import load_model
    from lit_inversion.sipit.api import capture_hidden_states

    loaded = load_model(str(model_dir))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 96, (length,), generator=g).tolist() for _ in range(count)]
    states = torch.stack([capture_hidden_states(p, model=loaded, layer=4) for p in prompts])
    path = tmp_path / "captured.pt"
    torch.save({"states": states}, path)
    return path, {f"captured-{i}": p for i, p in enumerate(prompts)}


@pytest.mark.slow
def test_two_nodes_on_localhost_invert_a_states_file_and_resume_after_a_node_is_killed(tmp_path, tiny_llama_dir):
    count = 8
    states, truth = _states_file(tmp_path, tiny_llama_dir, count, 10)
    config = _job_config(tmp_path, f"""
model:
  class_path: lit_inversion.sipit.SipItModule
  init_args:
    model_name_or_path: {tiny_llama_dir}
    method: {{class_path: lit_inversion.sipit.SipItConfig, init_args: {{policy: random, batch_size: 1}}}}
data:
  class_path: lit_inversion.sipit.HiddenStatesDataModule
  init_args: {{layer: 4, states_file: {states}}}
""")
    results = tmp_path / "results.jsonl"
    port = _free_port()
    nodes = [_node(config, rank, port) for rank in (0, 1)]
    rank1 = Path(f"{results}.rank1")
    deadline = time.time() + 300
    while time.time() < deadline and nodes[1].poll() is None:  # node 1 has finished one target: kill it
        if rank1.exists() and rank1.read_bytes().count(b"\n") >= 1:
            nodes[1].send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    nodes[1].wait(timeout=60)
    assert nodes[1].returncode == -signal.SIGKILL, "node 1 finished before it could be killed"
    try:  # node 0 may finish its own shard; it cannot merge without node 1, so it fails or waits
        nodes[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        nodes[0].send_signal(signal.SIGKILL)
        nodes[0].wait(timeout=60)
    done = [r["id"] for p in (results, Path(f"{results}.rank0"), rank1) for r in read_results(p)]
    assert 1 <= len(done) < count and len(done) == len(set(done))

    _two_nodes(config, "--ckpt_path", "last")  # both nodes again, as a scheduler would requeue the job
    records = _by_id(results)  # each id once
    assert sorted(records) == sorted(truth)
    assert all(r["exact_match"] is None and r["recovered_ids"] == truth[i] for i, r in records.items())
    assert not list(tmp_path.glob("results.jsonl.rank*"))


@pytest.mark.slow
def test_two_nodes_on_localhost_invert_a_targets_file(tmp_path, tiny_llama_dir):
    config = _dlmi_config(tmp_path, tiny_llama_dir, num_steps=16)
    lines = (tmp_path / "targets.jsonl").read_text().splitlines()
    (tmp_path / "targets.jsonl").write_text("\n".join(lines + [lines[0].replace('"t0"', '"t4"')]) + "\n")
    _two_nodes(config)
    records = _by_id(tmp_path / "results.jsonl")
    assert sorted(records) == [f"t{i}" for i in range(5)]
    assert not list(tmp_path.glob("results.jsonl.rank*"))
