"""Device neutrality on the CPU: every tensor lit_inversion makes names its device.

On CUDA a tensor made without a device lands on the CPU (or, under a device context, on the GPU) and
then meets tensors on the other device. CPU tests cannot see that, so one step of every method runs
under `RequireDevice`, which lists each factory call in lit_inversion that gives no device.
"""

from __future__ import annotations

import random

import pytest
import torch

from lit_inversion.dlmi import DlmiConfig, make_batch, method_config
from lit_inversion.dlmi.batch import check_batches
from lit_inversion.dlmi.pool import TargetPool
from lit_inversion.dlmi.data import OutputTarget
from tests.device_guard import RequireDevice

TARGET = [5, 9, 7, 11]
ONE_STEP = {"prompt_length": 3, "num_steps": 2, "check_every": 1}
METHOD_OPTIONS = {
    "dlmi": dict(refine_candidates=4, refine_topk=8, gumbel_samples=2),
    "dlmi-relaxed": dict(refine_fraction=0.5, refine_candidates=4, refine_topk=8, gumbel_samples=2),
    "paper": dict(gumbel_samples=2),
    "gbda": dict(gumbel_samples=2),
    "reinforce": dict(samples=2),
    "gcg": dict(search_width=4, topk=8),
    "dlmi-repeat": dict(init="repeat", refine_candidates=4, refine_topk=8, gumbel_samples=2),
}


def _config(name: str):
    method = name.split("-")[0]
    if method == "paper":
        from lit_inversion.dlmi import DlmiConfig

        return DlmiConfig.paper(**ONE_STEP, **METHOD_OPTIONS[name])
    return method_config(method, **ONE_STEP, **METHOD_OPTIONS[name])


def test_the_guard_catches_a_missing_device():
    import lit_inversion.precision as inside  # any module of the package: the guard filters by file

    with RequireDevice() as guard:
        exec(compile("torch.zeros(2)\ntorch.zeros(2, device='cpu')\ntorch.Generator()", inside.__file__, "exec"),
             {"torch": torch})
    assert [m.split()[-1] for m in guard.missing] == ["zeros", "Generator"]


@pytest.mark.parametrize("name", list(METHOD_OPTIONS))
def test_every_output_inversion_method_names_its_devices(tiny_llama, name):
    config = _config(name)
    with RequireDevice() as guard:
        pool = TargetPool(tiny_llama, config, slots=2)
        pool.enqueue([OutputTarget("a", TARGET), OutputTarget("b", TARGET[:3])])
        for _ in range(2):
            pool.step()
        state = pool.state_dict()
        batch = make_batch(tiny_llama, [TARGET], config)
        batch.load_state_dict(state["a"]["state"]) if "a" in state else None
        check_batches([batch])
        batch.result(0)
    assert guard.missing == [], "tensors made without a device:\n" + "\n".join(sorted(set(guard.missing)))


def test_difficulty_targets_name_their_devices(tiny_llama):
    from lit_inversion.dlmi.targets import difficulty_sequence, perplexity

    with RequireDevice() as guard:
        ids = difficulty_sequence(tiny_llama, 3, 4, random.Random(0))
        perplexity(tiny_llama, ids)
    assert guard.missing == [], "\n".join(sorted(set(guard.missing)))


@pytest.mark.parametrize("method", ["sipit", "pez", "random"])
def test_hidden_state_inversion_names_its_devices(tiny_llama, method):
    from lit_inversion import invert_hidden_states
    from lit_inversion.sipit.api import capture_hidden_states

    states = capture_hidden_states([5, 9, 7], model=tiny_llama, layer=2)
    options = {"pez": dict(method="pez", num_steps=3), "random": dict(policy="random"), "sipit": {}}[method]
    with RequireDevice() as guard:
        invert_hidden_states(states, model=tiny_llama, layer=2, **options)
    assert guard.missing == [], "\n".join(sorted(set(guard.missing)))


def test_bf16_capture_inversion_names_its_devices(tiny_llama):
    from lit_inversion import invert_hidden_states
    from lit_inversion.sipit.api import capture_hidden_states

    states = capture_hidden_states([5, 9, 7], model=tiny_llama, layer=2, capture_dtype="bfloat16")
    with RequireDevice() as guard:
        invert_hidden_states(states, model=tiny_llama, layer=2, capture_dtype="bfloat16")
    assert guard.missing == [], "\n".join(sorted(set(guard.missing)))


@pytest.mark.parametrize("method", ["sipit", "dlmi"])
def test_the_lightning_jobs_name_their_devices(tmp_path, tiny_llama_dir, method):
    """The whole job (data module, module hooks, results, checkpoint), not only the algorithms."""
    import lightning as L

    from lit_inversion.checkpointing import LastCheckpoint
    from lit_inversion.dlmi import DlmiModule, OutputTargetsDataModule
    from lit_inversion.sipit import HiddenStatesDataModule, SipItModule

    if method == "sipit":
        module = SipItModule(str(tiny_llama_dir), results_path=str(tmp_path / "results.jsonl"))
        data = HiddenStatesDataModule(layer=2, num_random=2, random_length=4)
    else:
        (tmp_path / "targets.jsonl").write_text('{"id": "a", "ids": [5, 9, 7]}\n{"id": "b", "ids": [9, 11]}\n')
        module = DlmiModule(str(tiny_llama_dir), results_path=str(tmp_path / "results.jsonl"), checkpoint_every=2,
                            prompt_length=3, num_steps=4,
                            method=DlmiConfig(check_every=2, refine_candidates=4, refine_topk=8))
        data = OutputTargetsDataModule(targets_file=str(tmp_path / "targets.jsonl"), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        default_root_dir=tmp_path, callbacks=[LastCheckpoint(dirpath=str(tmp_path / "ckpt"))])
    with RequireDevice() as guard:
        trainer.fit(module, datamodule=data)
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 2
    assert guard.missing == [], "\n".join(sorted(set(guard.missing)))
