"""manifest.json: the alignment contract of a shard set (docs/format.md §3).

The manifest is written last, from the units' completion records (``contracts.units``), and
is what readers trust: teacher and tokenizer identity, vocabulary sizes, how targets were
chosen and coded, the plan, and one entry (a completion record) per shard.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydistill.config.sections import MODE_ONLY_SETTINGS
from raydistill.contracts.shards import codec as C
from raydistill.contracts.shards.codec import Codec, token_dtype_for
from raydistill.contracts.shards.format import SUPPORTED_VERSIONS
from raydistill.contracts.shards.vocab import VocabTable
from raydistill.contracts.units import SHA256_PATTERN, RelativePath, UnitRecord, describe_validation
from raydistill.errors import ContractError, ShardError
from raydistill.io import storage

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
TOKENIZER_DIR = "tokenizer"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A shard is one unit's output: its manifest entry is the unit's completion record.
ShardInfo = UnitRecord


class TeacherInfo(_Model):
    name_or_path: str
    config_sha256: str
    weights_sha256: str


class TokenizerInfo(_Model):
    sha256: str
    path: RelativePath = TOKENIZER_DIR  # copy of the teacher's tokenizer inside the shard set
    files: dict[RelativePath, str] | None = Field(
        None, description="sha256 of every file of the copy, by path inside it (format 1.2; None before)")


class SparsifyInfo(_Model):
    """How the targets were chosen and coded (docs/format.md gives every field's meaning)."""

    mode: Literal["topk", "adaptive", "sampled", "budget", "hybrid"] = "topk"
    k: int = Field(ge=1, description="ids per token: exactly k (topk), at most k (adaptive, budget), = draws "
                   "(sampled), exact ids at most k (hybrid; its drawn ids come on top)")
    temperature: float = Field(gt=0)
    threshold: float | None = Field(None, gt=0, le=1, description="adaptive: stored mass to reach")
    min_prob: float | None = Field(None, ge=0, lt=1, description="adaptive: the probability cut (0: none)")
    mean_ids: float | None = Field(None, gt=0, description="budget, hybrid: exact ids stored per token, on average "
                                   "over each unit")
    draws: int | None = Field(None, ge=1, le=65535, description="sampled: draws per token; hybrid: draws from each "
                              "token's tail")
    seed: int | None = Field(None, ge=0, description="sampled, hybrid: seed of the draws")
    id_codec: str
    value_codec: str
    value_scale: int = Field(C.DEFAULT_VALUE_SCALE, ge=1, le=255)
    tail_codec: Literal["log2-u16"] = "log2-u16"
    tail_model: Literal["uniform", "unigram"] = "unigram"
    tail_prior_exponent: float = Field(0.75, ge=0, description="unigram tail: weight ∝ (count + 1/2) ** this")

    @model_validator(mode="after")
    def _mode_fields(self) -> SparsifyInfo:
        if self.mode == "adaptive" and self.threshold is None:
            raise ValueError("adaptive mode needs a threshold")
        if self.mode in ("budget", "hybrid") and (self.mean_ids is None or self.mean_ids > self.k):
            raise ValueError(f"{self.mode} mode needs mean_ids, at most k")
        if self.mode == "hybrid" and (self.draws is None or self.seed is None or self.draws > C.HYBRID_MAX_DRAWS):
            raise ValueError(f"hybrid mode needs draws (at most {C.HYBRID_MAX_DRAWS}) and seed")
        if self.mode == "sampled" and (self.draws is None or self.seed is None or self.draws != self.k):
            raise ValueError("sampled mode needs draws and seed, and k equal to draws")
        return self

    @property
    def width(self) -> int:
        """Entries per token a reader pads the targets to: k, plus the tail draws in hybrid mode."""
        return self.k + (self.draws or 0) if self.mode == "hybrid" else self.k


def sparsify_info_for(codec: Codec, **settings: object) -> SparsifyInfo:
    """The manifest record of a codec plus the capture's target settings (``TargetsConfig.recorded()``);
    settings the codec's mode does not read are dropped, so any superset may be passed."""
    values = {k: v for k, v in settings.items() if codec.mode in MODE_ONLY_SETTINGS.get(k, (codec.mode,))}
    values.update(mode=codec.mode, k=codec.k, id_codec=codec.id_codec, value_codec=codec.value_codec,
                  value_scale=codec.value_scale)
    if codec.mode in ("sampled", "hybrid"):
        values.update(draws=codec.draws, seed=values.get("seed") or 0)
    return SparsifyInfo(**values)


class VocabTableInfo(_Model):
    """The corpus token counts that renumber ids and weight the tail (``vocab.parquet``)."""

    path: RelativePath
    sha256: str = Field(pattern=SHA256_PATTERN)
    sample_tokens: int = Field(ge=0)


class PlanInfo(_Model):
    sha256: str
    num_units: int = Field(ge=0)
    corpus: str
    max_length: int = Field(ge=1)


class Manifest(_Model):
    """Everything a student needs to check before training on a shard set."""

    format_version: str
    created_at: str
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    vocab_size: int = Field(ge=1, description="true vocabulary size (ids are < this)")
    padded_vocab_size: int = Field(ge=1, description="teacher's lm_head rows, >= vocab_size")
    token_dtype: str
    sparsify: SparsifyInfo
    vocab_table: VocabTableInfo
    plan: PlanInfo
    shards: list[ShardInfo]
    stats: dict[str, float | int | str] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if self.sparsify.k > self.vocab_size:
            raise ValueError(f"sparsify.k {self.sparsify.k} > vocab_size {self.vocab_size}")
        if self.token_dtype != token_dtype_for(self.vocab_size):
            raise ValueError(
                f"token_dtype '{self.token_dtype}' does not fit vocab_size {self.vocab_size} "
                f"(v{self.format_version} uses '{token_dtype_for(self.vocab_size)}')"
            )
        if self.sparsify.id_codec != C.id_codec_for(self.vocab_size):
            raise ValueError(f"id_codec '{self.sparsify.id_codec}' does not fit vocab_size {self.vocab_size}")
        expected_values = C.value_codec_for(self.sparsify.mode, self.sparsify.draws or self.sparsify.k)
        if self.sparsify.value_codec != expected_values:
            raise ValueError(f"value_codec '{self.sparsify.value_codec}' is not '{expected_values}' "
                             f"(what mode '{self.sparsify.mode}' uses in v{self.format_version})")
        units = [s.unit for s in self.shards]
        if len(set(units)) != len(units):
            raise ValueError("shards list a unit more than once")
        return self

    def codec(self, table: VocabTable) -> Codec:
        """The codec of this set's shards, given its vocabulary table."""
        sp = self.sparsify
        return Codec(mode=sp.mode, k=sp.k, vocab_size=self.vocab_size, table=table, draws=sp.draws or 0,
                     value_scale=sp.value_scale)

    def tail_prior(self, table: VocabTable):
        """float64 [V] weights that spread a token's tail over its unstored ids (the tail model)."""
        exponent = self.sparsify.tail_prior_exponent if self.sparsify.tail_model == "unigram" else 0.0
        return table.prior(exponent)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def utc_timestamp() -> str:
    """``created_at`` value: ISO 8601 UTC, second precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def shard_relpath(unit: int) -> str:
    return f"{SHARDS_DIR}/unit-{unit:06d}.parquet"


def write_manifest(root: str, manifest: Manifest) -> None:
    storage.atomic_write_text(storage.join(root, MANIFEST_NAME), manifest.model_dump_json(indent=2) + "\n")


def read_manifest(root: str) -> Manifest:
    """Load and validate ``root/manifest.json``; refuse versions this code cannot read."""
    url = storage.join(root, MANIFEST_NAME)
    if not storage.exists(url):
        raise ShardError(
            f"{url} not found: '{root}' is not a finished shard set (run `raydistill capture`)"
        )
    try:
        data = json.loads(storage.read_text(url))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{url} is not valid JSON ({err}); the shard set is damaged") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version not in SUPPORTED_VERSIONS:
        raise ContractError(
            f"{url} has format_version {version!r}, but this raydistill reads only "
            f"{', '.join(SUPPORTED_VERSIONS)}; use a matching raydistill version or re-run capture"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        raise ShardError(f"{url} is invalid: {describe_validation(err)}") from None


def shard_set_identity(root: str) -> str:
    """Identity of a shard set's contents: the manifest without its volatile fields (when it was
    written, the last run's statistics), so a capture rerun that finds nothing to do keeps it, and
    a re-capture (other shard checksums, settings or teacher) changes it."""
    manifest = json.loads(storage.read_text(storage.join(root, MANIFEST_NAME)))
    stable = {k: v for k, v in manifest.items() if k not in ("created_at", "stats")}
    return storage.sha256_bytes(json.dumps(stable, sort_keys=True).encode())
