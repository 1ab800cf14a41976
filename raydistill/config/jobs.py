"""One config per command, each the union of the sections (``sections.py``) it needs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raydistill.config.base import CountOrAuto, Strict
from raydistill.config.sections import (
    SAMPLED_DEFAULT_DRAWS,
    ActorPoolConfig,
    CheckpointConfig,
    CorpusConfig,
    RunSettings,
    StudentConfig,
    TargetMode,
    TargetsConfig,
)

__all__ = ["CaptureConfig", "DemoConfig", "EvalConfig", "LadderStudent", "SelectConfig", "SweepConfig",
           "TrainConfig"]


class CaptureConfig(ActorPoolConfig, TargetsConfig):
    """``raydistill capture`` (alias ``precompute``): run the teacher once and store sparse targets."""

    teacher: str = Field(..., description="HF model directory or hub id of the teacher")
    gguf_file: str | None = Field(
        None, description="a GGUF file inside `teacher` to load (weights, config and tokenizer; needs "
        "`pip install 'raydistill[gguf]'`); the manifest records its sha256")
    output: str = Field(..., description="directory/URL of the shard set to write")
    vocab_sample_tokens: int = Field(
        2_000_000, ge=0, description="corpus tokens counted (by Ray tasks over an evenly spaced sample of "
        "units, before capture) for the id renumbering and the unigram tail; 0 = no counting (identity renumbering, uniform prior)")
    device_map: str | None = Field(
        None, description="teachers too big for one GPU: 'auto' spreads layers over the actor's "
        "num_gpus_per_actor GPUs with HF device_map (needs `accelerate`)"
    )

    @property
    def targets(self) -> TargetsConfig:
        return self.section(TargetsConfig)


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
    max_repeated_lines: float | None = Field(
        None, ge=0, le=1, description="drop documents whose lines repeating an earlier line hold more than this share "
        "of their characters before keeping the top scores (Gopher's rule uses 0.2): difference sampling alone "
        "favours repeated boilerplate, which a large teacher copies from context (docs/results.md); a ranking "
        "setting, so changing it re-ranks without scoring; None: off")
    refined: str | None = Field(None, description="folder/URL of the refined corpus, one part-NNNNNN.<format> per "
                                "unit, written by the workers (default <output>/refined)")
    refined_format: Literal["jsonl", "parquet"] = "jsonl"

    @model_validator(mode="after")
    def _refined_is_a_folder(self) -> SelectConfig:
        if self.refined is not None and self.refined.rstrip("/").endswith((".jsonl", ".parquet", ".json")):
            raise ValueError(f"refined={self.refined} names a file, but the refined corpus is a folder of parts (one "
                             "per unit, written where the unit is read); name a folder, e.g. "
                             f"{self.refined.rstrip('/').rsplit('.', 1)[0]}/")
        return self


class TrainConfig(RunSettings, CheckpointConfig):
    """``raydistill train``: train one student with DeepSpeed under Ray Train, from one of two sources.

    ``shards``: a shard set written by ``raydistill capture`` (sparse logit KD + CE; the student
    uses the teacher's tokenizer). ``corpus``: a text corpus, tokenized with any tokenizer and
    trained with CE only ("MiniPLM mode": the teacher's knowledge reaches the student through
    which documents were selected, not through its logits).
    """

    shards: str | None = Field(None, description="shard set written by `raydistill capture` (logit KD); "
                               "or set `corpus`")
    check_shards: Literal["full", "sizes"] = Field(
        "full", description="what the driver checks of the shard set before any worker starts, as `raydistill "
        "verify` does: full (every shard's sha256 and contents: one read of the set) or sizes (plan, records, "
        "tokenizer, vocabulary table and file sizes only; each shard's sha256 is then checked as it is first read)")
    corpus: CorpusConfig | None = Field(
        None, description="train on a text corpus instead of a shard set: CE on the next token with any tokenizer "
        "(MiniPLM mode; loss must be ce)")
    tokenizer: str | None = Field(
        None, description="corpus mode: HF tokenizer directory or hub id that tokenizes the corpus (default: "
        "student.model's tokenizer); the exported student gets a copy")
    output: str = Field(..., description="directory for the exported HF student and metrics")
    student: StudentConfig = StudentConfig()
    online_teacher: str | None = Field(
        None, description="online-KD baseline: an HF teacher directory run inside the training loop on the same "
        "batches, KD over its full distribution (forward KL); the stored targets are then ignored")
    seed: int = 0

    @model_validator(mode="after")
    def _one_data_source(self) -> TrainConfig:
        if self.shards is None and self.corpus is None:
            raise ValueError("set a data source: shards (a shard set from `raydistill capture`, logit KD) or "
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

    @model_validator(mode="after")
    def _online_is_dense_forward_kl(self) -> TrainConfig:
        if self.online_teacher and (self.loss != "forward_kl" or self.taid):
            raise ValueError(f"online_teacher runs dense forward-KL KD; loss is '{self.loss}'"
                             f"{' with taid' if self.taid else ''} (set loss: forward_kl, taid: false)")
        return self

    @property
    def corpus_tokenizer(self) -> str | None:
        """Corpus mode's tokenizer: ``tokenizer``, else student.model's; None in shard mode."""
        if self.corpus is None:
            return None
        return self.tokenizer or self.student.model


class EvalConfig(Strict):
    """``raydistill evaluate`` (alias ``eval``): held-out loss and perplexity of an HF model directory."""

    model: str
    corpus: CorpusConfig = CorpusConfig(split="heldout")
    max_length: int = Field(256, ge=8)
    batch_size: int = Field(16, ge=1)
    max_documents: int | None = Field(None, gt=0)
    trust_remote_code: bool = False


# Keys of TrainConfig that the sweep sets for each run itself.
_SWEEP_OWNED = ("shards", "corpus", "tokenizer", "output", "student", "seed", "name", "storage_path",
                "online_teacher", "checkpoint_every")


class LadderStudent(StudentConfig):
    """One student of a sweep's ladder: any student (a size name alone is short for it), and a name."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="what its runs are "
                             "called (runs/<name>-<kind>-s<seed>/); default from the student, e.g. small, "
                             "qwen2-h512-l8, teacher-d0.5")

    def student(self) -> StudentConfig:
        """The student itself, without the sweep's name for it."""
        return StudentConfig.model_validate(self.model_dump(exclude={"name"}))


class SweepConfig(Strict):
    """``raydistill sweep``: a ladder of students from one shard set, with baselines."""

    shards: str = Field(..., description="shard set written by `raydistill capture`")
    output: str = Field(..., description="local directory for the runs, results.csv/.md and plots")
    sizes: list[LadderStudent] = Field(
        ["micro", "tiny", "small", "base"], min_length=1, validate_default=True,
        description="the students, run smallest first (by parameters): named sizes "
        "(raydistill.models.sizes.STUDENT_SIZES: one template scaled in width and depth) or any student "
        "(a shape, config, teacher_fraction or model, with an optional name)")
    ce_baseline: bool = Field(True, description="a CE-only student at every size")
    online_kd_sizes: list[str] | None = Field(
        None, description="names of the ladder's students that also get a dense online-KD run (teacher in the "
        "loop); default: the smallest")
    seeds: list[int] = Field([0, 1], min_length=1, description="seeds of the smallest size (other sizes: the first)")
    teacher: str | None = Field(None, description="teacher directory for online KD and agreement (default: the "
                                "manifest's teacher path)")
    train: RunSettings = Field(RunSettings(), description="how every run trains (steps, lr, alpha, loss, "
                               "num_workers, ...): RunSettings, shared by every run")
    max_parallel: CountOrAuto = Field(
        "auto", description="runs side by side; 'auto': what the cluster's CPUs/GPUs fit (1 on a laptop)")
    heldout: CorpusConfig = CorpusConfig(split="heldout")
    eval_max_length: int = Field(256, ge=8)

    @model_validator(mode="before")
    @classmethod
    def _owned_keys(cls, data: Any) -> Any:
        train = data.get("train") if isinstance(data, dict) else None
        owned = sorted(set(_SWEEP_OWNED) & set(train)) if isinstance(train, dict) else []
        if owned:
            raise ValueError(f"train.{owned[0]} is set by the sweep for each run; remove it")
        return data


class DemoConfig(Strict):
    """``raydistill demo``: the whole pipeline on the embedded corpus, sized for a laptop."""

    workdir: str = "raydistill-demo"
    teacher_steps: int = Field(300, ge=1, description="demo teacher steps of 16x128 tokens (about one epoch); a "
                               "fixed count, so the teacher is the same on a quiet or a loaded machine")
    student_sizes: list[str] = Field(["tiny", "small"], min_length=1)
    ce_baseline: bool = Field(True, description="a CE-only student beside each KD student")
    online_kd_sizes: list[str] = Field(["tiny"], description="sizes that also get dense online KD (teacher in the loop)")
    steps: int = Field(150, ge=1, description="optimizer steps per student (2 workers x 8 x 128 tokens)")
    mode: TargetMode = Field(
        "sampled", description="capture mode; sampled: on the demo teacher the students it teaches match online KD "
        "(docs/results.md), where the format's fidelity default, budget, keeps a third of that gain")
    draws: int = Field(SAMPLED_DEFAULT_DRAWS, ge=1, le=65535, description="sampled mode: draws per token")
    k: int = Field(96, ge=1, le=1024, description="budget/top-k/adaptive: most ids a token may store")
    mean_ids: float | None = Field(None, gt=0, le=1024, description="budget: ids per token on average (default k / 2)")
    max_documents: int | None = Field(None, gt=0, description="cap on corpus documents, for quick runs")
    select: bool = Field(True, description="last stage: `raydistill select` (MiniPLM) with a reference model trained "
                         "briefly on the same corpus")
    select_fraction: float = Field(0.5, gt=0, le=1, description="share of the train documents the selection keeps")
    reference_steps: int = Field(80, ge=1, description="reference model steps of 16x128 tokens")
