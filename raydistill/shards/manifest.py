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

from raydistill import storage
from raydistill.errors import ContractError, ShardError
from raydistill.shards.format import SUPPORTED_VERSIONS, token_dtype_for

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
    mode: Literal["topk"] = "topk"
    k: int = Field(ge=1)
    temperature: float = Field(gt=0)
    prob_encoding: str = "float16"
    tail_encoding: str = "float32"


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
        units = [s.unit for s in self.shards]
        if len(set(units)) != len(units):
            raise ValueError("shards list a unit more than once")
        return self

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
