"""Students of any shape, from one spec (``StudentConfig``): a named size, an explicit shape of any HF
causal-LM family, an HF config directory, a fraction of the teacher, or a pretrained model.

``student_config`` turns a spec into its model's HF config (a bad shape is one ConfigError line naming
its field), ``build_student`` into the model (fp32, SDPA attention, seeded; a teacher fraction may start
from the teacher's weights), ``student_parameters`` counts it without allocating a weight, and
``check_student_spec`` is what a driver refuses before any worker starts. The named ladder itself
stays in ``sizes.py``.
"""

from __future__ import annotations

import difflib
import math
import os
import re

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from raydistill.config.sections import StudentConfig, TeacherFraction
from raydistill.errors import ConfigError, first_line
from raydistill.models.loading import (
    count_parameters,
    load_causal_lm,
    max_positions_of,
    model_identity,
    split_gguf_name,
)
from raydistill.models.sizes import STUDENT_SIZES, random_init, swiglu_width
from raydistill.models.tokenizers import check_local_or_hub, load_from_gguf

__all__ = ["DEFAULT_POSITIONS", "build_student", "check_student_spec", "kept_layers", "student_config",
           "student_config_sha256", "student_name", "student_parameters"]

DEFAULT_POSITIONS = 512  # a built student's positions unless student.max_positions says otherwise

# The HF config key each shape field sets.
_CONFIG_KEYS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size",
                "max_positions": "max_position_embeddings", "tied": "tie_word_embeddings"}


def student_config(spec: StudentConfig | str, vocab_size: int, teacher: str | None = None) -> PretrainedConfig:
    """The HF config of ``spec``'s model. Built students get ``vocab_size`` rows (a teacher fraction: the
    teacher's vocabulary); ``teacher`` is what a teacher fraction cuts when its spec names no teacher."""
    spec = _spec(spec)
    if spec.kind == "size":
        return _size_config(spec, vocab_size)
    if spec.kind == "shape":
        return _shape_config(spec.family, vocab_size, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                             kv_heads=spec.kv_heads, intermediate=spec.intermediate, tied=spec.tied,
                             max_positions=spec.max_positions)
    if spec.kind == "teacher_fraction":
        return _fraction_config(spec, teacher)
    return _read_config(spec.config or spec.model, f"student.{spec.kind}")


def build_student(spec: StudentConfig | str, vocab_size: int, seed: int = 0,
                  teacher: str | None = None) -> PreTrainedModel:
    """The student of ``spec``: a pretrained model loaded, any other built at random from its config (the
    same seed gives the same weights), then, for a teacher fraction with ``init: teacher``, given the
    teacher's weights."""
    spec = _spec(spec)
    if spec.kind == "model":
        return load_causal_lm(spec.model)
    model = random_init(student_config(spec, vocab_size, teacher), seed)
    fraction = spec.teacher_fraction
    if fraction is not None and fraction.init == "teacher":
        path, gguf_file = split_gguf_name(_teacher_name(fraction, teacher))
        source = load_causal_lm(path, gguf_file=gguf_file)
        _copy_teacher(model, source, kept_layers(source.config.num_hidden_layers, fraction.depth))
    return model


def student_parameters(spec: StudentConfig | str, vocab_size: int, teacher: str | None = None) -> int:
    """The parameters ``build_student`` would give ``spec`` (tied weights once), from meta tensors: no
    memory and no init, so a sweep can order a ladder of large students on its driver."""
    config = student_config(spec, vocab_size, teacher)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model)


def check_student_spec(spec: StudentConfig | str, *, vocab_size: int, seq_len: int, teacher: str | None = None,
                       data: str = "the training data") -> PretrainedConfig:
    """Refuse, on the driver, a student that cannot be built or cannot train on ``data``: a bad shape, fewer
    embedding rows than its ``vocab_size`` ids, fewer positions than ``seq_len``. Returns the config."""
    spec = _spec(spec)
    config = student_config(spec, vocab_size, teacher)
    if config.vocab_size < vocab_size:
        fix = (f"set vocab_size >= {vocab_size} in its config.json" if spec.kind == "config"
               else "use a student made for the data's tokenizer")
        raise ConfigError(f"{_source(spec, teacher)} has vocab size {config.vocab_size}, smaller than the "
                          f"{vocab_size} ids of {data}; {fix}")
    positions = max_positions_of(config)
    if positions is not None and seq_len > positions:
        raise ConfigError(f"seq_len {seq_len} is longer than the student's {positions} positions; lower seq_len "
                          f"to <= {positions}{_positions_fix(spec, seq_len)}")
    return config


def kept_layers(layers: int, depth: float) -> list[int]:
    """The teacher layers a student of ``depth`` keeps: round(depth·layers) of them (half up, at least
    one), evenly spaced with the first and the last kept, as depth-pruning work does (one: the first)."""
    keep = max(1, _round_half_up(depth * layers))
    if keep == 1:
        return [0]
    return [_round_half_up(i * (layers - 1) / (keep - 1)) for i in range(keep)]


def student_name(spec: StudentConfig | str) -> str:
    """A short readable name for ``spec`` (a sweep's run names): the size; family-h<hidden>-l<layers>;
    teacher-d<depth>[-w<width>][-copy]; or the config's or model's directory name."""
    spec = _spec(spec)
    if spec.kind == "size":
        return spec.size
    if spec.kind == "shape":
        return f"{spec.family}-h{spec.hidden}-l{spec.layers}"
    if spec.kind == "teacher_fraction":
        f = spec.teacher_fraction
        return (f"teacher-d{f.depth:g}" + (f"-w{f.width:g}" if f.width != 1 else "")
                + ("-copy" if f.init == "teacher" else ""))
    name = os.path.basename(os.path.normpath(spec.config or spec.model))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or spec.kind


def student_config_sha256(spec: StudentConfig | str) -> str | None:
    """The hash of the file a student's shape comes from beyond its spec and its data (a config
    directory's config.json, a named teacher's config), so a run resumes only on the same one; None
    when the spec and the data say it all (the shard set's identity covers the manifest's teacher)."""
    spec = _spec(spec)
    if spec.kind == "config":
        return model_identity(spec.config)["config_sha256"]
    if spec.kind == "teacher_fraction" and spec.teacher_fraction.teacher is not None:
        path, gguf_file = split_gguf_name(spec.teacher_fraction.teacher)
        return model_identity(path, gguf_file)["config_sha256"]
    return None


# --- the kinds -------------------------------------------------------------------------------


def _spec(spec: StudentConfig | str) -> StudentConfig:
    return spec if isinstance(spec, StudentConfig) else StudentConfig.model_validate(spec)


def _size_config(spec: StudentConfig, vocab_size: int) -> PretrainedConfig:
    if spec.size not in STUDENT_SIZES:
        raise ConfigError(f"unknown student size '{spec.size}'; known sizes: {', '.join(STUDENT_SIZES)} (or give "
                          "a shape: family, hidden, layers, heads)")
    return _shape_config("llama", vocab_size, max_positions=spec.max_positions, **STUDENT_SIZES[spec.size])


def _shape_config(family: str, vocab_size: int, *, hidden: int, layers: int, heads: int, kv_heads: int | None = None,
                  intermediate: int | None = None, tied: bool | None = None,
                  max_positions: int | None = None) -> PretrainedConfig:
    """A ``family`` config of exactly this shape. A key the family's config lacks is left out where the
    value is only a default, and refused where it was asked for (kv_heads below heads on a family without
    grouped-query attention, say)."""
    _check_family(family)
    kv_heads = kv_heads or heads
    if hidden % heads:
        raise ConfigError(f"student.hidden {hidden} is not divisible by student.heads {heads}; set hidden to a "
                          f"multiple of heads (e.g. {math.ceil(hidden / heads) * heads})")
    if heads % kv_heads:
        raise ConfigError(f"student.heads {heads} is not divisible by student.kv_heads {kv_heads}; set kv_heads to "
                          f"a divisor of heads (e.g. {_divisor_at_most(heads, kv_heads)})")
    asked = {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads if kv_heads != heads else None,
             "intermediate": intermediate, "tied": tied, "max_positions": max_positions}
    values = {**asked, "kv_heads": kv_heads, "intermediate": intermediate or swiglu_width(hidden),
              "tied": True if tied is None else tied, "max_positions": max_positions or DEFAULT_POSITIONS}
    base = AutoConfig.for_model(family)
    # Our tokenizers put eos/bos/pad at their own ids; align_special_tokens() sets them at export.
    settings: dict = {"vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    for field, key in _CONFIG_KEYS.items():
        if hasattr(base, key):
            settings[key] = values[field]
        elif asked[field] is not None:
            raise ConfigError(f"student.{field} {asked[field]}: a {family} config has no {key}; remove "
                              f"student.{field}" + (" (or set it to student.heads)" if field == "kv_heads" else ""))
    if hasattr(base, "head_dim"):  # gemma's is 256 whatever the hidden size
        settings["head_dim"] = hidden // heads
    try:
        return AutoConfig.for_model(family, **settings)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"student.family {family}: transformers refuses this shape ({first_line(err)}); change "
                          "the shape, or give a student.config directory") from None


def _fraction_config(spec: StudentConfig, teacher: str | None) -> PretrainedConfig:
    """The teacher's own config (family, vocabulary, every other setting) with fewer layers and heads."""
    fraction = spec.teacher_fraction
    base = _read_config(_teacher_name(fraction, teacher), "student.teacher_fraction.teacher")
    kept = kept_layers(base.num_hidden_layers, fraction.depth)
    changes: dict = {"num_hidden_layers": len(kept)}
    if isinstance(getattr(base, "layer_types", None), list):  # per-layer attention kinds follow their layers
        changes["layer_types"] = [base.layer_types[i] for i in kept]
    if fraction.width != 1:
        changes.update(_narrower(base, fraction.width))
    if spec.max_positions is not None:
        changes["max_position_embeddings"] = spec.max_positions
    stored = {base.attribute_map.get(key, key): value for key, value in changes.items()}  # gpt2: n_layer, ...
    return type(base).from_dict({**base.to_dict(), **stored})


def _narrower(base: PretrainedConfig, width: float) -> dict:
    """Heads and kv heads scaled by ``width`` (kv heads dividing heads), head_dim kept, so the hidden size
    scales with the heads; the MLP scaled alike."""
    heads = base.num_attention_heads
    kv_heads = getattr(base, "num_key_value_heads", None) or heads
    new_heads = max(1, _round_half_up(heads * width))
    out = {"num_attention_heads": new_heads, "hidden_size": new_heads * (base.hidden_size // heads)}
    if hasattr(base, "num_key_value_heads"):
        out["num_key_value_heads"] = _divisor_at_most(new_heads, max(1, _round_half_up(kv_heads * width)))
    if getattr(base, "intermediate_size", None):
        out["intermediate_size"] = max(1, _round_half_up(base.intermediate_size * width))
    return out


def _copy_teacher(student: PreTrainedModel, teacher: PreTrainedModel, kept: list[int]) -> None:
    """The teacher's weights into ``student``: its ``kept`` layers renumbered 0.., everything else
    (embeddings, final norm, lm_head) whole. Strict: every student weight comes from the teacher."""
    prefix = _layers_prefix(teacher)
    renumber = {str(old): str(new) for new, old in enumerate(kept)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if index not in renumber:
                continue
            key = f"{prefix}{renumber[index]}.{rest}"
        state[key] = value
    student.load_state_dict(state)


def _layers_prefix(model: PreTrainedModel) -> str:
    """Where the decoder layers sit in the state dict: the module list as long as the model is deep."""
    layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return f"{name}."
    raise ConfigError(f"student.teacher_fraction.init: teacher: no list of {layers} decoder layers in the "
                      f"teacher's {type(model).__name__}; use init: random")


# --- helpers -------------------------------------------------------------------------------


def _check_family(family: str) -> None:
    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = difflib.get_close_matches(family, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. llama, qwen2, mistral, gemma"
        raise ConfigError(f"student.family '{family}' is not a causal-LM model type of transformers; {hint}")


def _read_config(name: str, field: str) -> PretrainedConfig:
    """The config of a model directory, hub id or ``DIR#FILE.gguf``, or one line naming ``field``."""
    path, gguf_file = split_gguf_name(name)
    if gguf_file is not None:
        return load_from_gguf(AutoConfig, path, gguf_file, "config")
    check_local_or_hub(path, field)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field} '{name}' cannot be loaded: {first_line(err)}") from None


def _teacher_name(fraction: TeacherFraction, teacher: str | None) -> str:
    if fraction.teacher is None and teacher is None:
        raise ConfigError("student.teacher_fraction needs the teacher: set student.teacher_fraction.teacher (an HF "
                          "directory, hub id or DIR#FILE.gguf); only a shard set's manifest names one")
    return fraction.teacher or teacher


def _source(spec: StudentConfig, teacher: str | None) -> str:
    """How an error names where a student's vocabulary comes from."""
    if spec.kind == "teacher_fraction":
        return f"student.teacher_fraction's teacher '{_teacher_name(spec.teacher_fraction, teacher)}'"
    return f"student.{spec.kind} '{spec.config or spec.model}'"


def _positions_fix(spec: StudentConfig, seq_len: int) -> str:
    if spec.kind == "config":
        return f", or set max_position_embeddings >= {seq_len} in its config.json"
    return "" if spec.kind == "model" else f", or set student.max_positions >= {seq_len}"


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (1 at least)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)
