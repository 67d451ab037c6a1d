"""A Llama-architecture GGUF file as a transformers state dict and config, in one read of the file.

transformers can load a GGUF itself (`from_pretrained(dir, gguf_file=...)`), but for SmolLM2 it
parses the file three times (config, tensors, quantization: each parse decodes the 49k-token
vocabulary) and builds a tensor-name map per module: 20 of the 25 s of a conversion here. This
reads the file once and does the rest as transformers does it (the same `gguf` dequantisation, the
same reversal of llama.cpp's rotary permutation of q and k): the tensors come out bitwise equal
(`tests/test_gguf_llama.py` compares both on a GGUF it writes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# GGUF tensor names (per block `blk.N.`) -> transformers' Llama names
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part in _BLOCK:
            return f"model.layers.{layer}.{_BLOCK[part]}.{kind}"
    elif stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def unpermute_rotary(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's `permute` of a q or k projection (rows regrouped for its rotary layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_llama_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(transformers LlamaConfig kwargs, fp32 numpy state dict, quantisation name e.g. `Q4_1`)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, not llama")
    heads = _field(reader, "llama.attention.head_count")
    kv_heads = _field(reader, "llama.attention.head_count_kv") or heads
    hidden = _field(reader, "llama.embedding_length")
    names = {t.name for t in reader.tensors}
    config = {
        "vocab_size": _field(reader, "llama.vocab_size", len(_field(reader, "tokenizer.ggml.tokens", []))),
        "hidden_size": hidden, "intermediate_size": _field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _field(reader, "llama.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "max_position_embeddings": _field(reader, "llama.context_length"),
        "rms_norm_eps": _field(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_parameters": {"rope_type": "default", "rope_theta": _field(reader, "llama.rope.freq_base", 10000.0)},
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "unk_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
        "tie_word_embeddings": "output.weight" not in names,
    }
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if ".attn_q." in t.name:
            w = unpermute_rotary(w, heads)
        elif ".attn_k." in t.name:
            w = unpermute_rotary(w, kv_heads)
        # torch wants writable memory: F32 tensors come straight from the file's read-only map
        state[hf_name(t.name)] = w if w.flags.writeable and w.flags.c_contiguous else np.array(w)
    quant = gguf.LlamaFileType(int(_field(reader, "general.file_type"))).name.removeprefix("MOSTLY_")
    return config, state, quant


def save_llama_gguf_as_transformers(path: Path, folder: Path) -> str:
    """Write `path` (a Llama GGUF) into `folder` as a transformers fp32 model (config.json,
    generation_config.json, model.safetensors); returns the quantisation name."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs, state, quant = read_llama_gguf(path)
    config = LlamaConfig(**kwargs, dtype="float32", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                                strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.save_pretrained(folder)
    return quant
