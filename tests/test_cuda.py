"""CUDA-only checks: every method's first steps on a GPU, bf16, TF32, cross-device resume, NCCL.

Skipped without a GPU (`pytest -m cuda` selects them; they run in the default run where CUDA is
present). The CPU suite catches a tensor made without a device (`test_device_neutral.py`); these
check what only a GPU shows: kernels, dtypes, generator formats and the NCCL process group.
"""

from __future__ import annotations

import random
import subprocess

import pytest
import torch

from tests.test_device_neutral import METHOD_OPTIONS, TARGET, _config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def cuda_llama(tiny_llama_dir):
    from lit_inversion.models import load_model

    return load_model(str(tiny_llama_dir), device="cuda")


@pytest.fixture(scope="module")
def cuda_llama_bf16(tiny_llama_dir):
    from lit_inversion.models import load_model

    return load_model(str(tiny_llama_dir), device="cuda", dtype="bfloat16")


def _pool_steps(loaded, config, steps: int = 2):
    from lit_inversion.dlmi.data import OutputTarget
    from lit_inversion.dlmi.pool import TargetPool

    pool = TargetPool(loaded, config, slots=2)
    pool.enqueue([OutputTarget("a", TARGET), OutputTarget("b", TARGET[:3])])
    for _ in range(steps):
        pool.step()
    return pool


@pytest.mark.parametrize("name", list(METHOD_OPTIONS))
def test_every_output_inversion_method_steps_on_cuda(cuda_llama, name):
    pool = _pool_steps(cuda_llama, _config(name))
    for slot in pool.running:
        assert slot.batch.target_ids.device.type == "cuda" and slot.batch.steps.device.type == "cuda"


@pytest.mark.parametrize("name", ["dlmi", "paper", "reinforce", "gcg"])
def test_output_inversion_on_a_bf16_model(cuda_llama_bf16, name):
    assert cuda_llama_bf16.model.dtype == torch.bfloat16
    _pool_steps(cuda_llama_bf16, _config(name))


def test_invert_output_finds_a_reachable_target_on_cuda(cuda_llama):
    from lit_inversion import invert_output
    from lit_inversion.dlmi.batch import greedy_decode

    prompt = torch.tensor([[1, 17, 40, 63]], device="cuda")
    target = greedy_decode(cuda_llama.model, prompt, 4)[0].tolist()
    result = invert_output(target, model=cuda_llama, prompt_length=3, num_steps=60, method="gcg",
                           search_width=32, topk=32, max_prompt_target_lcs=1.0)
    decoded = greedy_decode(cuda_llama.model, torch.tensor([[1] + result.prompt_ids], device="cuda"), 4)[0].tolist()
    assert result.output_ids == decoded  # the honest check agrees with a fresh decode on the GPU


@pytest.mark.parametrize("capture_dtype", ["float32", "bfloat16"])
def test_sipit_recovers_a_prompt_on_cuda(cuda_llama, capture_dtype):
    from lit_inversion import invert_hidden_states
    from lit_inversion.sipit.api import capture_hidden_states

    ids = [5, 9, 7, 40, 63, 11]
    states = capture_hidden_states(ids, model=cuda_llama, layer=2, capture_dtype=capture_dtype)
    result = invert_hidden_states(states, model=cuda_llama, layer=2, capture_dtype=capture_dtype, true_ids=ids)
    assert result.exact_match, result.recovered_ids


def test_sipit_stays_exact_with_tf32_enabled(cuda_llama):
    from lit_inversion import invert_hidden_states
    from lit_inversion.sipit.api import capture_hidden_states

    ids = [5, 9, 7, 40, 63, 11]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32, as many training scripts set it
    try:
        states = capture_hidden_states(ids, model=cuda_llama, layer=4)
        result = invert_hidden_states(states, model=cuda_llama, layer=4, true_ids=ids)
        assert torch.get_float32_matmul_precision() == "high"  # the caller's setting is restored
    finally:
        torch.set_float32_matmul_precision(before)
    assert result.exact_match and all(result.verified)


def test_difficulty_targets_on_cuda(cuda_llama):
    from lit_inversion.dlmi.targets import difficulty_sequence, perplexity

    ids = difficulty_sequence(cuda_llama, 3, 6, random.Random(0))
    assert len(ids) == 6 and perplexity(cuda_llama, ids) > 0


@pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_generator_state_resumes_across_devices(tiny_llama_dir, first, second):
    from lit_inversion.dlmi import make_batch
    from lit_inversion.models import load_model

    config = _config("dlmi")
    saved = make_batch(load_model(str(tiny_llama_dir), device=first), [TARGET], config)
    saved.step()
    state = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in saved.state_dict().items()}
    resumed = make_batch(load_model(str(tiny_llama_dir), device=second), [TARGET], config)
    resumed.load_state_dict(state)
    assert int(resumed.steps[0]) == 1 and resumed.generators[0].device.type == second
    resumed.step()


def test_cli_rejects_true_half_precision_on_cuda(tmp_path, tiny_llama_dir):
    from tests.conftest import cli_command
    from tests.test_cli import _dlmi_config, _env

    config = _dlmi_config(tmp_path, tiny_llama_dir, num_steps=4)
    run = subprocess.run(cli_command() + ["fit", "--config", str(config), "--trainer.accelerator", "cuda",
                                          "--trainer.precision", "bf16-true"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 2 and "bf16-mixed" in run.stderr.splitlines()[-1]


@pytest.mark.parametrize("method", ["sipit", "dlmi"])
def test_cli_job_on_one_gpu_with_bf16_mixed(tmp_path, tiny_llama_dir, method):
    from lit_inversion.results import read_results
    from tests.conftest import cli_command
    from tests.test_cli import _dlmi_config, _env, _prompts, _write_config

    config = (_write_config(tmp_path, tiny_llama_dir, _prompts(tmp_path, 2, 5)) if method == "sipit"
              else _dlmi_config(tmp_path, tiny_llama_dir, num_steps=8))
    run = subprocess.run(cli_command() + ["fit", "--config", str(config), "--trainer.accelerator", "cuda",
                                          "--trainer.precision", "bf16-mixed"],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_results(tmp_path / "results.jsonl")
    assert len(records) == (2 if method == "sipit" else 4)
    if method == "sipit":
        assert all(r["exact_match"] for r in records)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("method", ["sipit", "dlmi"])
def test_two_gpus_with_nccl_match_one_gpu(tmp_path, tiny_llama_dir, method):
    from tests.test_distributed import two_process_matches_one

    two_process_matches_one(tmp_path, tiny_llama_dir, method, accelerator="cuda")
