"""Tiny random-weight models built from configs in the tests (no hub access), plus helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]

# CI explores the same examples on every run, so whether a change lands does not hang on the draw;
# locally each run draws fresh examples (and hypothesis replays past failures from its database).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
TINY_VOCAB = 96


def _tokenizer(vocab_size: int):
    from tests.tiny_tokenizer import word_level_tokenizer

    return word_level_tokenizer(vocab_size)


ARCHS = ("llama", "llama-untied", "gemma3", "mistral", "gpt2")


def tiny_config(arch: str = "llama", layers: int = 4, vocab_size: int = TINY_VOCAB, context: int = 64):
    """The Hugging Face config of a tiny model (d = 32) of one of ARCHS: the one place tests define one."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig

    shared = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, bos_token_id=1,
                  eos_token_id=2)
    if arch in ("llama", "llama-untied"):
        return LlamaConfig(**shared, tie_word_embeddings=arch == "llama")
    if arch == "gemma3":  # embeddings scaled by sqrt(d); local layers see a 4-token window
        return Gemma3TextConfig(**shared, pad_token_id=0, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "sliding_attention"][:layers])
    if arch == "mistral":  # every layer sliding, window 3
        return MistralConfig(**shared, sliding_window=3, tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=context,
                          bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown tiny arch {arch!r}: one of {ARCHS}")


def tiny_model(arch: str = "llama", layers: int = 4, vocab_size: int = TINY_VOCAB, context: int = 64, seed: int = 0,
               embedding_scale: float = 1.0):
    """A tiny random model. Its embeddings are N(0, embedding_scale^2), wider than the default init, so
    token states are well separated (a scale far above 1 pushes the residual stream out of float16's range)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, vocab_size, context))
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0).mul_(embedding_scale)
    return model


def make_tiny_model(directory: Path, arch: str = "llama", layers: int = 4, vocab_size: int = TINY_VOCAB,
                    context: int = 64, seed: int = 0, embedding_scale: float = 1.0) -> Path:
    """Save a tiny random model (`tiny_model`) and its word-level tokenizer to `directory`."""
    model = tiny_model(arch, layers, vocab_size, context, seed, embedding_scale)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    _tokenizer(vocab_size).save_pretrained(directory)
    return directory


# A tiny chat template for the word-level tokenizer: every turn is "<s> ROLE content </s>" (ROLE: w3 user,
# w4 otherwise), the generation prompt "<s> w5".
CHAT_TEMPLATE = ("{% for m in messages %}<s> {% if m['role'] == 'user' %}w3{% else %}w4{% endif %} "
                 "{{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> w5 {% endif %}")


def add_chat_template(directory: Path) -> Path:
    """Give a saved tiny model's tokenizer CHAT_TEMPLATE."""
    import json

    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from lit_inversion.models import load_model

    return load_model(str(tiny_llama_dir))


@pytest.fixture(autouse=True)
def _seeded_noise():
    """Every test draws the same noise on every run: a threshold on noisy states must not pass by luck."""
    import random

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def test_cache(tmp_path_factory) -> Path:
    """A cache dir of the tests' own. Converted real models already in the user's cache are linked in
    (read only, so the real model loads in seconds); everything the tests write, such as the tables of
    tiny random models, stays in the temp dir."""
    from lit_inversion.cache import cache_dir

    cache = tmp_path_factory.mktemp("lit_inversion_cache")
    real = cache_dir()
    if real.is_dir():
        for entry in real.iterdir():
            if (entry / "config.json").is_file() and (entry / "model.safetensors").is_file():
                (cache / entry.name).symlink_to(entry, target_is_directory=True)
    return cache


@pytest.fixture(autouse=True)
def _isolated_cache(test_cache, monkeypatch):
    monkeypatch.setenv("LIT_INVERSION_CACHE", str(test_cache))


def step_to_end(batch) -> list:
    """Step a hand-built batch as the pool steps a slot (honest check when due) until it stops; its
    results. Tests use it on batches they set up by hand; runs go through `lit_inversion.dlmi.pool`."""
    while not batch.finished:
        batch.step()
        if batch.check_due:
            batch.check()
    return [batch.result(b) for b in range(batch.batch_size)]


def cli_command() -> list[str]:
    return [sys.executable, "-m", "lit_inversion"]


def swap_options(**options):
    """A plain swap search's options for tests that build a `SwapSearch` by hand: every position, a window of
    4, move only to a better prompt, no copy limit, no move-set extras; `options` override."""
    from lit_inversion.dlmi.search import SwapOptions

    base = dict(candidates=64, topk=256, positions=0, n_replace=1, rank="lead", objective="hinge", margin=1.0,
                window=4, accept="improve", no_revisit=True, patience=16, restart_swaps=3, copy_limit=1.0,
                retokenize=False, chunk=None, sampling="random", distance_weight=0.0, dedupe=False, merge=0,
                buffer=0, momentum=0.0, prior=0.0)
    return SwapOptions(**{**base, **options})
