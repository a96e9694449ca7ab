"""Helpers of benchmarks/gpu_check.sh: random-weight models built from a config, targets, an in-process
CLI run that records peak GPU memory, and the check of a run's results.

    python benchmarks/gpu_check_helper.py model DIR --size tiny|1b [--device cuda]
    python benchmarks/gpu_check_helper.py targets FILE --vocab V --count N --length T
    python benchmarks/gpu_check_helper.py fit --peak FILE -- <lit-inversion fit arguments>
    python benchmarks/gpu_check_helper.py check RESULTS --count N [--exact] [--peak FILE] [--unit token|step]

Self-contained on purpose: tests/conftest.py (whose make_tiny_model and _tokenizer the model builder
mirrors) imports pytest and hypothesis, which a bare GPU machine may not have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests/tiny_tokenizer.py

SIZES = {
    # d = 32, as tests/conftest.py's tiny_config("llama")
    "tiny": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64),
    # Llama-3.2-1B-like shape, random weights: ~1.1B parameters (untied head)
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=128),
}


def tokenizer(vocab_size: int):
    """The tests' word-level tokenizer (tests/tiny_tokenizer.py, free of test-only imports)."""
    from tests.tiny_tokenizer import word_level_tokenizer

    return word_level_tokenizer(vocab_size)


def build_model(directory: Path, size: str, device: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SIZES[size], bos_token_id=1, eos_token_id=2, tie_word_embeddings=size == "tiny")
    torch.manual_seed(0)
    # Built on the GPU when there is one (initialising 1B weights there takes a moment, on a CPU much longer)
    # and saved in bf16 (2 GB, not 4): SIP-It loads it in float32 anyway, DLMI in bf16.
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # N(0, 1) embeddings, as the tests' tiny models: well separated token states
        model.get_input_embeddings().weight.normal_(0, 1.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer(config.vocab_size).save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    return f"{params / 1e9:.2f} B params" if params > 1e8 else f"{params / 1e3:.0f} k params"


def write_targets(path: Path, vocab: int, count: int, length: int) -> str:
    import torch

    g = torch.Generator().manual_seed(1)
    lines = [json.dumps({"id": f"t{i}", "ids": torch.randint(3, vocab, (length,), generator=g).tolist()})
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return f"{count} targets of {length} tokens"


def fit(peak: Path, args: list[str]) -> None:
    """`lit-inversion fit ARGS` in this process, then torch.cuda.max_memory_allocated into `peak`."""
    import torch

    from lit_inversion.cli import main

    # As if started as `lit-inversion fit ...` (LightningCLI warns when given both args and a sys.argv).
    # One process only: a DDP launcher would re-run this script with these arguments (gpu_check.sh runs
    # its DDP part with `python -m lit_inversion`).
    sys.argv = [sys.argv[0], *args]
    main()
    if torch.cuda.is_available() and os.environ.get("LOCAL_RANK", "0") == "0":
        peak.write_text(str(torch.cuda.max_memory_allocated()))


def check(results: Path, count: int, exact: bool, peak: Path | None, unit: str) -> str:
    """One line on a finished run's records; exits 1 (with the reason) when they are not what it must write."""
    if not results.is_file():
        sys.exit(f"no results file {results}")
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    if sorted(r["id"] for r in records) != sorted({r["id"] for r in records}) or len(records) != count:
        sys.exit(f"expected {count} distinct records, got ids {[r['id'] for r in records]}")
    leftovers = sorted(p.name for p in results.parent.glob(results.name + ".rank*"))
    if leftovers:
        sys.exit(f"rank files not merged: {leftovers}")
    exact_count = sum(bool(r.get("exact_match")) for r in records)
    if exact and exact_count != count:
        sys.exit(f"exact match {exact_count}/{count}")
    seconds = sum(r["seconds"] for r in records)
    parts = [f"{count} targets", f"exact {exact_count}/{count}"]
    if unit == "token":  # SIP-It: one verified position is one token
        tokens = sum(len(r["true_ids"]) for r in records)
        parts.append(f"{seconds / tokens:.3f} s/token")
    else:  # DLMI: the slots of a batch step together, so a target's seconds / steps is the time per step
        parts.append(f"{sum(r['seconds'] / max(1, r['steps']) for r in records) / count:.3f} s/step")
    if peak is not None and peak.is_file():
        parts.append(f"peak {int(peak.read_text()) / 2**30:.2f} GiB")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model")
    p.add_argument("directory", type=Path)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("targets")
    p.add_argument("path", type=Path)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--length", type=int, default=4)
    p = sub.add_parser("fit")
    p.add_argument("--peak", type=Path, required=True)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("check")
    p.add_argument("results", type=Path)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--exact", action="store_true")
    p.add_argument("--peak", type=Path)
    p.add_argument("--unit", choices=["token", "step"], default="token")
    args = parser.parse_args()
    if args.command == "model":
        print(build_model(args.directory, args.size, args.device))
    elif args.command == "targets":
        print(write_targets(args.path, args.vocab, args.count, args.length))
    elif args.command == "fit":
        fit(args.peak, args.args[1:] if args.args[:1] == ["--"] else args.args)
    else:
        print(check(args.results, args.count, args.exact, args.peak, args.unit))


if __name__ == "__main__":
    main()
