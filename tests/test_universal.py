"""Universal prompts: one prompt span for a group of targets, each member in its own context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import make_tiny_model
from lit_inversion.dlmi import DlmiConfig, DlmiModule, OutputTargetsDataModule, ReinforceConfig, invert_output
from lit_inversion.dlmi.context import Context, render_context
from lit_inversion.dlmi.data import OutputGroup, OutputTarget, group_targets, read_output_targets
from lit_inversion.dlmi.pool import TargetPool
from lit_inversion.dlmi.universal import GroupBatch, GroupSearch, run_groups
from lit_inversion.errors import InversionError
from lit_inversion.models import load_model
from lit_inversion.results import read_results

EOS = 2
# Random tiny models reply mostly to the last tokens they see: the members' contexts are text before the
# span, and SPAN is one whose replies differ between the first two (found by search, see `_group`).
PREFIXES = ["w20", "w22 w23 w40 w50", "w24 w25"]
SPAN = [84, 87, 32]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-untied"), "llama-untied", seed=4)


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load_model(str(chat_dir))


def _context(loaded, prefix: str) -> Context:
    return render_context(loaded.tokenizer, loaded.bos_id, prefix=prefix)


def _plain_decode(loaded, input_ids: list[int], length: int) -> list[int]:
    ids = torch.tensor([input_ids])
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, do_sample=False,
                                pad_token_id=EOS)
    return out[0, ids.shape[1]:].tolist()


def _group(loaded, prefixes=PREFIXES[:2], span=SPAN, length=4, name="g") -> OutputGroup:
    """A group that `span` provably solves: each member's target is its reply to the span in its own context."""
    members = []
    for i, prefix in enumerate(prefixes):
        context = _context(loaded, prefix)
        members.append(OutputTarget(f"m{i}", _plain_decode(loaded, context.input_ids(span), length), context, name))
    return OutputGroup(name, members)


CONFIG = dict(prompt_length=3, num_steps=80, check_every=2, compute_dtype="float32", max_prompt_target_lcs=1.0)


def test_a_joint_group_is_solved_by_one_prompt_that_plain_transformers_confirms(chat):
    group = _group(chat)
    assert group.members[0].ids != group.members[1].ids  # two different replies
    (result,) = run_groups(chat, [group], DlmiConfig(**CONFIG))
    assert result.exact_match and result.lcs_ratio == 1.0
    for pair, member in zip(result.pairs, group.members):
        assert pair.input_ids == member.context.input_ids(result.prompt_ids)  # every pair from the one prompt
        assert _plain_decode(chat, pair.input_ids, len(pair.target_ids)) == pair.output_ids == member.ids
        assert pair.joined_step == 0 and pair.solved_step is not None


def test_progressive_mode_adds_the_next_member_once_the_first_is_exact(chat):
    group = _group(chat, PREFIXES, span=[29, 10, 84])
    (result,) = run_groups(chat, [group], DlmiConfig(**CONFIG, group_mode="progressive"))
    first, second, third = result.pairs
    assert result.exact_match and result.mode == "progressive"
    # The second member joins once the first is solved; the third had not joined when the prompt solved all.
    assert first.joined_step == 0 and first.solved_step is not None and second.joined_step >= first.solved_step > 0
    assert third.joined_step is None and third.solved_step >= second.joined_step
    assert result.mode == "progressive"


def test_mellowmax_weights_the_worst_member_most(chat):
    batch = GroupBatch(chat, _group(chat), DlmiConfig(**CONFIG, group_loss="mellowmax", mellowmax_omega=2.0))
    search: GroupSearch = batch.search
    losses = torch.tensor([1.0, 3.0])
    weights = search._weights(losses)
    assert weights[1] > weights[0] and float(weights.sum()) == pytest.approx(1.0)
    keys = search._combined(torch.tensor([[1], [1]]), losses[:, None])
    mellow = (torch.logsumexp(2.0 * losses, 0) - torch.log(torch.tensor(2.0))) / 2.0
    assert float(keys[0]) == pytest.approx(6 * 1e6 + float(mellow), rel=1e-9)  # 4 + 4 - 1 - 1 wrong positions
    (result,) = run_groups(chat, [_group(chat)], DlmiConfig(**CONFIG, group_loss="mellowmax"))
    assert result.exact_match


def test_invert_output_with_group_returns_one_prompt_for_all(chat):
    group = _group(chat)
    targets = [{"id": m.id, "target": m.ids, "prefix": p} for m, p in zip(group.members, PREFIXES)]
    result = invert_output(targets, model=chat, group=True, **CONFIG)
    assert result.exact_match and [p.id for p in result.pairs] == ["m0", "m1"]


def test_a_group_file_runs_through_lightning_with_one_record_per_group(tmp_path, chat_dir, chat, capsys):
    rows = []
    for name, span in (("g1", SPAN), ("g2", [57, 91, 86])):
        for member, prefix in zip(_group(chat, span=span, name=name).members, PREFIXES):
            rows.append({"id": f"{name}-{member.id}", "group": name, "ids": member.ids, "prefix": prefix})
    rows.append({"id": "alone", "target": "w80 w81"})
    path = tmp_path / "groups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = DlmiModule(str(chat_dir), results_path=str(tmp_path / "results.jsonl"), prompt_length=3, num_steps=60,
                        method=DlmiConfig(check_every=2, compute_dtype="float32", max_prompt_target_lcs=1.0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path,
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=OutputTargetsDataModule(targets_file=str(path), batch_size=2))
    records = {r["id"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert set(records) == {"g1", "g2", "alone"}
    for name in ("g1", "g2"):
        record = records[name]
        assert [p["id"] for p in record["pairs"]] == [f"{name}-m0", f"{name}-m1"]
        for pair in record["pairs"]:
            decoded = _plain_decode(chat, pair["input_ids"], len(pair["target_ids"]))
            assert decoded == pair["output_ids"] and pair["exact_match"] == (decoded == pair["target_ids"])
        assert record["exact_match"] == all(p["exact_match"] for p in record["pairs"])
    out = capsys.readouterr().out
    solved = sum(records[n]["exact_match"] for n in ("g1", "g2"))
    assert f"2 groups, solved {solved}/2" in out and "mean per-pair honest LCS" in out


def test_a_saved_group_resumes_where_it_was(chat):
    """A checkpointed group slot continues exactly: 6 steps, a saved state, 6 more = 12 uninterrupted."""
    config = DlmiConfig(**{**CONFIG, "num_steps": 12, "check_every": 4})
    members = [OutputTarget(f"m{i}", [10 + i, 20 + i, 30 + i, 40 + i, 50 + i, 60 + i], _context(chat, p), "hard")
               for i, p in enumerate(PREFIXES[:2])]
    group = OutputGroup("hard", members)

    def finish(pool: TargetPool) -> dict:
        while not pool.empty:
            for name, result in pool.step().finished:
                return result.to_dict() | {"seconds": None}
        raise AssertionError("the group never finished")

    whole = TargetPool(chat, config, 1)
    whole.enqueue([group])
    first = TargetPool(chat, config, 1)
    first.enqueue([group])
    for _ in range(6):
        first.step()
    saved = first.state_dict()
    assert saved["hard"]["steps"] == 6
    resumed = TargetPool(chat, config, 1)
    resumed.load_state_dict(saved)
    resumed.enqueue([group])
    resumed.fill()
    assert resumed.running[0].steps == 6
    expected, got = finish(whole), finish(resumed)
    assert got == expected and got["steps"] == 12


def _rows(tmp_path, rows) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_groups_get_one_line_errors_naming_the_group(tmp_path, chat):
    one = read_output_targets(_rows(tmp_path, [{"id": "a", "group": "solo", "ids": [5, 6]}]), chat)
    with pytest.raises(InversionError, match="group 'solo' has 1 member: a group needs at least 2 targets"):
        GroupBatch(chat, group_targets(one)[0], DlmiConfig(**CONFIG))
    with pytest.raises(InversionError, match="group 'g' repeats the member id 'a'"):
        read_output_targets(_rows(tmp_path, [{"id": "a", "group": "g", "ids": [5]}, {"id": "a", "group": "g", "ids": [6]}]),
                            chat)
    long = read_output_targets(_rows(tmp_path, [{"id": "a", "group": "big", "ids": [5]},
                                                {"id": "b", "group": "big", "prefix": " ".join(["w9"] * 60), "ids": [6]}]), chat)
    with pytest.raises(InversionError, match="group 'big', member 'b': context \\+ prompt \\+ target is 65 tokens"):
        GroupBatch(chat, group_targets(long)[0], DlmiConfig(**CONFIG))
    clash = read_output_targets(_rows(tmp_path, [{"id": "g", "ids": [5]}, {"id": "a", "group": "g", "ids": [6]}]), chat)
    with pytest.raises(InversionError, match="group 'g' has the id of a target outside it"):
        group_targets(clash)
    with pytest.raises(InversionError, match="groups .universal prompts. need a swap-search method"):
        GroupBatch(chat, _group(chat), ReinforceConfig(prompt_length=3))
    with pytest.raises(InversionError, match="group=True needs a list of at least 2 targets"):
        invert_output("w5 w6", model=chat, group=True)


WORKER = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {root!r})
from tests.test_universal import group_run
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
result = group_run({model!r}, dist.group.WORLD)
if dist.get_rank() == 0:
    open({out!r}, "w").write(json.dumps(result))
dist.destroy_process_group()
"""


def group_run(model_dir: str, process_group=None) -> list[dict]:
    """One group of three members (a rank scores one or two of them), 10 steps at most, joint and
    progressive (where the second rank's members join later)."""
    from dataclasses import asdict

    loaded = load_model(model_dir)
    group = _group(loaded, PREFIXES, span=[27, 48, 60], length=6)
    out = []
    for mode in ("joint", "progressive"):
        config = DlmiConfig(prompt_length=3, num_steps=10, check_every=3, compute_dtype="float32", seed=5,
                            group_mode=mode)
        (result,) = run_groups(loaded, [group], config, process_group)
        out.append({k: v for k, v in asdict(result).items() if k != "seconds"})
    return out


@pytest.mark.slow
def test_two_gloo_processes_split_a_group_and_give_the_one_process_result(tmp_path, chat_dir):
    script = tmp_path / "worker.py"
    out = tmp_path / "two.json"
    script.write_text(WORKER.format(root=str(ROOT), model=str(chat_dir), out=str(out)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    one = group_run(str(chat_dir))
    two = json.loads(out.read_text())
    assert two == json.loads(json.dumps(one))
    assert [r["mode"] for r in two] == ["joint", "progressive"]


@pytest.mark.slow
def test_split_groups_over_two_lightning_processes_give_the_one_process_records(tmp_path, chat_dir, chat):
    """`--model.split_groups true` with 2 gloo processes: both ranks step every group, each scoring its members;
    rank 0 writes each group's record once, equal to a one-process run's."""
    from tests.test_cli import _env, _job_config
    from tests.conftest import cli_command

    records = {}
    for name, extra in (("one", []), ("two", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        directory = tmp_path / name
        directory.mkdir()
        rows = []
        for g, span in (("g1", [27, 48, 60]), ("g2", [29, 10, 84])):
            for member, prefix in zip(_group(chat, PREFIXES, span=span, length=6, name=g).members, PREFIXES):
                rows.append({"id": f"{g}-{member.id}", "group": g, "ids": member.ids, "prefix": prefix})
        (directory / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = _job_config(directory, f"""
model:
  class_path: lit_inversion.dlmi.DlmiModule
  init_args:
    model_name_or_path: {chat_dir}
    prompt_length: 3
    num_steps: 8
    split_groups: true
    method:
      class_path: lit_inversion.dlmi.DlmiConfig
      init_args: {{check_every: 3, compute_dtype: float32, seed: 5}}
data:
  class_path: lit_inversion.dlmi.OutputTargetsDataModule
  init_args: {{targets_file: {directory}/targets.jsonl, batch_size: 2}}
""")
        run = subprocess.run(cli_command() + ["fit", "--config", str(config), *extra], capture_output=True, text=True,
                             env=dict(_env(), OMP_NUM_THREADS="1"), timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        got = read_results(directory / "results.jsonl")
        assert sorted(r["id"] for r in got) == ["g1", "g2"]  # each group once
        records[name] = {r["id"]: {k: v for k, v in r.items() if k != "seconds"} for r in got}
    assert records["two"] == records["one"]
