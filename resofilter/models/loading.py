"""Loading causal LMs and tokenizers, and building tiny random ones in-process.

The same ``AutoModelForCausalLM``/``AutoTokenizer`` path serves google/gemma-2-2b on a GPU
and the embedded tiny Llama here; only the directory differs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from resofilter.errors import ConfigError, ResoFilterError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "fp64": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, key: str = "model.dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ConfigError(key, f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def _check_local(name_or_path: str, needs: str = "config.json") -> None:
    """A path-like name must be an existing directory holding ``needs`` (hub names pass through)."""
    p = Path(name_or_path)
    looks_local = p.is_absolute() or name_or_path.startswith((".", "~")) or p.exists()
    if looks_local and not (p / needs).exists():
        raise ResoFilterError(f"model directory {name_or_path!r} not found or has no {needs}")


def load_tokenizer(name_or_path: str, padding_side: str = "right", **kwargs: Any) -> Any:
    _check_local(name_or_path, "tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tok.pad_token_id is None:  # Llama-2 has none; padding positions are masked anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the dtype and attention kernel stated."""
    _check_local(name_or_path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), **extra, **kwargs)
    log.info("loaded %s (%s, %.2fM parameters)", name_or_path, model.dtype,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def model_skeleton(name_or_path: str) -> PreTrainedModel:
    """The model's module structure on the meta device: names and shapes, no weights read or allocated."""
    from transformers import AutoConfig

    _check_local(name_or_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))


def tiny_model_config(arch: str, vocab_size: int, **sizes: Any) -> Any:
    """A transformers config for a tiny ``llama``, ``gemma`` or ``gemma2`` model."""
    from transformers import Gemma2Config, GemmaConfig, LlamaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=sizes.get("hidden_size", 64),
        intermediate_size=sizes.get("intermediate_size", 128),
        num_hidden_layers=sizes.get("num_hidden_layers", 4),
        num_attention_heads=sizes.get("num_attention_heads", 4),
        num_key_value_heads=sizes.get("num_key_value_heads", sizes.get("num_attention_heads", 4)),
        max_position_embeddings=sizes.get("max_position_embeddings", 512),
        pad_token_id=sizes.get("pad_token_id", 0),
        bos_token_id=sizes.get("bos_token_id", 1),
        eos_token_id=sizes.get("eos_token_id", 2),
        tie_word_embeddings=sizes.get("tie_word_embeddings", False),
    )
    if arch == "llama":
        return LlamaConfig(**common, rms_norm_eps=1e-5)
    head_dim = common["hidden_size"] // common["num_attention_heads"]
    if arch == "gemma":
        return GemmaConfig(**common, head_dim=head_dim)
    if arch == "gemma2":
        return Gemma2Config(
            **common, head_dim=head_dim,
            attn_logit_softcapping=sizes.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=sizes.get("final_logit_softcapping", 30.0),
            sliding_window=sizes.get("sliding_window", 16),
            query_pre_attn_scalar=head_dim,
            attn_implementation="eager",
        )
    raise ConfigError("model.embedded.arch", f"unknown tiny architecture {arch!r}; expected llama|gemma|gemma2")


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0, **sizes: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM (deterministic by ``seed``)."""
    config = tiny_model_config(arch, vocab_size, **sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if arch == "gemma2" else "sdpa")
    return model
