"""DLMI benchmark on the default model: the shipped 25-target difficulty-k set (M = 20).

    python benchmarks/dlmi.py --prompt-lengths 20 --steps 256 --ks 1 6 11 --per-k 1   # the CPU bar
    python benchmarks/dlmi.py --methods paper dlmi gcg gbda reinforce --gcg-width 64   # + baselines
    python benchmarks/dlmi.py --steps 2048 --per-k 5 --prompt-lengths 10 80           # the paper's protocol (GPU)
    python benchmarks/dlmi.py --step-cost --model gemma-3-270m.gguf --prompt-lengths 20 \
        --methods paper dlmi-relaxed dlmi --threads 2   # a step's cost vs the model's own forward+backward
    python benchmarks/dlmi.py --throughput 1 4 8 --ks 1 6 11 16 --per-k 2 --steps 8 --prompt-lengths 20 \
        --methods dlmi --threads 2   # per-target seconds per step at batch sizes 1, 4 and 8
    python benchmarks/dlmi.py --budgets 500 1000 2000 4000 --reachable 4 --ks 1 6 11 --per-k 1 \
        --prompt-lengths 20 --methods dlmi gcg-nano gcg-scaled paper null --threads 2   # budget curves

Budget curves (`--budgets`): every method gets the same number of candidate evaluations per target
(a prompt scored by a forward pass; a gradient pass counts as its cost in forwards, measured at the
start of the run and rounded), and each target's honest LCS, exact
match and lead (the right target prefix under greedy decoding) are recorded as the budget passes each
mark. Targets: `--reachable` fresh reachable ones (half natural-text, half random prompts; a known
non-copying solution exists) and the shipped difficulty-k ones. `null` is no optimisation at all: N
newline tokens as the prompt.

Methods run in the same process on the same targets: `paper` (the paper's DLMI alone,
`DlmiConfig.paper()`: float32, learned decoupled tau, final argmax Z) is the baseline; `dlmi` is
lit-inversion's default (the discrete swap search on the exact criterion, no copying); `dlmi-repeat` seeds it
with a prompt that repeats the target; `gcg`, `gbda`, `reinforce` are the published baselines. Per k
it reports the honest LCS (greedy decode from the discrete prompt), exact match, the paper-style soft
LCS, seconds per step (per target: batches of one), steps to success and how much of the target the
prompt itself contains (prompt/target LCS), then ratios against `paper`. dlmi.json also keeps, per
N and method, the first batch's mean temperature and phase at every step (`tau_traces`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable for benchmarks.common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import hardware, median_seconds, run_record

from lit_inversion.dlmi.config import DlmiConfig
from lit_inversion.dlmi.batch import greedy_decode
from lit_inversion.dlmi import make_batch, method_config
from lit_inversion.dlmi.data import OutputTarget
from lit_inversion.dlmi.pool import invert_outputs, run_pool
from lit_inversion.models import load_model

ROOT = Path(__file__).resolve().parents[1]

METHODS = {
    "paper": lambda args, **kw: DlmiConfig.paper(**kw),
    "dlmi": lambda args, **kw: method_config("dlmi", **kw),
    "dlmi-relaxed": lambda args, **kw: method_config("dlmi", refine_fraction=0.0, **kw),  # the relaxed phase alone
    "dlmi-repeat": lambda args, **kw: method_config("dlmi", init="repeat", refine_fraction=1.0, **kw),
    "gcg": lambda args, **kw: method_config("gcg", search_width=args.gcg_width, topk=args.gcg_width, **kw),
    "gcg-nano": lambda args, **kw: method_config("gcg", search_width=512, topk=256, **kw),  # nanoGCG's defaults
    # nanoGCG's defaults with the search width scaled to the CPU (--gcg-width): more steps in the same time
    "gcg-scaled": lambda args, **kw: method_config("gcg", search_width=args.gcg_width, topk=256, **kw),
    "gbda": lambda args, **kw: method_config("gbda", **kw),
    "reinforce": lambda args, **kw: method_config("reinforce", **kw),
}
# The ablation: the default with one idea of the issue changed each (run them under --equal-time).
# The relaxed-phase variants fix their own step count: 32 relaxed steps, then the search.
RELAXED_FIRST = dict(num_steps=128, refine_fraction=0.75)
ABLATION = {
    "dlmi-no-curriculum": dict(search_window=0),  # score the whole target from the start
    "dlmi-window8": dict(search_window=8),  # a wider curriculum window
    "dlmi-ce": dict(refine_objective="ce"),  # mean cross-entropy instead of the per-position hinge
    "dlmi-no-restarts": dict(refine_patience=0),
    "dlmi-best": dict(refine_accept="best"),  # always move to the best candidate (GCG), not only to a better prompt
    "dlmi-greedy": dict(refine_sampling="greedy"),  # each position's best untried swaps, not a random draw
    "dlmi-distance": dict(refine_distance_weight=0.5),  # Faster-GCG's embedding-distance regulariser
    "dlmi-acg": dict(swap_tokens=3),  # 3-token swaps annealed to 1 (ACG)
    "dlmi-relaxed-first": dict(RELAXED_FIRST),
    "dlmi-onehot": dict(RELAXED_FIRST, anneal_from=0.0, anneal_to=0.0005),  # tau ~100 -> ~0.05
    "dlmi-sparse": dict(RELAXED_FIRST, relax_topk=256),
    # The move-set ideas of issue 23, each alone on the default (run them under --budgets).
    "dlmi-dedupe": dict(refine_dedupe=True),  # Faster-GCG: never re-score a prompt
    "dlmi-merge": dict(refine_merge=4),  # I-GCG: the best 2..4 single swaps merged
    "dlmi-buffer": dict(refine_buffer=16),  # ACG: restarts from a buffer of the best prompts
    "dlmi-momentum": dict(refine_momentum=0.5),  # MAC: momentum on the token gradient
    "dlmi-adc": dict(relaxed_method="adc", num_steps=256, refine_fraction=0.5),  # ADC+: 128 ADC steps, then the search
    "dlmi-beast": dict(beam_positions=4),  # a BEAST beam over the last 4 positions as the start (the default since)
    "dlmi-merge-beast": dict(refine_merge=4, beam_positions=4),  # the two that won alone, together
    "dlmi-no-beam": dict(beam_positions=0),  # the default before the beam: a random (or one-token fill) start
}
for _name, _change in ABLATION.items():
    METHODS[_name] = lambda args, _change=_change, **kw: method_config("dlmi", **{**kw, **_change})


def run(loaded, targets: list[dict], config: DlmiConfig, batch_size: int) -> tuple[list[dict], dict]:
    steps_done = [0]
    trace = dict(keys=[t["id"] for t in targets[:batch_size]], tau=[], phase=[])
    first = targets[0]["id"]

    def count(step):
        steps_done[0] += 1
        if first in step.ids:  # one target is enough to show the schedule; later ones repeat it
            trace["tau"].append(step.tau[step.ids.index(first)])
            trace["phase"].append(step.phase[step.ids.index(first)])

    start = time.perf_counter()
    results = invert_outputs(loaded, [t["ids"] for t in targets], config, batch_size=batch_size,
                             keys=[t["id"] for t in targets], on_step=count)
    seconds = time.perf_counter() - start
    per_step = seconds / max(1, steps_done[0])
    return [dict(id=t["id"], k=t["k"], honest=r.lcs_ratio, exact=r.exact_match, soft=r.soft_lcs_ratio,
                 steps=r.steps, s_per_step=per_step, seconds=r.seconds, copied=r.prompt_target_lcs, prompt=r.prompt_text,
                 output=r.output_text)
            for t, r in zip(targets, results)], trace


def step_cost(loaded, config: DlmiConfig, target: list[int], repeats: int = 3) -> dict:
    """Median seconds of one optimisation step of `config` on `target`, and of the model's own
    forward-and-backward on inputs of the same shape: [BOS] + N prompt + M - 1 target embeddings, as
    many rows as the step differentiates (its Gumbel samples; 1 for the swap search, which then also
    scores its candidates), vocabulary logits at the M target positions, the gradient to the inputs.
    For a swap search, `model_share` is the fraction of the step spent in its model calls (the
    gradient forward and backward and the candidates' forwards); the rest is the search's own work.
    `check` is one honest check (a greedy decode of M tokens)."""
    batch = make_batch(loaded, [target], config)
    model, E, M = loaded.model, loaded.model.get_input_embeddings().weight, len(target)
    searching = config.name == "gcg" or (config.name != "reinforce" and config.refine_steps > 0)
    rows = 1 if searching else config.samples if config.name == "reinforce" else config.gumbel_samples
    prefix = [loaded.bos_id] if config.prepend_bos and loaded.bos_id is not None else []
    ids = torch.tensor(prefix + [target[0]] * config.prompt_length + target[:-1]).expand(rows, -1)
    labels = torch.tensor(target).repeat(rows)

    def forward_backward() -> None:  # the head on a contiguous slice: HF's strided logits_to_keep is slower on CPU
        x = E[ids].detach().requires_grad_(True)
        hidden = model.base_model(inputs_embeds=x).last_hidden_state[:, -M:].contiguous()
        logits = model.get_output_embeddings()(hidden)
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels).backward()

    reference = median_seconds(forward_backward, repeats)
    batch.step()  # warm-up (and the search's start)
    in_model, times = batch.scorer.model_seconds, []  # the scorer times the step's model calls itself
    for _ in range(repeats):
        start = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - start)
    in_model = batch.scorer.model_seconds - in_model
    step = statistics.median(times)
    start = time.perf_counter()
    batch.check()  # the honest check (greedy decoding), run every `check_every` steps
    check = time.perf_counter() - start
    return dict(check=check, rows=rows, forward_backward=reference, step=step, ratio=step / reference,
                model_share=in_model / sum(times) if searching else None,
                relax_topk=None if searching else getattr(batch, "relax_topk", 0))


def run_step_cost(args, loaded) -> None:
    """Print, per N and method, a step's cost against the model's own forward-and-backward."""
    torch.manual_seed(args.seed)
    source = torch.randint(loaded.vocab_size // 10, loaded.vocab_size // 2, (1, 5))
    prefix = torch.tensor([[loaded.bos_id]]) if loaded.bos_id is not None else source[:, :0]
    target = greedy_decode(loaded.model, torch.cat([prefix, source], 1), args.target_length)[0].tolist()
    print(f"### DLMI step cost, {args.model} (|V| = {loaded.vocab_size:,}), M = {len(target)}, {hardware()}, "
          f"torch {torch.__version__}\n")
    print("| N | method | relaxation | rows | model forward+backward (s) | step (s) | step / forward+backward | "
          "model calls' share of the step | honest check (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.prompt_lengths:
        for name in args.methods:
            config = METHODS[name](args, prompt_length=n, num_steps=1000, check_every=1000)
            cost = step_cost(loaded, config, target, args.repeats)
            relaxation = ("swap search" if cost["relax_topk"] is None else
                          f"sparse top-{cost['relax_topk']}" if cost["relax_topk"] else "dense")
            share = f"{cost['model_share']:.0%}" if cost["model_share"] is not None else "-"
            print(f"| {n} | {name} | {relaxation} | {cost['rows']} | {cost['forward_backward']:.3f} | "
                  f"{cost['step']:.3f} | {cost['ratio']:.2f}x | {share} | {cost['check']:.2f} |", flush=True)
            rows.append(dict(N=n, method=name, relaxation=relaxation, **cost))
    (out / "step_cost.json").write_text(json.dumps({"hardware": hardware(), "model": args.model, **run_record(),
                                                    "vocab_size": loaded.vocab_size, "M": len(target),
                                                    "rows": rows}, indent=1))


def run_throughput(args, loaded, targets: list[dict]) -> None:
    """Per N and method: the same targets at each batch size (the job's `--data.batch_size` slots), as
    seconds per target-step (the wall time over the steps all targets took), against batch size 1 in the
    same run."""
    print(f"### DLMI throughput, {args.model}, {len(targets)} targets, M = 20, <= {args.steps} steps, {hardware()}\n")
    print("| N | method | batch size | wall (s) | target-steps | s per target-step | vs batch 1 |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n in args.prompt_lengths:
        for name in args.methods:
            base = None
            for size in args.throughput:
                config = METHODS[name](args, prompt_length=n, num_steps=args.steps)
                start = time.perf_counter()
                # The Lightning job's step loop: `size` slots, a freed slot refilled at once.
                finished = run_pool(loaded, [OutputTarget(t["id"], t["ids"]) for t in targets], config, slots=size)
                wall = time.perf_counter() - start
                steps = sum(r.steps for _, r in finished)
                per = wall / max(1, steps)
                base = base or per
                print(f"| {n} | {name} | {size} | {wall:.1f} | {steps} | {per:.3f} | {base / per:.2f}x |", flush=True)
                rows.append(dict(N=n, method=name, batch_size=size, wall=wall, target_steps=steps, s_per_target_step=per))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"hardware": hardware(), "model": args.model, **run_record(),
                                                     "rows": rows}, indent=1))


def evals_per_step(config, gradient_cost: int) -> int:
    """Candidate evaluations a step of `config` spends at most (the search's phase for a mixed method):
    prompts scored by a forward, a gradient pass as `gradient_cost`."""
    g = gradient_cost
    if config.name == "gcg":
        return config.search_width + g
    if config.name == "reinforce":
        return config.samples  # forwards only (the score function needs no backward through the model)
    if config.refine_fraction <= 0.0:
        return g * config.gumbel_samples
    return config.refine_candidates + g


def gradient_cost(loaded, n: int, m: int = 20, repeats: int = 5) -> float:
    """Seconds of one prompt's forward-and-backward to the inputs over its forward alone ([BOS] + n + m - 1
    tokens, logits at the m target positions): what a gradient pass counts in candidate evaluations."""
    model, E = loaded.model, loaded.model.get_input_embeddings().weight
    ids = torch.randint(loaded.vocab_size, (1, 1 + n + m - 1))

    def forward(grad: bool) -> None:
        with torch.set_grad_enabled(grad):
            x = E[ids].detach().requires_grad_(grad)
            hidden = model.base_model(inputs_embeds=x).last_hidden_state[:, -m:].contiguous()
            logits = model.get_output_embeddings()(hidden)
            if grad:
                logits.float().logsumexp(-1).sum().backward()

    return median_seconds(lambda: forward(True), repeats) / median_seconds(lambda: forward(False), repeats)


def lead_of(output: list[int], target: list[int]) -> int:
    lead = 0
    while lead < len(target) and lead < len(output) and output[lead] == target[lead]:
        lead += 1
    return lead


def budget_curve(loaded, target: dict, name: str, make, args, n: int, gradient_cost: int) -> list[dict]:
    """One target under one method: the honest result each time the spent evaluations pass a budget."""
    from lit_inversion.dlmi.batch import check_batches, greedy_decode
    from lit_inversion.metrics import lcs_ratio

    ids, budgets = list(target["ids"]), sorted(args.budgets)
    start = time.perf_counter()
    if name == "null":  # no optimisation: the model's continuation of N newlines
        newline = loaded.tokenizer("\n", add_special_tokens=False)["input_ids"][0]
        prompt = [loaded.bos_id] * (loaded.bos_id is not None) + [newline] * n
        out = greedy_decode(loaded.model, torch.tensor([prompt]), len(ids))[0].tolist()
        row = dict(honest=lcs_ratio(out, ids), exact=out == ids, lead=lead_of(out, ids) / len(ids), copied=0.0,
                   evals=0, seconds=time.perf_counter() - start, prompt=loaded.tokenizer.decode(prompt[-n:]),
                   output=loaded.tokenizer.decode(out))
        return [dict(row, budget=b) for b in budgets]
    config = make(args, prompt_length=n, num_steps=1)
    per_step = evals_per_step(config, gradient_cost)
    searching = config.name == "gcg" or (config.name == "dlmi" and config.refine_fraction > 0)
    # Steps are a cap: the budget ends the run. A search's step may score fewer candidates than its
    # width (filters, dedupe), so it gets twice the steps the full width would need.
    steps = math.ceil(budgets[-1] / per_step) * (2 if searching else 1)
    if config.name == "dlmi" and 0 < config.refine_fraction < 1:  # keep the method's own relaxed steps
        relaxed = config.relaxed_steps
        config = replace(config, num_steps=relaxed + steps, refine_fraction=steps / (relaxed + steps))
    else:
        config = replace(config, num_steps=steps)
    batch = make_batch(loaded, [ids], config, keys=[target["id"]])
    rows, spent = [], 0
    while budgets[len(rows):]:
        stepped = not batch.finished
        if stepped:
            batch.step()
            spent = int(batch.evaluations(gradient_cost)[0])
            if batch.check_due:  # the job's own checks: every check_every steps, and on a teacher-forced match
                check_batches([batch])
        while budgets[len(rows):] and (spent >= budgets[len(rows)] or not stepped):
            check_batches([batch])  # the answer at this budget (keep_best methods: the best checked so far)
            r = batch.result(0)
            rows.append(dict(budget=budgets[len(rows)], evals=spent, honest=r.lcs_ratio, exact=r.exact_match,
                             lead=lead_of(r.output_ids, ids) / len(ids), copied=r.prompt_target_lcs,
                             seconds=time.perf_counter() - start, prompt=r.prompt_text, output=r.output_text))
    return rows


def run_budgets(args, loaded, targets: list[dict]) -> None:
    from lit_inversion.dlmi.targets import make_reachable_targets

    kinds = [dict(t, kind=f"k = {t['k']}") for t in targets]
    if args.reachable:
        sources = [line.strip() for line in (ROOT / "data/seed_sentences.txt").read_text().splitlines() if line.strip()]
        fresh = make_reachable_targets(loaded, args.reachable, prompt_length=20, length=20, seed=args.reachable_seed,
                                       sources=sources)
        kinds = [dict(t, kind=f"reachable {t['kind']}") for t in fresh] + kinds
    ratio = gradient_cost(loaded, max(args.prompt_lengths))
    gradient_cost = max(1, round(ratio))  # the batches' gradient passes count at this cost
    print(f"DLMI budget curves | model {args.model} | {hardware()} | torch {torch.__version__} | "
          f"{len(kinds)} targets | budgets {args.budgets} evaluations | a gradient pass measured at "
          f"{ratio:.2f} forwards, counted as {gradient_cost}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.prompt_lengths:
        for t in kinds:
            for name in args.methods:
                make = METHODS.get(name)
                for r in budget_curve(loaded, t, name, make, args, n, gradient_cost):
                    rows.append(dict(r, id=t["id"], kind=t["kind"], method=name, N=n))
                last = rows[-1]
                print(f"  N={n} {t['kind']} {t['id']} {name}: honest={last['honest']:.2f} lead={last['lead']:.2f} "
                      f"exact={last['exact']} {last['seconds']:.0f}s {last['prompt']!r} -> {last['output']!r}",
                      flush=True)
                (out / "dlmi_budget.json").write_text(json.dumps(
                    {"hardware": hardware(), "model": args.model, "budgets": sorted(args.budgets),
                     "gcg_width": args.gcg_width, "reachable_seed": args.reachable_seed,
                     "gradient_ratio": ratio, "gradient_evaluations": gradient_cost, **run_record(),
                     "rows": rows}, indent=1))
    print(f"\n### Budget curves, {args.model}, {hardware()}: mean honest LCS (exact) per target kind\n")
    for kind in dict.fromkeys(t["kind"] for t in kinds):
        print(f"| {kind} | " + " | ".join(f"{b} evals" for b in sorted(args.budgets)) + " |")
        print("|---|" + "---|" * len(args.budgets))
        for name in args.methods:
            cells = []
            for b in sorted(args.budgets):
                rs = [r for r in rows if r["kind"] == kind and r["method"] == name and r["budget"] == b]
                cells.append(f"{statistics.mean(r['honest'] for r in rs):.2f} ({sum(r['exact'] for r in rs)}/{len(rs)})")
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default=str(ROOT / "data/dlmi_smollm2_k25.jsonl"))
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[10, 80])
    parser.add_argument("--steps", type=int, default=64, help="budget per target (paper: 256 and 2048)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 6, 11, 16, 21])
    parser.add_argument("--per-k", type=int, default=2, help="targets per k (the set has 5)")
    parser.add_argument("--ids", nargs="+", default=None, help="these target ids instead of --ks/--per-k (e.g. k1-1 k6-1)")
    parser.add_argument("--batch-size", type=int, default=1, help="targets optimised together")
    parser.add_argument("--methods", nargs="+", default=["paper", "dlmi"], choices=[*METHODS, "null"])
    parser.add_argument("--gcg-width", type=int, default=64, help="GCG search width (nanoGCG: 512; CPU: smaller)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-dlmi")
    cost = parser.add_argument_group("step cost (--step-cost): one step against the model's own forward+backward")
    cost.add_argument("--step-cost", action="store_true",
                      help="measure instead of inverting: per method, a step vs the model's forward+backward")
    cost.add_argument("--repeats", type=int, default=3, help="timed steps (median) after one warm-up")
    cost.add_argument("--target-length", type=int, default=20, help="M of the target the model decodes itself")
    cost.add_argument("--seed", type=int, default=0)
    parser.add_argument("--equal-time", type=float, default=None, metavar="SECONDS",
                        help="every method gets this wall-clock budget per target (max_seconds); --steps stays a cap")
    parser.add_argument("--baseline", default="paper", choices=list(METHODS),
                        help="the method the ratio columns divide by (e.g. gcg-nano for the GCG comparison)")
    parser.add_argument("--throughput", type=int, nargs="+", default=None, metavar="B",
                        help="measure per-target seconds per step at these batch sizes instead of the tables")
    curve = parser.add_argument_group("budget curves (--budgets): results at equal candidate evaluations")
    curve.add_argument("--budgets", type=int, nargs="+", default=None, metavar="EVALS",
                       help="record every target's honest result as the spent evaluations pass these marks")
    curve.add_argument("--reachable", type=int, default=0, help="fresh reachable targets to add (half natural)")
    curve.add_argument("--reachable-seed", type=int, default=21)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    if args.step_cost:
        run_step_cost(args, loaded)
        return
    rows = [json.loads(line) for line in Path(args.targets).read_text().splitlines() if line.strip()]
    if args.ids:
        by_id = {r["id"]: r for r in rows}
        missing = [i for i in args.ids if i not in by_id]
        if missing:
            parser.error(f"--ids: {', '.join(missing)} not in {args.targets}")
        targets = [by_id[i] for i in args.ids]
        args.ks = sorted({t["k"] for t in targets})
    else:
        targets = [t for k in args.ks for t in [r for r in rows if r["k"] == k][: args.per_k]]
    if args.throughput:
        run_throughput(args, loaded, targets)
        return
    if args.budgets:
        run_budgets(args, loaded, targets)
        return
    print(f"DLMI benchmark | model {args.model} | {hardware()} | torch {torch.__version__} | "
          f"{len(targets)} targets, M = 20, {args.steps} steps"
          + (f", {args.equal_time:g} s per target" if args.equal_time else ""), flush=True)
    methods = {name: METHODS[name] for name in args.methods}
    all_rows, traces = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every method, so a long run that is stopped keeps what it measured
        (out / "dlmi.json").write_text(json.dumps({"hardware": hardware(), "model": args.model, "steps": args.steps,
                                                   "batch_size": args.batch_size, "gcg_width": args.gcg_width,
                                                   "equal_time": args.equal_time, "targets": args.targets,
                                                   **run_record(),
                                                   "rows": all_rows, "tau_traces": traces}, indent=1))

    for n in args.prompt_lengths:
        for name, make in methods.items():
            budget = dict(max_seconds=args.equal_time) if args.equal_time else {}
            results, trace = run(loaded, targets, make(args, prompt_length=n, num_steps=args.steps, **budget),
                                 args.batch_size)
            traces.append(dict(method=name, N=n, **trace))
            for r in results:
                r.update(method=name, N=n)
                print(f"  N={n} {name} {r['id']}: honest={r['honest']:.2f} exact={r['exact']} soft={r['soft']:.2f} "
                      f"copied={r['copied']:.2f} "
                      f"steps={r['steps']} {r['seconds']:.0f}s {r['prompt']!r} -> {r['output']!r}", flush=True)
            all_rows += results
            save()
    budget = f"{args.equal_time:g} s per target" if args.equal_time else f"{args.steps} steps"
    print(f"\n### DLMI, {args.model}, M = 20, {budget}, {hardware()}\n")
    print("| N | method | k | honest LCS | exact | soft LCS (paper-style) | s/step | steps to success | prompt/target LCS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.prompt_lengths:
        for name in methods:
            for k in args.ks:
                rs = [r for r in all_rows if r["N"] == n and r["method"] == name and r["k"] == k]
                wins = [r["steps"] for r in rs if r["exact"]]
                print(f"| {n} | {name} | {k} | {statistics.mean(r['honest'] for r in rs):.2f} | "
                      f"{sum(r['exact'] for r in rs)}/{len(rs)} | {statistics.mean(r['soft'] for r in rs):.2f} | "
                      f"{rs[0]['s_per_step']:.2f} | {statistics.mean(wins) if wins else '-'} | "
                      f"{statistics.mean(r['copied'] for r in rs):.2f} |")
    print(f"\n| N | method | honest LCS (all k) | exact | s/step | s per target | vs {args.baseline}: honest LCS | "
          f"vs {args.baseline}: s/step |")
    print("|---|---|---|---|---|---|---|---|")
    mean = lambda rs, key: statistics.mean(float(r[key]) for r in rs) if rs else math.nan  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}x" if b else f"{a:.2f} vs 0"  # noqa: E731
    for n in args.prompt_lengths:
        base = [r for r in all_rows if r["N"] == n and r["method"] == args.baseline]
        for name in methods:
            rs = [r for r in all_rows if r["N"] == n and r["method"] == name]
            vs = ((ratio(mean(rs, "honest"), mean(base, "honest")), ratio(mean(rs, "s_per_step"), mean(base, "s_per_step")))
                  if base else ("-", "-"))
            print(f"| {n} | {name} | {mean(rs, 'honest'):.2f} | {sum(r['exact'] for r in rs)}/{len(rs)} | "
                  f"{mean(rs, 's_per_step'):.2f} | {mean(rs, 'seconds'):.0f} | {vs[0]} | {vs[1]} |")


if __name__ == "__main__":
    main()
