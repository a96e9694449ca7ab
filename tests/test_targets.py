"""Targets for output inversion: reachable ones carry a known, non-copying prompt that produces them."""

from __future__ import annotations

import json

import torch

from lit_inversion.dlmi.batch import greedy_decode
from lit_inversion.dlmi.targets import REACHABLE_MAX_COPY, main, make_reachable_targets
from lit_inversion.metrics import lcs_ratio
from lit_inversion.sequences import read_sequences

SOURCES = ["w5 w9 w13 w21 w34", "w40 w41 w42 w43 w44 w45", "w60 w61 w62 w63"]


def test_reachable_targets_are_the_greedy_continuations_of_their_prompts(tiny_llama):
    targets = make_reachable_targets(tiny_llama, 4, prompt_length=6, length=8, seed=3, sources=SOURCES)
    assert [t["kind"] for t in targets] == ["natural", "natural", "random", "random"]
    assert len({t["id"] for t in targets}) == 4
    for t in targets:
        assert len(t["prompt_ids"]) == 6 and len(t["ids"]) == 8
        output = greedy_decode(tiny_llama.model, torch.tensor([[1] + t["prompt_ids"]]), 8)[0].tolist()
        assert output == t["ids"]  # the known prompt reaches the target exactly
        assert lcs_ratio(t["prompt_ids"], t["ids"]) == t["prompt_target_lcs"] <= REACHABLE_MAX_COPY
    natural = " ".join(SOURCES).split()
    assert all(tiny_llama.tokenizer.decode([i]) in natural for t in targets[:2] for i in t["prompt_ids"])
    again = make_reachable_targets(tiny_llama, 4, prompt_length=6, length=8, seed=3, sources=SOURCES)
    assert again == targets  # a seed gives the same set


def test_reachable_cli_writes_a_targets_file_the_job_reads(tmp_path, tiny_llama_dir, tiny_llama):
    sources = tmp_path / "sources.txt"
    sources.write_text("\n".join(SOURCES) + "\n")
    out = tmp_path / "reach.jsonl"
    main(["--model", str(tiny_llama_dir), "--reachable", "--count", "2", "--seed", "1", "--prompt-length", "5",
          "--length", "6", "--source", str(sources), "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["natural", "random"] and all("prompt_ids" in r for r in rows)
    read = read_sequences(out, tiny_llama.tokenizer, tiny_llama.vocab_size, option="--data.targets_file")
    assert [ids for _, ids in read] == [r["ids"] for r in rows]


def test_natural_sets_every_span_from_the_source_text(tiny_llama):
    targets = make_reachable_targets(tiny_llama, 3, prompt_length=6, length=8, seed=3, sources=SOURCES, natural=3)
    assert [t["kind"] for t in targets] == ["natural"] * 3
    words = " ".join(SOURCES).split()
    assert all(tiny_llama.tokenizer.decode([i]) in words for t in targets for i in t["prompt_ids"])
