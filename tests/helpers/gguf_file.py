"""A tiny HF Llama written as a GGUF file the way llama.cpp's ``convert_hf_to_gguf.py`` writes one: llama.cpp's
tensor names, ``q_proj``/``k_proj`` rows permuted for its rotary layout, a byte-level BPE vocabulary with its
merges, a chat template, and the tensors of the caller's choice quantized to Q4_1 by ``gguf``'s own quantizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` → ``blk.3.ffn_up.weight`` (llama.cpp's names)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.rsplit(".", 1)[0]
    return f"blk.{layer}.{_NAMES[module]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` (HF's rotary halves → llama.cpp's interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer, path: Path, quantized: tuple[str, ...] = ("mlp.up_proj", "self_attn.q_proj"),
                     ) -> dict[str, np.ndarray]:
    """Write ``model`` + ``tokenizer`` to ``path``; the modules named in ``quantized`` as Q4_1, the rest F32.
    Returns the Q4_1 blocks (uint8, as stored) by HF parameter name, for the reader to decode independently."""
    import gguf

    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    blocks = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = p.detach().float().numpy().copy()
        if ".q_proj." in name:
            x = llama_cpp_permute(x, c.num_attention_heads, c.num_attention_heads)
        elif ".k_proj." in name:
            x = llama_cpp_permute(x, c.num_attention_heads, c.num_key_value_heads)
        if any(f".{m}." in name for m in quantized):
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1)
            blocks[name] = q
            w.add_tensor(gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(gguf_name(name), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return blocks


def decode_q4_1(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_1 by its definition, written out here: each 20-byte block is d (float16), m (float16), then 16 bytes
    holding 32 four-bit q (low nibbles are elements 0–15, high nibbles 16–31); the weights are d·q + m."""
    flat = blocks.reshape(-1, 20)
    d = flat[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    m = flat[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = flat[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (n, 32)
    return (d * q + m).reshape(shape), d.reshape(-1)
