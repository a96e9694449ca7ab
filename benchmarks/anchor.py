"""lit-inversion against the real nanoGCG 0.3.0, at equal wall time per target, judged one way.

    bash benchmarks/nanogcg/setup_env.sh                                   # its own venv, PyPI only
    python benchmarks/anchor.py prepare --targets data/dlmi_smollm2_reach8.jsonl data/dlmi_smollm2_chat8.jsonl \
        --out runs/anchor/prepared.jsonl
    python benchmarks/anchor.py ours --prepared runs/anchor/prepared.jsonl --seconds 300 --out runs/anchor/ours.jsonl
    .venv-nanogcg/bin/python benchmarks/nanogcg/run.py --targets runs/anchor/prepared.jsonl --seconds 300 \
        --search-width 64 --topk 64 --out runs/anchor/nanogcg-64.jsonl
    python benchmarks/anchor.py judge --prepared runs/anchor/prepared.jsonl --nanogcg runs/anchor/nanogcg-64.jsonl \
        --out runs/anchor/nanogcg-64-judged.jsonl
    python benchmarks/anchor.py summary --ours runs/anchor/ours.jsonl --nanogcg runs/anchor/nanogcg-64-judged.jsonl \
        --out docs/results/data/dlmi_anchor.json

`prepare` renders each target's context our way (`lit_inversion.dlmi.context`) and keeps the targets whose
text re-encodes to their ids (nanoGCG takes the target as text). `ours` runs the shipped config
(`configs/dlmi.yaml`'s method) one target at a time with `max_seconds` T. nanoGCG's runner checks that
its ids equal ours before it runs. Every arm is judged one way: the string a user would copy (nanoGCG's
`best_string`, our `prompt_text`) encoded alone, spliced between the context ids and decoded greedily (the
records' verdict). Every step appends per target, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import hardware, run_record, shipped_config  # noqa: E402
from lit_inversion.dlmi.context import Context  # noqa: E402
from lit_inversion.dlmi.data import read_output_targets  # noqa: E402
from lit_inversion.dlmi.pool import invert_outputs  # noqa: E402
from lit_inversion.dlmi.scorer import PromptScorer  # noqa: E402
from lit_inversion.dlmi.targets import perplexity  # noqa: E402
from lit_inversion.metrics import lcs_ratio  # noqa: E402
from lit_inversion.models import load_model  # noqa: E402
from lit_inversion.tokens import decode, encode  # noqa: E402


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare(args, loaded) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.targets:
        raw = {r.get("id"): r for r in read(Path(path))}
        for target in read_output_targets(path, loaded):
            record = raw.get(target.id, {})
            text = decode(loaded.tokenizer, target.ids)
            if encode(loaded.tokenizer, text) != target.ids:
                print(f"skip {target.id}: its text does not re-encode to its ids", flush=True)
                continue
            context = target.context or Context((loaded.bos_id,))
            rows.append({"id": target.id, "kind": record.get("kind"), "messages": record.get("messages"),
                         "before": list(context.before), "after": list(context.after), "target_ids": target.ids,
                         "text": text})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} targets to {out}")


def judged(loaded, row: dict, prompt_ids: list[int], seconds: float, seconds_to_exact: float | None) -> dict:
    """One arm's result for a target, judged by the records' verdict (greedy, batch of one, no cache)."""
    context = Context(tuple(row["before"]), tuple(row["after"]))
    scorer = PromptScorer(loaded.model, context)
    device = loaded.model.get_input_embeddings().weight.device
    output = scorer.verdict(torch.tensor(prompt_ids, device=device), len(row["target_ids"])) if prompt_ids else []
    exact = output == row["target_ids"]
    return {"id": row["id"], "kind": row["kind"], "context": "chat" if row["messages"] else "bare",
            "prompt_ids": prompt_ids, "prompt_text": decode(loaded.tokenizer, prompt_ids),
            "output_text": decode(loaded.tokenizer, output), "exact": exact,
            "honest_lcs": lcs_ratio(output, row["target_ids"]) if output else 0.0, "seconds": round(seconds, 2),
            "seconds_to_exact": seconds_to_exact if exact else None,
            "prompt_perplexity": perplexity(loaded, prompt_ids) if len(prompt_ids) > 1 else None}


def ours(args, loaded) -> None:
    out = Path(args.out)
    done = {r["id"] for r in read(out)}
    config = shipped_config(max_seconds=args.seconds)
    for row in read(Path(args.prepared)):
        if row["id"] in done:
            continue
        context = Context(tuple(row["before"]), tuple(row["after"]))
        (result,) = invert_outputs(loaded, [row["target_ids"]], config, batch_size=1, keys=[row["id"]],
                                   contexts=[context])
        # Judged as nanoGCG is: the text a user would copy, encoded alone (filter_ids keeps them equal).
        copied = encode(loaded.tokenizer, result.prompt_text)
        record = judged(loaded, row, copied, result.seconds, result.seconds)
        record.update(method="dlmi", package="lit-inversion", steps=result.steps,
                      text_gives_ids=copied == result.prompt_ids)
        append(out, record)
        print(f"[dlmi {row['id']}] exact={record['exact']} lcs={record['honest_lcs']:.2f} {record['seconds']:.0f}s",
              flush=True)


def judge(args, loaded) -> None:
    prepared = {r["id"]: r for r in read(Path(args.prepared))}
    out = Path(args.out)
    done = {r["id"] for r in read(out)}
    for run in read(Path(args.nanogcg)):
        if run["id"] in done or run.get("skipped"):
            if run.get("skipped"):
                print(f"nanoGCG skipped {run['id']}: {run['skipped']}", flush=True)
            continue
        prompt_ids = encode(loaded.tokenizer, run["best_string"]) if run.get("best_string") else []
        record = judged(loaded, prepared[run["id"]], prompt_ids, run["seconds"], run.get("early_stop_seconds"))
        record.update(method=f"nanogcg (width {run['search_width']}, top-k {run['topk']})", package=run["package"],
                      steps=run["steps"])
        append(out, record)
        print(f"[{record['method']} {run['id']}] exact={record['exact']} lcs={record['honest_lcs']:.2f}", flush=True)


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for context in ("bare", "chat"):
        for method in dict.fromkeys(r["method"] for r in records):
            rs = [r for r in records if r["method"] == method and r["context"] == context]
            if not rs:
                continue
            to_exact = [r["seconds_to_exact"] for r in rs if r["exact"] and r["seconds_to_exact"] is not None]
            ppl = [r["prompt_perplexity"] for r in rs if r["prompt_perplexity"] is not None]
            honest = statistics.mean(r["honest_lcs"] for r in rs)
            rows.append({"context": context, "method": method, "package": rs[0]["package"], "targets": len(rs),
                         "exact": sum(r["exact"] for r in rs), "honest_lcs": round(honest, 4),
                         "remaining_error": round(1 - honest, 4),
                         "median_seconds_to_exact": statistics.median(to_exact) if to_exact else None,
                         "seconds_per_target": round(statistics.mean(r["seconds"] for r in rs), 1),
                         "prompt_perplexity": round(statistics.median(ppl), 1) if ppl else None})
    return rows


def summary(args, loaded) -> None:
    records = [r for path in [args.ours, *args.nanogcg] for r in read(Path(path))]
    rows = summary_rows(records)
    print("| context | method | targets | exact | honest LCS | remaining error | median s to exact | s/target | prompt ppl |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['method']} | {r['targets']} | {r['exact']} | {r['honest_lcs']:.2f} | "
              f"{r['remaining_error']:.2f} | {r['median_seconds_to_exact'] or '-'} | {r['seconds_per_target']} | "
              f"{r['prompt_perplexity'] or '-'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"hardware": hardware(), "model": args.model, **run_record(),
                                          "summary": rows, "rows": records}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--targets", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p = commands.add_parser("ours")
    p.add_argument("--prepared", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--out", required=True)
    p = commands.add_parser("judge")
    p.add_argument("--prepared", required=True)
    p.add_argument("--nanogcg", required=True)
    p.add_argument("--out", required=True)
    p = commands.add_parser("summary")
    p.add_argument("--ours", required=True)
    p.add_argument("--nanogcg", nargs="+", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"prepare": prepare, "ours": ours, "judge": judge, "summary": summary}[args.command](args, load_model(args.model))


if __name__ == "__main__":
    main()
