"""The student size ladder and the demo teacher's shape: named flavors, as in torchtitan.

A sweep config says "tiny, small, base" and every run of it builds the same architectures.
Students of any other shape (and the named sizes, as one kind of them) are built by ``students.py``.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from raydistill.errors import ConfigError

__all__ = ["STUDENT_SIZES", "TEACHER_SIZE", "build_llama", "random_init", "swiglu_width"]


def swiglu_width(hidden: int) -> int:
    """SwiGLU width ≈ 8/3·hidden (same parameters as a 4·hidden MLP), a multiple of 16."""
    return max(16, round(hidden * 8 / 3 / 16) * 16)


def _flavor(hidden: int, layers: int, heads: int) -> dict:
    return {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": swiglu_width(hidden)}


# Head dim 32 for students (16 for micro); with vocab 4096 and tied embeddings these span
# ≈ 0.14M .. 4.2M parameters, so a ladder of 4 covers > 10×. Listed smallest first.
STUDENT_SIZES: dict[str, dict] = {
    "micro": _flavor(32, 1, 2),
    "tiny": _flavor(64, 2, 2),
    "small": _flavor(128, 2, 4),
    "base": _flavor(192, 3, 6),
    "medium": _flavor(256, 4, 8),
}

# Demo teacher: ≈ 4.2M parameters with vocab 4096 — what 2 CPU cores train usefully in minutes.
TEACHER_SIZE: dict = _flavor(256, 4, 4)


def build_llama(
    *,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = True,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Llama (fp32, SDPA attention); the same seed gives the same weights."""
    if hidden % heads:
        raise ConfigError(f"hidden size {hidden} must be divisible by the number of heads {heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate or swiglu_width(hidden),
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        # Our tokenizers put eos/bos/pad at their own ids; align_special_tokens() sets them.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return random_init(config, seed)


def random_init(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A randomly initialised model of ``config`` (fp32, SDPA attention); the same seed gives the same
    weights, and the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
