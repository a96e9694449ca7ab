"""Dtypes and precision: the model's load dtype, TF32 inside the verifier, half precision rejected,
the bf16 verifier copy, and generator states across device kinds."""

from __future__ import annotations

import subprocess

import pytest
import torch

from lit_inversion.errors import InversionError


def test_load_model_builds_the_weights_in_the_dtype_asked(tiny_llama_dir):
    from lit_inversion.models import load_model

    assert load_model(str(tiny_llama_dir), dtype="bfloat16").model.dtype == torch.bfloat16
    assert load_model(str(tiny_llama_dir), dtype="auto").model.dtype == torch.float32  # this CPU: no bf16 units
    with pytest.raises(InversionError, match="dtype 'float8' is unknown"):
        load_model(str(tiny_llama_dir), dtype="float8")


def test_job_dtype_options():
    from lit_inversion.dlmi import DlmiModule
    from lit_inversion.sipit import SipItModule

    from lit_inversion.precision import weights_dtype

    assert DlmiModule(dtype="auto").model_dtype() == "auto" and DlmiModule(dtype="float16").model_dtype() == "float16"
    assert weights_dtype("auto", torch.device("cpu")) == torch.float32  # storage: half only on a GPU
    with pytest.raises(InversionError, match="dtype must be auto"):
        DlmiModule(dtype="half")
    assert SipItModule(dtype="auto").model_dtype() == "float32"  # exact verification needs float32
    with pytest.raises(InversionError, match="SIP-It loads the model in float32"):
        SipItModule(dtype="bfloat16")


def test_states_are_computed_in_full_float32_precision_under_tf32(tiny_llama):
    from lit_inversion.states import LayerProbe

    seen = []
    with LayerProbe(tiny_llama, 2) as probe:
        hook = probe.model.get_input_embeddings().register_forward_hook(
            lambda *args: seen.append(torch.get_float32_matmul_precision()))
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            probe.states([5, 9, 7])
            assert torch.get_float32_matmul_precision() == "high"  # restored for the caller
        finally:
            torch.set_float32_matmul_precision(before)
            hook.remove()
    assert seen == ["highest"]


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_is_rejected_in_one_line(tmp_path, tiny_llama_dir, precision):
    from tests.conftest import cli_command
    from tests.test_cli import _env, _prompts, _write_config

    config = _write_config(tmp_path, tiny_llama_dir, _prompts(tmp_path, 1, 4))
    run = subprocess.run(cli_command() + ["fit", "--config", str(config), "--trainer.precision", precision],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("lit-inversion: error:") and "bf16-mixed" in last and "Traceback" not in run.stderr


def test_the_capture_dtype_verifier_is_a_cast_copy_not_a_float32_one(tiny_llama):
    from lit_inversion.sipit.algorithm import capture_probe
    from lit_inversion.states import LayerProbe

    with LayerProbe(tiny_llama, 2) as probe, capture_probe(probe, "bfloat16") as low:
        assert all(p.dtype == torch.bfloat16 for p in low.model.parameters())
        assert all(p.dtype == torch.float32 for p in probe.model.parameters())  # the original is untouched
        original = {p.data_ptr() for p in probe.model.parameters()}
        assert not original & {p.data_ptr() for p in low.model.parameters()}
        tied = low.model.get_input_embeddings().weight is low.model.get_output_embeddings().weight
        assert tied == (tiny_llama.model.get_input_embeddings().weight is tiny_llama.model.get_output_embeddings().weight)
        expected = probe.states([5, 9, 7]).to(torch.bfloat16).float()
        assert torch.allclose(low.states([5, 9, 7]), expected, rtol=0.1, atol=0.1)


def test_generator_states_from_another_device_kind_resume_deterministically(tiny_llama):
    from lit_inversion.dlmi import make_batch, method_config

    config = method_config("dlmi", prompt_length=3, num_steps=4, refine_candidates=4, refine_topk=8)
    batch = make_batch(tiny_llama, [[5, 9, 7]], config)
    batch.step()
    state = batch.state_dict()
    key = next(k for k in state if k.endswith("_extra_state"))
    assert state[key]["generator_device"] == "cpu"
    # What a CUDA run saves: a 16-byte Philox state, which a CPU generator cannot load as it is.
    state[key] = dict(state[key], generator_device="cuda",
                      generators=[torch.arange(16, dtype=torch.uint8)])
    draws = []
    for _ in range(2):
        resumed = make_batch(tiny_llama, [[5, 9, 7]], config)
        resumed.load_state_dict(state)
        draws.append(torch.rand(4, generator=resumed.generators[0], device="cpu"))
    assert torch.equal(draws[0], draws[1])  # the same checkpoint resumes the same way
    resumed.step()
    assert int(resumed.steps[0]) == 2
