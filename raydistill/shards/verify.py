"""`raydistill verify` and `raydistill inspect`: audit a shard set without trusting it.

Verification reports every problem it finds (it does not stop at the first), each naming
the file, so one run tells the user everything to delete and redo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill import storage
from raydistill.errors import RaydistillError
from raydistill.shards.format import DecodedShard
from raydistill.shards.manifest import DONE_DIR, MANIFEST_NAME, SHARDS_DIR, Manifest, read_completions
from raydistill.shards.reader import ShardSet, parse_shard_bytes

_MASS_TOLERANCE = 1e-2  # |sum of stored probs + tail - 1| after float16 rounding


@dataclass
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _check_values(shard: DecodedShard, manifest: Manifest) -> list[str]:
    """Range checks a checksum cannot give: the writer might have been wrong."""
    out = []
    v = manifest.vocab_size
    if shard.tokens.size and (shard.tokens.min() < 0 or shard.tokens.max() >= v):
        out.append(f"token ids outside [0, {v})")
    if shard.topk_ids.size and (shard.topk_ids.min() < 0 or shard.topk_ids.max() >= v):
        out.append(f"top-k ids outside [0, {v})")
    probs, tail = shard.topk_probs, shard.tail_mass
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()):
        out.append("top-k probabilities outside [0, 1]")
    if not (np.isfinite(tail).all() and (tail >= 0).all() and (tail <= 1).all()):
        out.append("tail_mass outside [0, 1]")
    if probs.size and np.abs(probs.sum(axis=1, dtype=np.float64) + tail - 1).max() > _MASS_TOLERANCE:
        out.append(f"top-k probabilities + tail_mass differ from 1 by more than {_MASS_TOLERANCE}")
    return out


def _verify_shards(ss: ShardSet) -> list[Problem]:
    problems = []
    for i, info in enumerate(ss.manifest.shards):
        url = ss.shard_url(i)
        if not storage.exists(url):
            problems.append(Problem(url, f"missing (unit {info.unit})"))
            continue
        data = storage.read_bytes(url)
        if len(data) != info.bytes:
            problems.append(
                Problem(url, f"{len(data)} bytes, manifest says {info.bytes} (truncated or replaced)")
            )
            continue
        if storage.sha256_bytes(data) != info.sha256:
            problems.append(Problem(url, "sha256 does not match the manifest (corrupted)"))
            continue
        try:
            shard = parse_shard_bytes(data, ss.manifest, url)
        except RaydistillError as err:
            problems.append(Problem(url, f"does not decode: {err}"))
            continue
        if len(shard) != info.rows or shard.num_tokens != info.tokens:
            problems.append(
                Problem(
                    url,
                    f"{len(shard)} rows / {shard.num_tokens} tokens, manifest says {info.rows} / {info.tokens}",
                )
            )
        problems.extend(Problem(url, msg) for msg in _check_values(shard, ss.manifest))
    return problems


def _verify_listing(ss: ShardSet) -> list[Problem]:
    """Completion records agree with the manifest; no unlisted files under shards/."""
    problems, root, m = [], ss.root, ss.manifest
    by_unit = {s.unit: s for s in m.shards}
    if len(m.shards) != m.plan.num_units:
        problems.append(
            Problem(
                storage.join(root, MANIFEST_NAME),
                f"lists {len(m.shards)} shards but the plan has {m.plan.num_units} units",
            )
        )
    try:
        done = read_completions(root)
    except RaydistillError as err:
        problems.append(Problem(storage.join(root, DONE_DIR), str(err)))
        done = {}
    for unit, info in sorted(done.items()):
        if unit not in by_unit:
            problems.append(
                Problem(storage.join(root, DONE_DIR, f"unit-{unit:06d}.json"), "unit not in the manifest")
            )
        elif info != by_unit[unit]:
            problems.append(
                Problem(
                    storage.join(root, DONE_DIR, f"unit-{unit:06d}.json"), "disagrees with the manifest entry"
                )
            )
    for unit in sorted(set(by_unit) - set(done)):
        problems.append(Problem(storage.join(root, by_unit[unit].path), "has no completion record"))

    listed = {s.path for s in m.shards}
    fs, path = storage.filesystem(storage.join(root, SHARDS_DIR))
    names = (
        sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) if fs.exists(path) else []
    )
    for name in names:
        if f"{SHARDS_DIR}/{name}" not in listed:
            what = (
                "leftover temporary file of an interrupted write"
                if ".tmp-" in name
                else "not listed in the manifest"
            )
            problems.append(Problem(storage.join(root, SHARDS_DIR, name), what))
    return problems


def verify_shard_set(root: str) -> list[Problem]:
    """Every problem found in the shard set at ``root``; an empty list means it is sound."""
    try:
        ss = ShardSet(root)
    except RaydistillError as err:
        return [Problem(storage.join(root.rstrip("/"), MANIFEST_NAME), str(err))]
    return _verify_shards(ss) + _verify_listing(ss)


def inspect_shard_set(root: str, *, sample_shards: int = 4) -> dict:
    """Summary of a shard set: sizes, bytes per token (total and per column), contract, stored mass.

    Column shares and stored mass come from the first ``sample_shards`` non-empty shards, so
    inspecting a large set on remote storage stays cheap.
    """
    ss = ShardSet(root)
    m = ss.manifest
    tokens = m.total_tokens
    sample = [i for i, s in enumerate(m.shards) if s.tokens > 0][:sample_shards]
    col_bytes: dict[str, int] = {}
    stored_mass, tail_mass, sample_tokens = 0.0, 0.0, 0
    for i in sample:
        data = ss.read_bytes(i)
        meta = pq.ParquetFile(pa.BufferReader(data)).metadata
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                col = group.column(c)
                col_bytes[col.path_in_schema] = (
                    col_bytes.get(col.path_in_schema, 0) + col.total_compressed_size
                )
        shard = parse_shard_bytes(data, m, ss.shard_url(i))
        stored_mass += float(shard.topk_probs.sum(dtype=np.float64))
        tail_mass += float(shard.tail_mass.sum(dtype=np.float64))
        sample_tokens += shard.num_tokens
    return {
        "root": ss.root,
        "format_version": m.format_version,
        "units": len(m.shards),
        "planned_units": m.plan.num_units,
        "rows": m.total_rows,
        "tokens": tokens,
        "bytes": m.total_bytes,
        "bytes_per_token": m.total_bytes / tokens if tokens else None,
        "bytes_per_token_by_column": {name: b / sample_tokens for name, b in sorted(col_bytes.items())}
        if sample_tokens
        else {},
        "k": m.sparsify.k,
        "mode": m.sparsify.mode,
        "temperature": m.sparsify.temperature,
        "prob_encoding": m.sparsify.prob_encoding,
        "tail_encoding": m.sparsify.tail_encoding,
        "token_dtype": m.token_dtype,
        "vocab_size": m.vocab_size,
        "padded_vocab_size": m.padded_vocab_size,
        "teacher": m.teacher.name_or_path,
        "tokenizer_sha256": m.tokenizer.sha256,
        "plan_sha256": m.plan.sha256,
        "corpus": m.plan.corpus,
        "max_length": m.plan.max_length,
        "mean_stored_mass": stored_mass / sample_tokens if sample_tokens else None,
        "mean_tail_mass": tail_mass / sample_tokens if sample_tokens else None,
        "sampled_shards": len(sample),
        "created_at": m.created_at,
        "stats": dict(m.stats),
    }
