"""The student size ladder, the demo teacher's shape, and loading/identifying HF models.

Sizes are named flavors (as in torchtitan) so a sweep config can say "tiny, small, base"
and every run of it builds the same architectures.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from raydistill.errors import ConfigError, ModelLoadError
from raydistill.models.tokenizers import _first_line, _looks_local, load_from_gguf

__all__ = [
    "STUDENT_SIZES",
    "TEACHER_SIZE",
    "align_special_tokens",
    "build_llama",
    "build_student",
    "count_parameters",
    "load_causal_lm",
    "model_identity",
]


def _ffn(hidden: int) -> int:
    """SwiGLU width ≈ 8/3·hidden (same parameters as a 4·hidden MLP), a multiple of 16."""
    return max(16, round(hidden * 8 / 3 / 16) * 16)


def _flavor(hidden: int, layers: int, heads: int) -> dict:
    return {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": _ffn(hidden)}


# Head dim 32 for students (16 for micro); with vocab 4096 and tied embeddings these span
# ≈ 0.14M .. 4.2M parameters, so a ladder of 4 covers > 10×. Listed smallest first (the sweep
# orders its ladder by this list).
STUDENT_SIZES: dict[str, dict] = {
    "micro": _flavor(32, 1, 2),
    "tiny": _flavor(64, 2, 2),
    "small": _flavor(128, 2, 4),
    "base": _flavor(192, 3, 6),
    "medium": _flavor(256, 4, 8),
}

# Demo teacher: ≈ 4.2M parameters with vocab 4096 — what 2 CPU cores train usefully in minutes.
TEACHER_SIZE: dict = _flavor(256, 4, 4)

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Keys that change with the library doing the saving, not with the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")


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
        intermediate_size=intermediate or _ffn(hidden),
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        # Our tokenizers put eos/bos/pad at their own ids; align_special_tokens() sets them.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model


def build_student(size: str, *, vocab_size: int, max_positions: int = 512, seed: int = 0) -> PreTrainedModel:
    """A student of a named size from :data:`STUDENT_SIZES`."""
    if size not in STUDENT_SIZES:
        raise ConfigError(f"unknown student size '{size}'; known sizes: {', '.join(STUDENT_SIZES)}")
    return build_llama(vocab_size=vocab_size, max_positions=max_positions, seed=seed, **STUDENT_SIZES[size])


def align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Copy the tokenizer's bos/eos/pad ids into the model's config and generation config."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        setattr(model.config, name, value)
        if model.generation_config is not None:
            setattr(model.generation_config, name, value)


def load_causal_lm(
    path: str, *, trust_remote_code: bool = False, dtype: torch.dtype | None = None, device_map: str | None = None,
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained, with any failure turned into one ModelLoadError line.

    ``device_map`` (e.g. "auto") lets HF spread a model too big for one GPU over several; it needs `accelerate`.
    ``gguf_file``: a GGUF file inside ``path``; HF dequantizes it into a normal torch model (needs `gguf`).
    """
    if gguf_file is None:
        _check_model_dir(path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise ConfigError(f"device_map={device_map!r} needs the 'accelerate' package on every process that "
                              "loads the model (pip install accelerate); or leave device_map unset")
        kwargs["device_map"] = device_map
    if gguf_file is not None:
        return load_from_gguf(AutoModelForCausalLM, path, gguf_file, "causal LM", **kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:
        raise ModelLoadError(
            f"cannot load a causal LM from '{path}': {_first_line(err)}; "
            "pass a directory written by save_pretrained or a hub id"
        ) from err


def _check_model_dir(path: str) -> None:
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(
                f"'{path}' is not a model directory (no config.json); "
                "pass a directory written by save_pretrained or a hub id"
            )
    elif _looks_local(path):
        raise ModelLoadError(
            f"model path '{path}' does not exist; pass a directory written by save_pretrained or a hub id"
        )


def model_identity(path: str, gguf_file: str | None = None) -> dict:
    """Name, config hash and weights hash: what the manifest records as the teacher's identity.

    The config hash ignores keys that only say which library version saved it; the weights
    hash covers the bytes of every weight file of a local directory, in sorted name order.
    A GGUF teacher is one file holding config, tokenizer and weights: both hashes are its sha256.
    """
    if gguf_file is not None:
        file = os.path.join(path, gguf_file)
        sha = _file_sha256(file) if os.path.isfile(file) else "unavailable"  # what `sha256sum FILE` prints
        return {"name_or_path": f"{path}#{gguf_file}", "config_sha256": sha, "weights_sha256": sha}
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        weights = sorted(
            os.path.join(path, f)
            for f in os.listdir(path)
            if f.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(path, f))
        )
    else:  # a hub id: hash the config if it is in the local cache; weights are not read here
        config_file, weights = _cached_hub_file(path, "config.json"), []
    return {
        "name_or_path": path,
        "config_sha256": _config_sha256(config_file) if config_file else "unavailable",
        "weights_sha256": _files_sha256(weights) if weights else "unavailable",
    }


def _config_sha256(config_file: str) -> str:
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "unavailable"
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _file_sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _files_sha256(files: list[str]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(os.path.basename(file).encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id the hub client rejects: nothing to hash
        return None
    return found if isinstance(found, str) else None


def count_parameters(model: torch.nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (tied weights counted once), optionally without the embedding tables."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get, lambda: None)()
            if module is not None:
                for p in module.parameters():
                    params.pop(id(p), None)
    return sum(p.numel() for p in params.values())
