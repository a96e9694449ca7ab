"""Universal prompts: joint against progressive mode (or the sum against mellowmax) on the same groups, in one run.

    python -m lit_inversion.dlmi.targets --reachable --chat --group 2 --count 2 --seed 31 --out runs/groups31.jsonl
    python benchmarks/universal.py --targets runs/groups31.jsonl --max-seconds 240 --threads 2
    python benchmarks/universal.py --targets runs/groups31.jsonl --max-seconds 240 --threads 2 \
        --arms joint joint:mellowmax --out docs/results/data/dlmi_universal_loss.json

Each arm (`mode` or `mode:loss`) optimises every group of the file (records sharing "group") with the
shipped config's method (`configs/dlmi.yaml`), `--max-seconds` per member (a group of G gets G times it),
all groups in one pool (one slot each), one arm after the other. It prints, per arm, the groups solved,
the mean per-pair honest LCS, the pairs exact and the wall time, and the second arm against the first;
the JSON feeds the results page.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import hardware, run_record, shipped_config  # noqa: E402
from lit_inversion.dlmi.config import DlmiConfig  # noqa: E402
from lit_inversion.dlmi.data import OutputGroup, group_targets, read_output_targets  # noqa: E402
from lit_inversion.dlmi.pool import run_pool  # noqa: E402
from lit_inversion.models import load_model  # noqa: E402

MODES = ("joint", "progressive")
LOSSES = ("sum", "mellowmax")


def run_mode(loaded, groups: list[OutputGroup], config: DlmiConfig) -> dict:
    start = time.perf_counter()
    finished = dict(run_pool(loaded, groups, config, slots=len(groups)))
    wall = time.perf_counter() - start
    results = [finished[g.id] for g in groups]
    pairs = [p for r in results for p in r.pairs]
    for g, r in zip(groups, results):
        joined = ", ".join(f"{p.id}: joined {p.joined_step}, solved {p.solved_step}" for p in r.pairs)
        print(f"  [{config.group_mode}:{config.group_loss} {g.id}] {'SOLVED' if r.exact_match else 'partial'} lcs={r.lcs_ratio:.2f} "
              f"steps={r.steps} {r.seconds:.0f}s prompt={r.prompt_text!r} ({joined})", flush=True)
    return {"mode": config.group_mode, "loss": config.group_loss, "groups": len(groups), "solved": sum(r.exact_match for r in results),
            "pairs": len(pairs), "exact_pairs": sum(p.exact_match for p in pairs),
            "pair_lcs": round(sum(p.lcs_ratio for p in pairs) / len(pairs), 4), "wall_seconds": round(wall, 1),
            "steps": [r.steps for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", required=True, help="a JSONL of group records (--reachable --chat --group G)")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="wall-time budget per member")
    parser.add_argument("--arms", nargs="+", default=list(MODES), metavar="MODE[:LOSS]",
                        help=f"modes ({', '.join(MODES)}), each optionally with a loss ({', '.join(LOSSES)}; default sum)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs/results/data/dlmi_universal.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    groups = [u for u in group_targets(read_output_targets(args.targets, loaded)) if isinstance(u, OutputGroup)]
    if not groups:
        raise SystemExit(f"{args.targets} has no groups: make some with "
                         "`python -m lit_inversion.dlmi.targets --reachable --chat --group 2`")
    print(f"Universal prompts | model {args.model} | {hardware()} | torch {torch.__version__} | "
          f"{len(groups)} groups of {[len(g.members) for g in groups]} | {args.max_seconds:g} s per member", flush=True)
    arms = [tuple((arm + ":sum").split(":")[:2]) for arm in args.arms]
    bad = [f"{m}:{l}" for m, l in arms if m not in MODES or l not in LOSSES]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}: give MODE[:LOSS] with MODE in {MODES} and LOSS in {LOSSES}")
    rows = []
    for mode, loss in arms:
        rows.append(run_mode(loaded, groups, shipped_config(max_seconds=args.max_seconds, group_mode=mode,
                                                            group_loss=loss)))
    print("\n| mode | loss | groups solved | pairs exact | mean per-pair honest LCS | wall time |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['loss']} | {r['solved']}/{r['groups']} | {r['exact_pairs']}/{r['pairs']} | "
              f"{r['pair_lcs']:.2f} | {r['wall_seconds']:.0f} s |")
    if len(rows) == 2:
        base, other = rows
        print(f"\n{other['mode']}:{other['loss']} against {base['mode']}:{base['loss']}: wall time "
              f"{other['wall_seconds'] / base['wall_seconds']:.2f}x, pair LCS {other['pair_lcs'] - base['pair_lcs']:+.2f}, "
              f"groups solved {other['solved']} vs {base['solved']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": hardware(), "model": args.model, "targets": args.targets,
                               "max_seconds_per_member": args.max_seconds, **run_record(), "rows": rows},
                              indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
