"""Base models: built-in tiny configs (random init, seeded, no downloads) and offline ``from_pretrained``.

Built-ins are small Llama-style decoders over the local byte tokenizer
(:mod:`signalrl.engine.tokenizer`). The same name and seed always give the same weights, which is what
lets a frozen reference copy of a built-in be rebuilt by name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, TokenizerAdapter, byte_tokenizer


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 512
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("signal-tiny", 64, 176, 2, 4, 2, description="2 layers, hidden 64, 0.11M parameters"),
        BuiltinModel("signal-tiny-4l", 128, 352, 4, 4, 2, description="4 layers, hidden 128, 0.77M parameters"),
    )
}
DEFAULT_BASE_MODEL = "signal-tiny"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def builtin_config(name: str):
    from transformers import LlamaConfig

    spec = BUILTIN_MODELS[name]
    return LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )


def load_base_model(name: str, *, dtype: Any = "float32", device: Any = "cpu", seed: int = 0,
                    arg: str = "base_model") -> tuple[torch.nn.Module, TokenizerAdapter]:
    """Load ``name`` as ``(AutoModelForCausalLM, tokenizer)``.

    ``name`` is a built-in (:data:`BUILTIN_MODELS`, initialized from ``seed``), a local model directory,
    or a hub name already in the local cache (``local_files_only=True``: nothing is downloaded). ``arg`` is the
    argument named in the error (``reference_model`` when a reference is loaded by name).
    """
    torch_dtype = resolve_dtype(dtype)
    if name in BUILTIN_MODELS:
        from transformers import LlamaForCausalLM

        cpu_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(builtin_config(name))
        finally:
            torch.random.set_rng_state(cpu_state)
        model.to(device=device, dtype=torch_dtype)
        return model, byte_tokenizer()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = name if os.path.isdir(name) else _cached_snapshot(name)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        where = "local directory" if os.path.isdir(name) else "name"
        raise ValueError(
            f"{arg}: could not load {name!r} ({where}) offline: {exc}. Use a built-in "
            f"({', '.join(BUILTIN_MODELS)}), a local model directory, or a hub model already in the local cache."
        ) from exc
    model.to(device)
    return model, TokenizerAdapter(tok)


def _cached_snapshot(name: str) -> str:
    """The local snapshot directory of a hub model already in the cache; never touches the network (a bare
    ``from_pretrained(name, local_files_only=True)`` still probes the hub for adapter files)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here means "not in the local cache"
        raise OSError(f"not a local directory and not in the local Hugging Face cache ({type(exc).__name__})") from None
