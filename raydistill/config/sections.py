"""Config sections, each declared once: job configs (``jobs.py``) and worker settings are unions of these.

A section is a flat mixin (its keys sit at the top level of a job's YAML, as they always have);
``Strict.section(Section)`` takes one out whole. The capture's plan hash and its manifest both
read :meth:`TargetsConfig.recorded`, so a new target setting is one edit here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from raydistill.config.base import CountOrAuto, Strict

__all__ = [
    "MODE_ONLY_SETTINGS",
    "STUDENT_KIND_FIELDS",
    "ActorPoolConfig",
    "CheckpointConfig",
    "CorpusConfig",
    "EngineConfig",
    "LossConfig",
    "OptimizerConfig",
    "RunSettings",
    "ScheduleConfig",
    "StudentConfig",
    "StudentKind",
    "TargetMode",
    "TargetsConfig",
    "TeacherFraction",
    "UnitInputConfig",
    "WindowConfig",
    "default_mean_ids",
]

TargetMode = Literal["budget", "topk", "adaptive", "sampled", "hybrid"]
Divergence = Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tvd", "jsd", "ce"]


class CorpusConfig(Strict):
    """Where documents come from. ``source="default"`` is the embedded corpus (no download)."""

    source: str = Field("default", description="'default' or a path/URL/glob of .jsonl, .parquet or .txt files")
    text_field: str = Field("text", description="column/key holding the text in jsonl and parquet files")
    split: Literal["train", "heldout", "all"] = Field("train", description="which deterministic split to use")
    heldout_fraction: float = Field(0.05, gt=0, lt=1)
    max_documents: int | None = Field(None, gt=0, description="cap on documents, for quick runs")
    selection: str | None = Field(
        None, description="output directory of `raydistill select` over this same corpus: keep only the documents "
        "it kept (e.g. capture sparse targets for the selected documents only)")


SHARED_FILESYSTEM_HELP = (
    "the local paths of this job (output, corpus, shards, storage_path) are on a filesystem every node of the "
    "cluster mounts at the same place (NFS, Lustre); without it a local path on a cluster of more than one node "
    "is refused, as each node would use its own disk")


# --- running models over a corpus (capture, select) ------------------------------------------------


class WindowConfig(Strict):
    """How one worker cuts documents into windows, batches them and runs its model."""

    max_length: int = Field(256, ge=8, description="window length: longer documents are split")
    batch_tokens: int = Field(4096, ge=64, description="padded tokens per forward batch")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads_per_actor: int = Field(1, ge=1, description="torch CPU threads per actor")
    trust_remote_code: bool = False


class UnitInputConfig(Strict):
    """What a unit worker needs to read its own slice of the corpus (capture, select): the corpus
    section and the per-document length limit. Workers apply both; the driver only plans."""

    corpus: CorpusConfig = CorpusConfig()
    max_document_tokens: int | None = Field(
        None, ge=1, description="documents with more tokens are skipped and counted (None = no limit); the "
        "workers tokenize their own documents, so it costs the driver nothing")


class ActorPoolConfig(WindowConfig, UnitInputConfig):
    """What every stage that runs models over a corpus with a pool of Ray actors shares (capture, select)."""

    unit_bytes: int = Field(
        32 << 20, ge=256, description="corpus bytes per deterministic work unit (one output file each: a "
        "shard, or a scores file; the unit of resume): a byte range of a JSON-lines file, rows of a Parquet "
        "file, or the embedded corpus's documents; compressed files, .json, .txt and Arrow files are one "
        "unit each")
    num_actors: CountOrAuto = Field(
        2,
        description="teacher actors, or 'auto': from the cluster's resources when the capture starts, "
        "GPUs // num_gpus_per_actor on GPUs (bounded by CPUs // threads_per_actor), else "
        "CPUs // threads_per_actor - 1 (one core left for the driver), at least 1",
    )
    num_gpus_per_actor: float = Field(0.0, ge=0, description="0 = CPU; 1 on a GPU cluster")
    shared_filesystem: bool = Field(False, description=SHARED_FILESYSTEM_HELP)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "docs_per_unit" in data:
            raise ValueError("docs_per_unit was replaced by unit_bytes (corpus bytes per unit, planned from file "
                             "sizes without reading the corpus); set e.g. unit_bytes: 33554432")
        return data


def default_mean_ids(k: int) -> float:
    """Budget mode's ids per token when only the cap k is set: half of it, so a flat token may store
    twice the average (docs/format.md §7: a higher cap adds little)."""
    return k / 2


# Settings that only one mode reads; the others record them as None (so they never split a plan hash).
MODE_ONLY_SETTINGS: dict[str, tuple[str, ...]] = {
    "threshold": ("adaptive",), "min_prob": ("adaptive",), "mean_ids": ("budget", "hybrid"),
    "draws": ("sampled", "hybrid"), "seed": ("sampled", "hybrid")}
HYBRID_DEFAULT_DRAWS = 16  # hybrid mode's tail draws when `draws` is not set
SAMPLED_DEFAULT_DRAWS = 32  # sampled mode's draws when `draws` is not set


class TargetsConfig(Strict):
    """What a capture stores per token: the sparse picture of the teacher's distribution (docs/format.md)."""

    mode: TargetMode = Field(
        "sampled", description="sampled (the default: the students it teaches keep >= 0.9 of online KD's gain "
        "on the demo teacher and on SmolLM2-135M at the fewest stored bytes, docs/results.md): `draws` draws "
        "from the teacher per token, stored as unique ids with counts; "
        "budget: `mean_ids` ids per token on average, the most probable of each unit "
        "(at most k per token); topk: the k most probable ids; adaptive: the fewest reaching `threshold` of the "
        "mass or down to `min_prob`, at most k; hybrid: budget's exact ids plus `draws` draws from the rest of each token's distribution "
        "(exact where the mass is, unbiased in the tail)")
    k: int = Field(96, ge=1, le=1024, description="ids stored per token (budget, adaptive: at most k)")
    mean_ids: float | None = Field(None, gt=0, le=1024, description="budget mode: ids per token on average over "
                                   "each unit (default k / 2); bytes grow with it (≈ 1 B per id on a 4k "
                                   "vocabulary, 1.7 B on 49k)")
    threshold: float = Field(0.95, gt=0, le=1, description="adaptive mode: stored mass to reach")
    min_prob: float = Field(0.0, ge=0, lt=1, description="adaptive mode: stop at the first id below this "
                            "probability (0: no cut); the TV-optimal way to spend a mean number of ids")
    draws: int | None = Field(None, ge=1, le=65535, description=f"sampled mode: draws per token (default {SAMPLED_DEFAULT_DRAWS}); "
                              f"hybrid: draws from each token's tail (default {HYBRID_DEFAULT_DRAWS}, at most 255)")
    seed: int = Field(0, ge=0, description="sampled/hybrid mode: seed of the draws (reproducible per token)")
    value_scale: int = Field(128, ge=1, le=255, description="probability code round(value_scale·√p), one byte")
    tail_model: Literal["uniform", "unigram"] = Field(
        "unigram", description="how readers spread the tail mass over unstored ids: uniformly, or by corpus "
        "token counts ** tail_prior_exponent")
    tail_prior_exponent: float = Field(0.75, ge=0, le=2)
    temperature: float = Field(1.0, gt=0, description="capture temperature; the loss reuses it")

    @model_validator(mode="after")
    def _budget_fits(self) -> TargetsConfig:
        if self.mode in ("budget", "hybrid") and self.mean_ids is not None and self.mean_ids > self.k:
            raise ValueError(f"mean_ids={self.mean_ids:g} is above k={self.k}, the most ids a token may store; "
                             "raise k or lower mean_ids")
        if self.mode == "hybrid" and self.draws is not None and self.draws > 255:
            raise ValueError(f"draws={self.draws}: hybrid mode stores its tail draws' counts in one byte; set "
                             "draws <= 255")
        return self

    @property
    def budget_mean_ids(self) -> float | None:
        """Budget/hybrid mode's exact ids per token (``mean_ids``, else half of k); None in the other modes."""
        if self.mode not in ("budget", "hybrid"):
            return None
        return self.mean_ids if self.mean_ids is not None else default_mean_ids(self.k)

    @property
    def draw_count(self) -> int:
        """Draws per token (sampled) or per token's tail (hybrid), defaults filled in; 0 in the other modes."""
        if self.mode == "sampled":
            return self.draws if self.draws is not None else SAMPLED_DEFAULT_DRAWS
        if self.mode == "hybrid":
            return self.draws if self.draws is not None else HYBRID_DEFAULT_DRAWS
        return 0

    @property
    def width(self) -> int:
        """Ids per token the manifest's ``k`` names: the draws in sampled mode, else k."""
        return self.draw_count if self.mode == "sampled" else self.k

    def recorded(self) -> dict[str, Any]:
        """Every setting as the plan hash and the manifest's ``sparsify`` record it: settings the mode
        does not read are None, ``k`` is the width, and ``mean_ids`` / ``draws`` are the effective ones."""
        out = self.model_dump()
        out.update(k=self.width, mean_ids=self.budget_mean_ids, draws=self.draw_count or None)
        for name, modes in MODE_ONLY_SETTINGS.items():
            if self.mode not in modes:
                out[name] = None
        return out


# --- training one student ----------------------------------------------------------------------


StudentKind = Literal["size", "shape", "config", "teacher_fraction", "model"]

# The fields that make each kind of student: a student sets the fields of exactly one kind.
STUDENT_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "size": ("size",),
    "shape": ("family", "hidden", "layers", "heads", "kv_heads", "intermediate", "tied"),
    "config": ("config",),
    "teacher_fraction": ("teacher_fraction",),
    "model": ("model",),
}
_SHAPE_NEEDS = ("family", "hidden", "layers", "heads")
_BUILT_KINDS = ("size", "shape", "teacher_fraction")  # the kinds whose positions student.max_positions sets


class TeacherFraction(Strict):
    """A student cut from the teacher's own config: its family and vocabulary, fewer layers, fewer heads."""

    depth: float = Field(1.0, gt=0, le=1, description="share of the teacher's layers: round(depth·layers), "
                         "at least 1, evenly spaced (the first and the last kept)")
    width: float = Field(1.0, gt=0, le=1, description="share of the teacher's kv heads (the heads per kv "
                         "head and head_dim kept): hidden size, heads and MLP width scale with it")
    init: Literal["random", "teacher"] = Field(
        "random", description="random: a fresh init of that shape; teacher: the teacher's weights (embeddings, "
        "the kept layers, final norm, lm_head; needs width 1.0)")
    teacher: str | None = Field(None, description="the teacher: HF directory, hub id or DIR#FILE.gguf "
                                "(default: the shard set manifest's teacher.name_or_path)")

    @model_validator(mode="after")
    def _copy_needs_full_width(self) -> TeacherFraction:
        if self.init == "teacher" and self.width != 1:
            raise ValueError(f"student.teacher_fraction.init: teacher copies whole layers, so it needs width 1.0, "
                             f"not {self.width:g}; set width: 1.0 or init: random")
        return self


class StudentConfig(Strict):
    """A student, exactly one of: a named ``size``; an explicit shape (``family``, ``hidden``, ``layers``,
    ``heads``, ...); an HF ``config`` directory; a ``teacher_fraction``; a pretrained ``model``. All but the
    last start from a random init; ``student: NAME`` is short for ``student: {size: NAME}``, and a student
    that sets none is ``size: tiny`` (docs/operations.md, "Students of any shape")."""

    size: str | None = Field(None, description="a named size from raydistill.models.sizes.STUDENT_SIZES")
    family: str | None = Field(None, description="shape: an HF causal-LM model type (llama, qwen2, mistral, "
                               "gemma, ...)")
    hidden: int | None = Field(None, ge=1, description="shape: hidden size (a multiple of heads)")
    layers: int | None = Field(None, ge=1, description="shape: decoder layers")
    heads: int | None = Field(None, ge=1, description="shape: attention heads")
    kv_heads: int | None = Field(None, ge=1, description="shape: key/value heads, dividing heads (default heads)")
    intermediate: int | None = Field(None, ge=1, description="shape: MLP width (default ≈ 8/3·hidden, a "
                                     "multiple of 16)")
    tied: bool | None = Field(None, description="shape: tie the embedding and lm_head (default true)")
    max_positions: int | None = Field(None, ge=8, description="size, shape, teacher_fraction: positions "
                                      "(default 512; a teacher fraction: the teacher's)")
    config: str | None = Field(None, description="an HF directory whose config.json gives the shape (random "
                               "init; its vocab_size must cover the data's ids)")
    teacher_fraction: TeacherFraction | None = Field(None, description="a fraction of the teacher (depth, width, "
                                                     "init, teacher)")
    model: str | None = Field(None, description="an HF model dir/hub id to start from (its weights)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"size": data}
        fields = [f for kind in STUDENT_KIND_FIELDS.values() for f in kind]
        if isinstance(data, dict) and all(data.get(f) is None for f in fields):
            return {**data, "size": "tiny"}
        return data

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> StudentConfig:
        kinds = self._kinds()
        if len(kinds) > 1:
            fields = [f"student.{f}" for kind_fields in kinds.values() for f in kind_fields]
            named = f"{', '.join(fields[:-1])} and {fields[-1]}"
            raise ValueError(f"the student sets {named}: a student is exactly one of size, a shape (family, "
                             "hidden, layers, heads, ...), config, teacher_fraction or model; keep one")
        missing = [f for f in _SHAPE_NEEDS if "shape" in kinds and getattr(self, f) is None]
        if missing:
            raise ValueError(f"a student shape needs {', '.join(_SHAPE_NEEDS)}; set student.{missing[0]}")
        if self.max_positions is not None and self.kind not in _BUILT_KINDS:
            raise ValueError(f"student.max_positions is for built students; a student.{self.kind} has its own "
                             "max_position_embeddings: remove max_positions")
        return self

    def _kinds(self) -> dict[str, list[str]]:
        """Each kind this student sets fields of, with those fields."""
        found = {kind: [f for f in fields if getattr(self, f) is not None]
                 for kind, fields in STUDENT_KIND_FIELDS.items()}
        return {kind: fields for kind, fields in found.items() if fields}

    @property
    def kind(self) -> StudentKind:
        return next(iter(self._kinds()))

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler) -> dict[str, Any]:
        """The fields this student sets (and model, size as before): what a run records and compares, so
        a run finished before students had shapes is still the same run."""
        return {k: v for k, v in handler(self).items() if v is not None or k in ("model", "size")}


class LossConfig(Strict):
    """The training objective: which divergence over the stored targets, mixed with CE how."""

    loss: Divergence = Field(
        "forward_kl", description="divergence over the k stored ids + tail bucket; 'ce' trains a CE-only baseline"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha*KD + (1-alpha)*CE")
    skew: float = Field(0.1, gt=0, lt=1, description="mix weight λ of skew_forward_kl / skew_reverse_kl (DistiLLM)")
    tail_target: Literal["ghost", "prior"] = Field(
        "ghost", description="how KD reads a token's tail mass: 'ghost', one extra bucket (the student learns how "
        "much mass lies outside the stored ids); 'prior', spread over the unstored ids by the shard set's tail "
        "model (forward KL over the whole vocabulary, the reading the format's fidelity figures use)")
    taid: bool = Field(False, description="TAID: the KD target moves from the student to the teacher over training")
    taid_start: float = Field(0.2, ge=0, le=1, description="TAID teacher weight at step 0")
    taid_fraction: float = Field(0.5, ge=0, le=1, description="share of the steps over which the TAID weight rises to 1")

    @model_validator(mode="after")
    def _taid_needs_kd(self) -> LossConfig:
        if self.taid and self.loss == "ce":
            raise ValueError("taid: true needs a KD loss, but loss is 'ce' (set taid: false or pick a divergence)")
        if self.tail_target == "prior" and (self.loss not in ("forward_kl", "ce") or self.taid):
            raise ValueError(f"tail_target: prior works with loss forward_kl without TAID, not loss '{self.loss}'"
                             f"{' with taid' if self.taid else ''}")
        return self

    @property
    def kd_weight(self) -> float:
        """α, or 0 for the CE-only baseline."""
        return 0.0 if self.loss == "ce" else self.alpha


class OptimizerConfig(Strict):
    """AdamW with linear warmup and cosine decay, gradient clipping."""

    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)


class ScheduleConfig(Strict):
    """How much data each step sees and for how many steps."""

    seq_len: int = Field(128, ge=8)
    micro_batch_size: int = Field(8, ge=1, description="sequences per worker per micro-step")
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(200, ge=1, description="optimizer steps")
    log_every: int = Field(10, ge=1)


class EngineConfig(Strict):
    """Where and how the steps run: Ray Train workers, each with a DeepSpeed ZeRO engine."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage 0-3")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    offload: bool = Field(False, description="ZeRO CPU offload of optimizer state")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    threads_per_worker: int = Field(1, ge=1)
    attention: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"] = Field(
        "auto", description="the student's attention kernel; packed documents reach it as position ids that restart "
        "at 0 (no dense mask) when its family reads them (checked on a probe batch). auto: on a GPU flash_attention_2 "
        "where the flash-attn package is installed, else flex_attention when seq_len is a multiple of 128; sdpa on CPU")
    fused_loss: bool = Field(
        True, description="compute the loss from the student's final hidden states and lm_head weight a chunk of "
        "tokens at a time, never holding [tokens, V] logits, when its head is a plain linear layer (checked on a "
        "probe batch; the online-KD baseline always uses logits); false: full logits")


class CheckpointConfig(Strict):
    """Where checkpoints go and how often (resume key: name + storage_path)."""

    name: str | None = Field(None, description="run name (resume key); default: output dir name")
    storage_path: str | None = Field(None, description="Ray Train storage for checkpoints; default <output>/ray")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")


class RunSettings(LossConfig, OptimizerConfig, ScheduleConfig, EngineConfig):
    """Everything about *how* one student trains, but not on what or into where: what a sweep shares."""

    shared_filesystem: bool = Field(False, description=SHARED_FILESYSTEM_HELP)
