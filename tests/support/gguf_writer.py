"""Write a Hugging Face Llama (with its byte-level BPE tokenizer) as a GGUF file, as llama.cpp's
converter lays it out: tests need a GGUF teacher and no model can be downloaded here."""

from __future__ import annotations

import json
import os

import numpy as np


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers undoes it on load."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_llama_gguf(model, tokenizer, path: str) -> str:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("raydistill-test-teacher")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [""] * len(spec["model"]["vocab"])
    for token, index in spec["model"]["vocab"].items():
        tokens[index] = token
    special = {t["id"] for t in spec.get("added_tokens", [])}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for name in ("bos", "eos", "pad"):
        if getattr(tokenizer, f"{name}_token_id") is not None:
            getattr(writer, f"add_{name}_token_id")(getattr(tokenizer, f"{name}_token_id"))

    w = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        for gguf_name, hf_name in (("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"),
                                   ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                                   ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                                   ("ffn_down", "mlp.down_proj")):
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", w[layer + hf_name + ".weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(w[layer + "self_attn.q_proj.weight"],
                                                             cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(w[layer + "self_attn.k_proj.weight"],
                                                             cfg.num_key_value_heads))
    writer.add_tensor("output_norm.weight", w["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", w["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.basename(path)
