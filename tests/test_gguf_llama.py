"""`workflows.gguf_llama` against transformers' own GGUF loader, on a tiny Llama GGUF written here
the way llama.cpp's converter writes one (q and k rows permuted for its rotary layout; some tensors
quantised): the same config, bitwise the same tensors, and the original weights back."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from workflows.gguf_llama import hf_name, read_llama_gguf, save_llama_gguf_as_transformers

HEADS, KV_HEADS = 4, 2


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    state = {k: v.numpy() for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(96)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    reverse = {}
    for i in range(2):
        for g, h in [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("attn_norm", "input_layernorm"),
                     ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj")]:
            reverse[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    reverse |= {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for name, hf in reverse.items():
        t = state[hf]
        if ".attn_q." in name:
            t = _permute(t, HEADS)
        elif ".attn_k." in name:
            t = _permute(t, KV_HEADS)
        if t.ndim == 2:  # matrices quantised, as in a real file; norms stay F32
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, state


def test_names_map_to_llama_and_an_unknown_name_is_refused():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        hf_name("blk.0.attn_qkv.weight")


def test_the_tensors_equal_transformers_gguf_loader_and_the_original_weights(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    path, original = tiny
    config, state, quant = read_llama_gguf(path)
    assert quant == "Q8_0"
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == KV_HEADS
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref_state = reference.state_dict()
    assert set(state) == set(ref_state) - {"lm_head.weight"}
    for k, v in state.items():
        assert torch.equal(torch.from_numpy(v), ref_state[k]), k
        # the rotary permutation undone: F32 norms exactly, Q8_0 matrices within its step
        np.testing.assert_allclose(v, original[k], atol=np.abs(original[k]).max() / 100, err_msg=k)
    assert np.array_equal(state["model.layers.1.input_layernorm.weight"], original["model.layers.1.input_layernorm.weight"])

    save_llama_gguf_as_transformers(path, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"):
        assert saved[key] == reference.config.to_dict()[key], key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    assert torch.equal(reloaded(ids).logits, reference(ids).logits)
