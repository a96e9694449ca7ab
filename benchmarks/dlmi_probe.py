"""Scratch probe for DLMI on the real model: honest / soft LCS and seconds per step.

    PYTHONPATH=. python benchmarks/dlmi_probe.py --ids k6-0                    # the default method
    PYTHONPATH=. python benchmarks/dlmi_probe.py --paper --ids k1-0            # the paper's method
    PYTHONPATH=. python benchmarks/dlmi_probe.py --ids k6-0 --set refine_objective=ce num_steps=64
    PYTHONPATH=. python benchmarks/dlmi_probe.py --timing --threads 2 [--paper | --set ...]  # s/step only

Targets come from data/dlmi_smollm2_k25.jsonl (ids k{K}-{i}); one process, one batch of the given ids.
On a shared CPU use --threads 1: two threads on two busy cores thrash (10x slower steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from benchmarks.common import run_record
from lit_inversion.dlmi import DlmiBatch, DlmiConfig
from lit_inversion.dlmi.pool import invert_outputs
from lit_inversion.dlmi.targets import read_jsonl
from lit_inversion.models import load_model


def parse_overrides(pairs: list[str]) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(DlmiConfig)}
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        kind = types[key]
        if kind in ("bool", bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif kind in ("int", int):
            out[key] = int(value)
        elif kind in ("float", float):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def timing(loaded, config: DlmiConfig, target: list[int], repeats: int = 5) -> None:
    for phase, steps_done in (("relaxed", 0), ("refine", config.relaxed_steps)):
        if (phase == "refine" and config.refine_steps == 0) or (phase == "relaxed" and config.relaxed_steps == 0):
            continue
        batch = DlmiBatch(loaded, [target], config)
        batch.steps[:] = steps_done
        batch.step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            batch.step()
        print(f"{phase}: {(time.perf_counter() - t0) / repeats:.3f} s/step")
    batch = DlmiBatch(loaded, [target], config)
    t0 = time.perf_counter()
    batch.check()
    print(f"check: {time.perf_counter() - t0:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/dlmi_smollm2_k25.jsonl")
    parser.add_argument("--ids", default="k1-0,k6-0,k11-0")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default=None, help="append a JSON summary line here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    config = DlmiConfig.paper(**overrides) if args.paper else DlmiConfig(**overrides)
    loaded = load_model()
    records = {r["id"]: r for r in read_jsonl(args.data)}
    chosen = [records[i] for i in args.ids.split(",")]
    print("config:", {k: v for k, v in dataclasses.asdict(config).items()}, "load:", os.getloadavg()[0])
    if args.timing:
        timing(loaded, config, chosen[0]["ids"])
        return

    steps = [0]

    def progress(step):
        steps[0] += 1
        if not args.quiet and (steps[0] % config.check_every == 0 or steps[0] == 1):
            cells = [f"{i}: L={l:.2f} tau={t:.2f} soft={s:.2f}" for i, l, t, s in
                     zip(step.ids, step.loss, step.tau, step.soft_lcs)]
            print(f"{steps[0]:4d} {step.phase[0] if step.phase else '':7s} " + " | ".join(cells), flush=True)

    t0 = time.perf_counter()
    results = invert_outputs(loaded, [r["ids"] for r in chosen], config, keys=[r["id"] for r in chosen],
                             on_step=progress)
    wall = time.perf_counter() - t0
    total_steps = max(r.steps for r in results)
    for rec, res in zip(chosen, results):
        print(f"{rec['id']}: exact={res.exact_match} lcs={res.lcs_ratio:.2f} soft={res.soft_lcs_ratio:.2f} "
              f"steps={res.steps} prompt={res.prompt_text!r} output={res.output_text!r}")
    n = len(results)
    summary = {**run_record(), "ids": args.ids, "paper": args.paper, "set": overrides,
               "lcs": sum(r.lcs_ratio for r in results) / n, "exact": sum(r.exact_match for r in results) / n,
               "soft": sum(r.soft_lcs_ratio for r in results) / n, "wall_s": wall,
               "s_per_step": wall / total_steps, "per_target": [round(r.lcs_ratio, 2) for r in results],
               "load": os.getloadavg()[0]}
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
