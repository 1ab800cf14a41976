"""manifest.json and completion records: the alignment contract of a shard set and its resume state.

A unit is done once its completion record ``done/unit-NNNNNN.json`` exists; the record is
written only after the shard's atomic write, so a crash between the two just redoes the
unit. The manifest is written last, from the completion records, and is what readers trust.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raydistill.contracts.shards import codec as C
from raydistill.contracts.shards.format import SUPPORTED_VERSIONS, Codec, token_dtype_for
from raydistill.contracts.shards.vocab import VocabTable
from raydistill.errors import ContractError, ShardError
from raydistill.io import storage

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
DONE_DIR = "done"
_SHA256 = r"^[0-9a-f]{64}$"
_UNIT_FILE = re.compile(r"^unit-(\d{6,})\.json$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Model):
    """One shard file: which unit made it and what a reader must find in it."""

    unit: int = Field(ge=0)
    path: str = Field(min_length=1, description="relative to the shard-set root")
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=_SHA256)


class TeacherInfo(_Model):
    name_or_path: str
    config_sha256: str
    weights_sha256: str


class TokenizerInfo(_Model):
    sha256: str
    path: str = "tokenizer"  # copy of the teacher's tokenizer inside the shard set


class SparsifyInfo(_Model):
    """How the targets were chosen and coded (docs/format.md gives every field's meaning)."""

    mode: Literal["topk", "adaptive", "sampled", "budget"] = "topk"
    k: int = Field(ge=1, description="ids per token: exactly k (topk), at most k (adaptive, budget), = draws "
                   "(sampled)")
    temperature: float = Field(gt=0)
    threshold: float | None = Field(None, gt=0, le=1, description="adaptive: stored mass to reach")
    min_prob: float | None = Field(None, ge=0, lt=1, description="adaptive: the probability cut (0: none)")
    mean_ids: float | None = Field(None, gt=0, description="budget: ids stored per token, on average over each unit")
    draws: int | None = Field(None, ge=1, le=65535, description="sampled: draws per token")
    seed: int | None = Field(None, ge=0, description="sampled: seed of the draws")
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
        if self.mode == "budget" and (self.mean_ids is None or self.mean_ids > self.k):
            raise ValueError("budget mode needs mean_ids, at most k")
        if self.mode == "sampled" and (self.draws is None or self.seed is None or self.draws != self.k):
            raise ValueError("sampled mode needs draws and seed, and k equal to draws")
        return self


def sparsify_info_for(codec: Codec, *, temperature: float, threshold: float | None = None, min_prob: float = 0.0,
                      mean_ids: float | None = None, seed: int | None = None, tail_model: str = "unigram",
                      tail_prior_exponent: float = 0.75) -> SparsifyInfo:
    """The manifest record of a codec (mode, k, draws, codec names) plus the capture's choices."""
    sampled = codec.mode == "sampled"
    return SparsifyInfo(
        mode=codec.mode, k=codec.k, temperature=temperature,
        threshold=threshold if codec.mode == "adaptive" else None,
        min_prob=min_prob if codec.mode == "adaptive" else None,
        mean_ids=mean_ids if codec.mode == "budget" else None,
        draws=codec.draws if sampled else None, seed=(seed or 0) if sampled else None,
        id_codec=codec.id_codec, value_codec=codec.value_codec, value_scale=codec.value_scale,
        tail_model=tail_model, tail_prior_exponent=tail_prior_exponent,
    )


class VocabTableInfo(_Model):
    """The corpus token counts that renumber ids and weight the tail (``vocab.parquet``)."""

    path: str
    sha256: str = Field(pattern=_SHA256)
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
        expected_values = C.count_codec_for(self.sparsify.k) if self.sparsify.mode == "sampled" else "sqrt-u8"
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


def _describe(err: ValidationError) -> str:
    """Pydantic's report as one line: ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())


def utc_timestamp() -> str:
    """``created_at`` value: ISO 8601 UTC, second precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def shard_relpath(unit: int) -> str:
    return f"{SHARDS_DIR}/unit-{unit:06d}.parquet"


def completion_url(root: str, unit: int) -> str:
    return storage.join(root, DONE_DIR, f"unit-{unit:06d}.json")


def write_manifest(root: str, manifest: Manifest) -> None:
    storage.atomic_write_text(storage.join(root, MANIFEST_NAME), manifest.model_dump_json(indent=2) + "\n")


def read_manifest(root: str) -> Manifest:
    """Load and validate ``root/manifest.json``; refuse versions this code cannot read."""
    url = storage.join(root, MANIFEST_NAME)
    if not storage.exists(url):
        raise ShardError(
            f"{url} not found: '{root}' is not a finished shard set (run `raydistill precompute`)"
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
        raise ShardError(f"{url} is invalid: {_describe(err)}") from None


def write_completion(root: str, info: ShardInfo) -> None:
    """Mark ``info.unit`` done; call only after the shard itself is durably written."""
    storage.atomic_write_text(completion_url(root, info.unit), info.model_dump_json() + "\n")


def read_completions(root: str) -> dict[int, ShardInfo]:
    """Every completion record under ``root/done``, keyed by unit."""
    done = storage.join(root, DONE_DIR)
    out: dict[int, ShardInfo] = {}
    for name in storage.list_files(done, ".json"):
        match = _UNIT_FILE.match(name)
        if not match:
            continue
        url = storage.join(done, name)
        try:
            info = ShardInfo.model_validate_json(storage.read_bytes(url))
        except ValidationError as err:
            raise ShardError(
                f"completion record {url} is invalid ({_describe(err)}); delete it to redo the unit"
            ) from None
        if info.unit != int(match.group(1)):
            raise ShardError(f"completion record {url} is for unit {info.unit}; delete it to redo the unit")
        out[info.unit] = info
    return out
