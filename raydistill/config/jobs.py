"""Typed, validated configs for every stage, loaded from YAML with command-line overrides.

Every model forbids unknown keys, so a typo in a config file is an error that names the
key instead of a setting silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raydistill.errors import ConfigError


def _count_or_auto(v: Any) -> Any:
    """A whole number >= 1 (not a bool) or 'auto': counts that the cluster can also decide."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"must be a whole number >= 1 or 'auto', got {v!r}")


CountOrAuto = Annotated[int | Literal["auto"], BeforeValidator(_count_or_auto)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


def default_mean_ids(k: int) -> float:
    """Budget mode's ids per token when only the cap k is set: half of it, so a flat token may store
    twice the average (docs/format.md §7: a higher cap adds little)."""
    return k / 2


class ActorPoolConfig(Strict):
    """What every stage that runs models over a corpus with a pool of Ray actors shares (capture, select)."""

    corpus: CorpusConfig = CorpusConfig()
    trust_remote_code: bool = False
    max_length: int = Field(256, ge=8, description="window length: longer documents are split")
    docs_per_unit: int = Field(64, ge=1, description="documents per deterministic work unit (one output file "
                               "each: a shard, or a scores file)")
    batch_tokens: int = Field(4096, ge=64, description="padded tokens per forward batch")
    num_actors: CountOrAuto = Field(
        2,
        description="teacher actors, or 'auto': from the cluster's resources when the capture starts, "
        "GPUs // num_gpus_per_actor on GPUs (bounded by CPUs // threads_per_actor), else "
        "CPUs // threads_per_actor - 1 (one core left for the driver), at least 1",
    )
    num_gpus_per_actor: float = Field(0.0, ge=0, description="0 = CPU; 1 on a GPU cluster")
    threads_per_actor: int = Field(1, ge=1, description="torch CPU threads per actor")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_document_tokens: int | None = Field(
        None, ge=1, description="documents with more tokens are skipped and counted (None = no limit; "
        "setting it costs one tokenizer pass over the corpus on the driver)"
    )


class CaptureConfig(ActorPoolConfig):
    """``raydistill precompute``: run the teacher once and store sparse targets."""

    teacher: str = Field(..., description="HF model directory or hub id of the teacher")
    gguf_file: str | None = Field(
        None, description="a GGUF file inside `teacher` to load (weights, config and tokenizer; needs "
        "`pip install 'raydistill[gguf]'`); the manifest records its sha256")
    output: str = Field(..., description="directory/URL of the shard set to write")
    mode: Literal["budget", "topk", "adaptive", "sampled"] = Field(
        "budget", description="budget: `mean_ids` ids per token on average, the most probable of each unit "
        "(at most k per token); topk: the k most probable ids; adaptive: the fewest reaching `threshold` of the "
        "mass or down to `min_prob`, at most k; sampled: `draws` draws from the teacher, stored as unique ids "
        "with counts")
    k: int = Field(96, ge=1, le=1024, description="ids stored per token (budget, adaptive: at most k)")
    mean_ids: float | None = Field(None, gt=0, le=1024, description="budget mode: ids per token on average over "
                                   "each unit (default k / 2); bytes grow with it (≈ 1 B per id on a 4k "
                                   "vocabulary, 1.7 B on 49k)")
    threshold: float = Field(0.95, gt=0, le=1, description="adaptive mode: stored mass to reach")
    min_prob: float = Field(0.0, ge=0, lt=1, description="adaptive mode: stop at the first id below this "
                            "probability (0: no cut); the TV-optimal way to spend a mean number of ids")
    draws: int = Field(64, ge=1, le=65535, description="sampled mode: draws per token")
    seed: int = Field(0, ge=0, description="sampled mode: seed of the draws (reproducible per token)")
    value_scale: int = Field(128, ge=1, le=255, description="probability code round(value_scale·√p), one byte")
    tail_model: Literal["uniform", "unigram"] = Field(
        "unigram", description="how readers spread the tail mass over unstored ids: uniformly, or by corpus "
        "token counts ** tail_prior_exponent")
    tail_prior_exponent: float = Field(0.75, ge=0, le=2)
    vocab_sample_tokens: int = Field(
        2_000_000, ge=0, description="corpus tokens counted (on the driver, before capture) for the id "
        "renumbering and the unigram tail; 0 = no counting (identity renumbering, uniform prior)")
    temperature: float = Field(1.0, gt=0, description="capture temperature; the loss reuses it")
    device_map: str | None = Field(
        None, description="teachers too big for one GPU: 'auto' spreads layers over the actor's "
        "num_gpus_per_actor GPUs with HF device_map (needs `accelerate`)"
    )

    @model_validator(mode="after")
    def _budget_fits(self) -> CaptureConfig:
        if self.mode == "budget" and self.mean_ids is not None and self.mean_ids > self.k:
            raise ValueError(f"mean_ids={self.mean_ids:g} is above k={self.k}, the most ids a token may store; "
                             "raise k or lower mean_ids")
        return self

    @property
    def budget_mean_ids(self) -> float | None:
        """Budget mode's ids per token (``mean_ids``, else half of k); None in the other modes."""
        if self.mode != "budget":
            return None
        return self.mean_ids if self.mean_ids is not None else default_mean_ids(self.k)


class SelectConfig(ActorPoolConfig):
    """``raydistill select``: MiniPLM difference sampling, a refined corpus from teacher-vs-reference scores."""

    teacher: str = Field(..., description="HF model directory or hub id of the teacher")
    gguf_file: str | None = Field(None, description="a GGUF file inside `teacher` to load")
    reference: str = Field(..., description="a small reference model with the teacher's tokenizer (HF directory "
                           "or hub id)")
    reference_gguf_file: str | None = Field(None, description="a GGUF file inside `reference` to load")
    output: str = Field(..., description="directory/URL for the scores, the report and (by default) the refined "
                        "corpus")
    fraction: float = Field(0.5, gt=0, le=1, description="share of the documents to keep, highest scores first")
    refined: str | None = Field(None, description="URL of the refined corpus (default <output>/refined.<format>)")
    refined_format: Literal["jsonl", "parquet"] = "jsonl"

    @model_validator(mode="after")
    def _format_matches_name(self) -> SelectConfig:
        other = {"jsonl": ".parquet", "parquet": ".jsonl"}[self.refined_format]
        if self.refined is not None and self.refined.endswith(other):
            raise ValueError(f"refined={self.refined} ends in {other} but refined_format is {self.refined_format}; "
                             f"set refined_format: {other[1:]}")
        return self


class StudentConfig(Strict):
    """A student: either an existing HF model directory, or a named size built from a config."""

    model: str | None = Field(None, description="HF model dir/hub id to start from (else `size`)")
    size: str | None = Field("tiny", description="a named size from raydistill.models.loading.STUDENT_SIZES")

    @model_validator(mode="after")
    def _one_of(self) -> StudentConfig:
        if self.model is None and self.size is None:
            raise ValueError("set either student.model or student.size")
        return self


class TrainConfig(Strict):
    """``raydistill train``: train one student with DeepSpeed under Ray Train, from one of two sources.

    ``shards``: a shard set written by ``raydistill precompute`` (sparse logit KD + CE; the student
    uses the teacher's tokenizer). ``corpus``: a text corpus, tokenized with any tokenizer and
    trained with CE only ("MiniPLM mode": the teacher's knowledge reaches the student through
    which documents were selected, not through its logits).
    """

    shards: str | None = Field(None, description="shard set written by `raydistill precompute` (logit KD); "
                               "or set `corpus`")
    corpus: CorpusConfig | None = Field(
        None, description="train on a text corpus instead of a shard set: CE on the next token with any tokenizer "
        "(MiniPLM mode; loss must be ce)")
    tokenizer: str | None = Field(
        None, description="corpus mode: HF tokenizer directory or hub id that tokenizes the corpus (default: "
        "student.model's tokenizer); the exported student gets a copy")
    output: str = Field(..., description="directory for the exported HF student and metrics")
    student: StudentConfig = StudentConfig()
    name: str | None = Field(None, description="run name (resume key); default: output dir name")
    storage_path: str | None = Field(None, description="Ray Train storage for checkpoints; default <output>/ray")
    loss: Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tvd", "jsd", "ce"] = Field(
        "forward_kl", description="divergence over the k stored ids + tail bucket; 'ce' trains a CE-only baseline"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha*KD + (1-alpha)*CE")
    skew: float = Field(0.1, gt=0, lt=1, description="mix weight λ of skew_forward_kl / skew_reverse_kl (DistiLLM)")
    tail_target: Literal["ghost", "prior"] = Field(
        "ghost", description="how KD reads a token's tail mass: 'ghost', one extra bucket (the student learns how "
        "much mass lies outside the stored ids); 'prior', spread over the unstored ids by the shard set's tail "
        "model (forward KL over the whole vocabulary, the reading the format's fidelity figures use)")
    online_teacher: str | None = Field(
        None, description="online-KD baseline: an HF teacher directory run inside the training loop on the same "
        "batches, KD over its full distribution (forward KL); the stored targets are then ignored")
    taid: bool = Field(False, description="TAID: the KD target moves from the student to the teacher over training")
    taid_start: float = Field(0.2, ge=0, le=1, description="TAID teacher weight at step 0")
    taid_fraction: float = Field(0.5, ge=0, le=1, description="share of the steps over which the TAID weight rises to 1")
    seq_len: int = Field(128, ge=8)
    micro_batch_size: int = Field(8, ge=1, description="sequences per worker per micro-step")
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    zero_stage: int = Field(2, description="DeepSpeed ZeRO stage 0-3")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    offload: bool = Field(False, description="ZeRO CPU offload of optimizer state")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    threads_per_worker: int = Field(1, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    log_every: int = Field(10, ge=1)

    @field_validator("zero_stage")
    @classmethod
    def _zero_stage(cls, v: int) -> int:
        if v not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {v}")
        return v

    @model_validator(mode="after")
    def _one_data_source(self) -> TrainConfig:
        if self.shards is None and self.corpus is None:
            raise ValueError("set a data source: shards (a shard set from `raydistill precompute`, logit KD) or "
                             "corpus (a text corpus, CE only)")
        if self.shards is not None and self.corpus is not None:
            raise ValueError("set either shards or corpus, not both: shards trains on the teacher's stored targets, "
                             "corpus with CE on raw text; remove one")
        if self.corpus is None:
            if self.tokenizer is not None:
                raise ValueError("tokenizer is for corpus mode; a shard set carries its teacher's tokenizer "
                                 "(remove tokenizer, or set corpus instead of shards)")
            return self
        if self.online_teacher is not None:
            raise ValueError("online_teacher cannot be used with corpus: online KD needs the teacher's tokenizer "
                             "and a shard set; remove online_teacher (corpus mode is CE only)")
        if self.loss != "ce":
            raise ValueError(f"loss '{self.loss}' cannot be used with corpus: logit KD needs a shard set captured "
                             "with the student's tokenizer; training on a text corpus is CE only (\"MiniPLM mode\"): "
                             "set loss: ce")
        if self.corpus_tokenizer is None:
            raise ValueError("corpus needs a tokenizer: set tokenizer (an HF tokenizer directory or hub id) or "
                             "student.model (its tokenizer is used)")
        return self

    @property
    def corpus_tokenizer(self) -> str | None:
        """Corpus mode's tokenizer: ``tokenizer``, else student.model's; None in shard mode."""
        if self.corpus is None:
            return None
        return self.tokenizer or self.student.model

    @model_validator(mode="after")
    def _taid_needs_kd(self) -> TrainConfig:
        if self.taid and self.loss == "ce":
            raise ValueError("taid: true needs a KD loss, but loss is 'ce' (set taid: false or pick a divergence)")
        if self.tail_target == "prior" and (self.loss not in ("forward_kl", "ce") or self.taid):
            raise ValueError(f"tail_target: prior works with loss forward_kl without TAID, not loss '{self.loss}'"
                             f"{' with taid' if self.taid else ''}")
        if self.online_teacher and (self.loss != "forward_kl" or self.taid):
            raise ValueError(f"online_teacher runs dense forward-KL KD; loss is '{self.loss}'"
                             f"{' with taid' if self.taid else ''} (set loss: forward_kl, taid: false)")
        return self


class EvalConfig(Strict):
    """``raydistill eval``: held-out loss and perplexity of an HF model directory."""

    model: str
    corpus: CorpusConfig = CorpusConfig(split="heldout")
    max_length: int = Field(256, ge=8)
    batch_size: int = Field(16, ge=1)
    max_documents: int | None = Field(None, gt=0)
    trust_remote_code: bool = False


class SweepConfig(Strict):
    """``raydistill sweep``: a ladder of student sizes from one shard set, with baselines."""

    shards: str = Field(..., description="shard set written by `raydistill precompute`")
    output: str = Field(..., description="local directory for the runs, results.csv/.md and plots")
    sizes: list[str] = Field(["micro", "tiny", "small", "base"], min_length=1,
                             description="student sizes (raydistill.models.loading.STUDENT_SIZES: one template scaled "
                             "in width and depth)")
    ce_baseline: bool = Field(True, description="a CE-only student at every size")
    online_kd_sizes: list[str] | None = Field(
        None, description="sizes that also get a dense online-KD run (teacher in the loop); default: the smallest")
    seeds: list[int] = Field([0, 1], min_length=1, description="seeds of the smallest size (other sizes: the first)")
    teacher: str | None = Field(None, description="teacher directory for online KD and agreement (default: the "
                                "manifest's teacher path)")
    train: dict[str, Any] = Field({}, description="TrainConfig settings shared by every run (steps, lr, alpha, "
                                  "loss, num_workers, ...)")
    max_parallel: CountOrAuto = Field(
        "auto", description="runs side by side; 'auto': what the cluster's CPUs/GPUs fit (1 on a laptop)")
    heldout: CorpusConfig = CorpusConfig(split="heldout")
    eval_max_length: int = Field(256, ge=8)


    @model_validator(mode="after")
    def _train_settings(self) -> SweepConfig:
        owned = {"shards", "output", "student", "seed", "name", "online_teacher"} & set(self.train)
        if owned:
            raise ValueError(f"train.{sorted(owned)[0]} is set by the sweep for each run; remove it")
        try:
            TrainConfig(shards="s", output="o", **self.train)
        except ValidationError as err:
            raise ValueError(format_validation_error(err, "in train")) from None
        unknown = [s for s in [*self.sizes, *(self.online_kd_sizes or [])] if s not in _student_sizes()]
        if unknown:
            raise ValueError(f"unknown student size '{unknown[0]}'; known: {', '.join(_student_sizes())}")
        return self


def _student_sizes() -> tuple[str, ...]:
    from raydistill.models.loading import STUDENT_SIZES

    return tuple(STUDENT_SIZES)


class DemoConfig(Strict):
    """``raydistill demo``: the whole pipeline on the embedded corpus, sized for a laptop."""

    workdir: str = "raydistill-demo"
    teacher_steps: int = Field(300, ge=1, description="demo teacher steps of 16x128 tokens (about one epoch)")
    teacher_minutes: float = Field(4.0, gt=0, description="time cap on the demo teacher's training")
    student_sizes: list[str] = Field(["tiny", "small"], min_length=1)
    ce_baseline: bool = Field(True, description="a CE-only student beside each KD student")
    online_kd_sizes: list[str] = Field(["tiny"], description="sizes that also get dense online KD (teacher in the loop)")
    steps: int = Field(150, ge=1, description="optimizer steps per student (2 workers x 8 x 128 tokens)")
    mode: Literal["budget", "topk", "adaptive", "sampled"] = Field(
        "sampled", description="capture mode; sampled: on the demo teacher the students it teaches match online KD "
        "(docs/results.md), where the format's fidelity default, budget, keeps a third of that gain")
    draws: int = Field(64, ge=1, le=65535, description="sampled mode: draws per token")
    k: int = Field(96, ge=1, le=1024, description="budget/top-k/adaptive: most ids a token may store")
    mean_ids: float | None = Field(None, gt=0, le=1024, description="budget: ids per token on average (default k / 2)")
    max_documents: int | None = Field(None, gt=0, description="cap on corpus documents, for quick runs")
    select: bool = Field(True, description="last stage: `raydistill select` (MiniPLM) with a reference model trained "
                         "briefly on the same corpus")
    select_fraction: float = Field(0.5, gt=0, le=1, description="share of the train documents the selection keeps")
    reference_steps: int = Field(80, ge=1, description="reference model steps of 16x128 tokens")


M = TypeVar("M", bound=BaseModel)


def format_validation_error(err: ValidationError, where: str) -> str:
    """Turn pydantic's multi-line report into one line naming each bad field."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing required key '{loc}'")
        else:
            parts.append(f"'{loc}': {e['msg']}")
    return f"invalid config {where}: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is parsed as YAML so numbers and bools work."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. --set k=32)")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def build_config(model: type[M], data: dict[str, Any], where: str, overrides: list[str] = ()) -> M:
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{key}' is not a section")
        node[path[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where)) from None


def load_config(model: type[M], path: str | Path, overrides: list[str] = ()) -> M:
    """Load a YAML config file into ``model``; every problem becomes one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return build_config(model, data, f"in {path}", overrides)
