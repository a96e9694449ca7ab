"""SIP-It on architectures other than the default: states beyond float16, Gemma's scaled embeddings,
tied and untied heads, sliding-window attention, learned positions. Every case must recover exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lit_inversion import capture_hidden_states, invert_hidden_states, load_model
from lit_inversion.errors import InversionError
from lit_inversion.models import _content_key
from lit_inversion.sipit.table import first_position_table
from lit_inversion.states import LayerProbe
from lit_inversion.tokens import context_prefix
from tests.conftest import TINY_VOCAB, make_tiny_model

FLOAT16_MAX = 65504.0


def _tiny(directory: Path, arch: str) -> Path:
    if arch == "llama-huge":  # a residual stream far beyond float16's range from the first layer on
        return make_tiny_model(directory, "llama", embedding_scale=3e5)
    return make_tiny_model(directory, {"llama-tied": "llama"}.get(arch, arch))


ARCHS = ["llama-tied", "llama-untied", "llama-huge", "gemma3", "mistral", "gpt2"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    return {arch: load_model(str(_tiny(tmp_path_factory.mktemp(arch), arch))) for arch in ARCHS}


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_recovery_on_other_architectures(arch, tiny_models):
    loaded = tiny_models[arch]
    for layer in (1, 4):
        ids = _prompt(12, seed=layer)
        states = capture_hidden_states(ids, model=loaded, layer=layer)
        result = invert_hidden_states(states, model=loaded, layer=layer, true_ids=ids)
        assert result.recovered_ids == ids, (arch, layer)
        assert all(result.verified)


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_states_match_the_models_own_forward(arch, tiny_models):
    """Our cache and stopped forward against Hugging Face's full forward (its own cache and masks),
    and injected embedding rows against looked-up ids (Gemma scales only the latter by itself)."""
    loaded = tiny_models[arch]
    ids = [loaded.bos_id] + _prompt(12, seed=7)
    with torch.no_grad():
        reference = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for layer in (1, 3):
        with LayerProbe(loaded, layer) as probe:
            ours = probe.states(ids[1:], ids[:1])
            torch.testing.assert_close(ours, reference[layer][0, 1:].float(), rtol=1e-4, atol=1e-4 * ours.abs().max())
            with torch.no_grad():
                rows = probe.embedding.weight[torch.tensor([ids])]
                injected = probe.forward(inputs_embeds=rows)[0, 1:]
            torch.testing.assert_close(injected, ours, rtol=1e-5, atol=1e-5 * ours.abs().max())


def test_states_beyond_float16_keep_their_range_in_the_table(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_INVERSION_CACHE", str(tmp_path))
    loaded = tiny_models["llama-huge"]
    prefix = context_prefix(loaded.bos_id, True)
    with LayerProbe(loaded, 4) as probe:
        table = first_position_table(probe, prefix)
        cached = first_position_table(probe, prefix)  # read back from disk
    assert float(table.float().abs().max()) > FLOAT16_MAX  # float16 would have stored inf here
    assert bool(torch.isfinite(table).all()) and torch.equal(table, cached)
    names = [p.name for p in (tmp_path / "tables").iterdir()]
    assert names and all(name.startswith("table-bf16-") for name in names)  # float16 caches are not reused


def test_non_finite_states_end_in_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_INVERSION_CACHE", str(tmp_path / "cache"))
    directory = _tiny(tmp_path / "overflow", "gpt2")
    loaded = load_model(str(directory))
    with torch.no_grad():  # token 5's embedding is finite, but its LayerNorm mean overflows float32
        loaded.model.get_input_embeddings().weight[5] = 3e38
    with pytest.raises(InversionError, match=r"non-finite values in the first-position table of layer 2 \(tokens 0\.\.95\): 32 NaN or inf"):
        invert_hidden_states(torch.randn(3, 32), model=loaded, layer=2)
    with pytest.raises(InversionError, match="non-finite values in the model's layer-2 states of a 3-token prompt: .* NaN or inf"):
        capture_hidden_states([7, 5, 8], model=loaded, layer=2)
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[5] = float("nan")
    with pytest.raises(InversionError, match="non-finite values in the input embeddings of .*: 32 NaN or inf"):
        invert_hidden_states(torch.randn(3, 32), model=loaded, layer=2)


def test_float16_screen_and_chains_fall_back_beyond_float16s_range(tiny_models):
    loaded = tiny_models["llama-untied"]
    ids = _prompt(8, seed=31)
    blocks = loaded.model.model.layers
    with torch.no_grad():  # MLP outputs beyond float16's range: a float16 forward gives inf there
        for block in blocks:
            block.mlp.down_proj.weight.mul_(1e8)
    try:
        states = capture_hidden_states(ids, model=loaded, layer=4)
        assert float(states.abs().max()) > FLOAT16_MAX and bool(torch.isfinite(states).all())
        result = invert_hidden_states(states, model=loaded, layer=4, true_ids=ids, screen_dtype="float16",
                                      chain_dtype="float16", use_table=False, token_map=False, lm_prior=False)
    finally:
        with torch.no_grad():
            for block in blocks:
                block.mlp.down_proj.weight.div_(1e8)
    assert result.recovered_ids == ids and all(result.verified)


def test_a_model_that_overflows_for_every_candidate_is_a_clear_error(tiny_models):
    loaded = tiny_models["llama-untied"]
    blocks = loaded.model.model.layers
    with torch.no_grad():  # float32 overflows: every candidate's state is inf or NaN
        for block in blocks:
            block.mlp.down_proj.weight.mul_(1e30)
    try:
        with pytest.raises(InversionError, match="no candidate at position 0 had a finite distance"):
            invert_hidden_states(torch.randn(2, 32), model=loaded, layer=4, use_table=False, token_map=False,
                                 lm_prior=False, max_candidates=16)
    finally:
        with torch.no_grad():
            for block in blocks:
                block.mlp.down_proj.weight.div_(1e30)


def test_converted_gguf_cache_is_keyed_by_contents_not_path(tmp_path):
    """Each virtual environment holds its own copy of the packaged GGUF file: copies share one
    converted model, and a file with other contents gets its own."""
    data = os.urandom(9 << 20)  # larger than the head and tail samples together
    first, second, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c.gguf"
    for path, body in ((first, data), (second, data), (other, data[:-1] + bytes([data[-1] ^ 1]))):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(body)
    os.utime(second, ns=(1, 1))
    assert _content_key(first) == _content_key(second)
    assert _content_key(first) != _content_key(other)
