"""Loading HF causal LMs (directories, hub ids, GGUF files) and their identity hashes.

Every failure is one ModelLoadError line; ``trust_remote_code`` is passed through as the
config sets it (off by default).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from raydistill.errors import ConfigError, ModelLoadError, first_line
from raydistill.models.tokenizers import check_local_or_hub, load_from_gguf

__all__ = ["POSITION_KEYS", "align_special_tokens", "check_model", "count_parameters", "load_causal_lm",
           "max_positions_of", "model_identity", "pick_device_and_dtype", "split_gguf_name"]


_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Config keys that bound a model's positions (Llama-style, GPT-2-style); windows longer fail or degrade.
POSITION_KEYS = ("max_position_embeddings", "n_positions")
# Keys that change with the library doing the saving, not with the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")


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
            f"cannot load a causal LM from '{path}': {first_line(err)}; "
            "pass a directory written by save_pretrained or a hub id"
        ) from err


def _check_model_dir(path: str, what: str = "model path") -> None:
    check_local_or_hub(path, what)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        gguf = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        fix = f"it holds {gguf[0]}: set gguf_file: {gguf[0]}" if gguf else \
            "pass a directory written by save_pretrained or a hub id"
        raise ModelLoadError(f"{what} '{path}' is not a model directory (no config.json); {fix}")


def check_model(path: str, *, what: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                max_length: int | None = None, length_field: str = "max_length"):
    """Refuse, on the driver and before anything is written, a model its workers could not load or run.

    Checked: the name (``check_local_or_hub``), a local directory's ``config.json`` and weights (the
    safetensors headers read, not the tensors), the config itself (GGUF metadata for ``gguf_file``),
    and ``max_length`` against the model's positions. ``what`` (e.g. "teacher") and ``length_field``
    name the fields in the messages. Returns the model's config.
    """
    from transformers import AutoConfig

    if gguf_file is not None:
        config = load_from_gguf(AutoConfig, path, gguf_file, "config", trust_remote_code=trust_remote_code)
    else:
        _check_model_dir(path, what)
        if os.path.isdir(path):
            _check_weights(path, what)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as err:
            raise ModelLoadError(f"{what} '{path}': its config cannot be read ({first_line(err)}); pass a "
                                 "directory written by save_pretrained or a hub id") from None
    positions = max_positions_of(config)
    if max_length is not None and positions is not None and max_length > positions:
        raise ConfigError(f"{length_field} {max_length} is longer than the {what}'s {positions} positions "
                          f"('{path}'); set {length_field} <= {positions}")
    return config


def _check_weights(path: str, what: str) -> None:
    weights = sorted(f for f in os.listdir(path) if f.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise ModelLoadError(f"{what} '{path}' has a config.json but no weights (model.safetensors or "
                             "pytorch_model.bin); copy the whole directory save_pretrained wrote")
    from safetensors import safe_open

    for name in weights:
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), framework="pt") as f:
                    f.keys()
            except Exception as err:
                raise ModelLoadError(f"{what} weights '{os.path.join(path, name)}' cannot be read "
                                     f"({first_line(err)}); copy the file again") from None


def max_positions_of(config) -> int | None:
    """The most positions a model config allows (``POSITION_KEYS``), or None when it states none."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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


def split_gguf_name(name_or_path: str) -> tuple[str, str | None]:
    """``(path, gguf_file)`` of a name :func:`model_identity` wrote: ``DIR#FILE.gguf`` for a GGUF model
    (how a manifest names a GGUF teacher), else ``(name_or_path, None)``."""
    path, sep, file = name_or_path.rpartition("#")
    return (path, file) if sep and path and file.endswith(".gguf") else (name_or_path, None)


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


def pick_device_and_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU (the capture runs for days there), fp32 on CPU (faster on CPUs)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype)
