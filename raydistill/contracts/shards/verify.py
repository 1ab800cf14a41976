"""`raydistill verify` and `raydistill inspect`: audit a shard set without trusting it.

Verification reports every problem it finds (it does not stop at the first), each naming
the file, so one run tells the user everything to delete and redo.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.contracts.shards.format import DecodedShard, budget_total
from raydistill.contracts.shards.manifest import MANIFEST_NAME, SHARDS_DIR, Manifest
from raydistill.contracts.shards.reader import ShardSet, parse_shard_bytes
from raydistill.contracts.units import DONE_DIR, read_completions
from raydistill.errors import RaydistillError
from raydistill.io import storage

_MASS_TOLERANCE = 1e-3  # |sum of decoded probs + tail - 1|: the decoder rescales, so only rounding remains
ENTROPY_BINS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, float("inf"))  # nats


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
    if shard.ids.size and (shard.ids.min() < -1 or shard.ids.max() >= v):
        out.append(f"stored ids outside [0, {v})")
    mode = manifest.sparsify.mode
    if mode in ("adaptive", "budget") and shard.num_ids.size and shard.num_ids.min() < 1:
        out.append(f"{mode} targets with no stored id")
    if mode == "budget":  # the unit's cut stores exactly its budget (fewer only where rows are short of k)
        want = budget_total(manifest.sparsify.mean_ids, shard.num_tokens, manifest.sparsify.k)
        if int(shard.num_ids.sum()) != want:
            out.append(f"budget mode stores {int(shard.num_ids.sum())} ids for {shard.num_tokens} tokens, "
                       f"not round(mean_ids={manifest.sparsify.mean_ids:g} × tokens) = {want}")
    probs, tail = shard.probs, shard.tail
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1 + 1e-6).all()):
        out.append("stored probabilities outside [0, 1]")
    if not (np.isfinite(tail).all() and (tail >= 0).all() and (tail <= 1).all()):
        out.append("tail outside [0, 1]")
    if probs.size and np.abs(probs.sum(axis=1, dtype=np.float64) + tail - 1).max() > _MASS_TOLERANCE:
        out.append(f"stored probabilities + tail differ from 1 by more than {_MASS_TOLERANCE}")
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
            shard = parse_shard_bytes(data, ss.codec, url)
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
    try:
        _ = ss.codec  # loads and checks vocab.parquet, without which no shard decodes
    except RaydistillError as err:
        return [Problem(storage.join(ss.root, ss.manifest.vocab_table.path), str(err)), *_verify_listing(ss)]
    return _verify_shards(ss) + _verify_listing(ss)


def target_entropy(shard: DecodedShard, prior: np.ndarray) -> np.ndarray:
    """Entropy (nats) [T] of each token's stored target, its tail spread by ``prior`` [V].

    Closed form, no [T, V] array: for tail t spread as t·w_j/Z over the unstored ids
    (Z = 1 − Σ_stored w), the tail's share is −t·log(t/Z) − (t/Z)·Σ_unstored w_j log w_j.
    """
    valid = shard.ids >= 0
    safe = np.where(valid, shard.ids, 0)
    p = shard.probs.astype(np.float64)
    stored = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
    w = np.where(valid, prior[safe], 0.0)
    wlogw = np.where(valid, w * np.log(np.where(w > 0, w, 1.0)), 0.0).sum(axis=1)
    z = np.clip(1.0 - w.sum(axis=1), 1e-300, None)
    t = shard.tail.astype(np.float64)
    all_wlogw = float((prior * np.log(prior)).sum())
    tail_part = np.where(t > 0, -t * np.log(np.where(t > 0, t, 1.0) / z) - (t / z) * (all_wlogw - wlogw), 0.0)
    return stored + tail_part


def _split(col_bytes: dict[str, int], tokens: int) -> dict[str, float]:
    """Bytes per token as ids / values / tokens / other (num_ids, tail, row keys)."""
    if not tokens:
        return {}
    groups = {"ids": ("ids",), "values": ("values",), "tokens": ("tokens",)}
    out = {g: sum(col_bytes.get(c, 0) for c in cols) / tokens for g, cols in groups.items()}
    out["other"] = sum(b for c, b in col_bytes.items() if c not in ("ids", "values", "tokens")) / tokens
    return out


def inspect_shard_set(root: str, *, sample_shards: int = 4) -> dict:
    """Summary of a shard set: sizes, bytes per token (total, per column, and split into ids /
    values / tokens / other), contract, stored mass, ids per token and a histogram of the
    stored targets' entropy (tail spread by the set's tail model).

    Column shares and stored mass come from the first ``sample_shards`` non-empty shards, so
    inspecting a large set on remote storage stays cheap.
    """
    ss = ShardSet(root)
    m = ss.manifest
    tokens = m.total_tokens
    sample = [i for i, s in enumerate(m.shards) if s.tokens > 0][:sample_shards]
    col_bytes: dict[str, int] = {}
    stored_mass, tail_mass, ids_per_token, sample_tokens = 0.0, 0.0, 0.0, 0
    prior = m.tail_prior(ss.vocab_table)
    entropy_counts = np.zeros(len(ENTROPY_BINS) - 1, dtype=np.int64)
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
        shard = parse_shard_bytes(data, ss.codec, ss.shard_url(i))
        stored_mass += float((1.0 - shard.stored_tail).sum(dtype=np.float64))
        tail_mass += float(shard.stored_tail.sum(dtype=np.float64))
        ids_per_token += float(shard.num_ids.sum())
        entropy_counts += np.histogram(target_entropy(shard, prior), bins=ENTROPY_BINS)[0]
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
        "bytes_per_token_split": _split(col_bytes, sample_tokens),
        "k": m.sparsify.k,
        "mode": m.sparsify.mode,
        "mean_ids": m.sparsify.mean_ids,
        "temperature": m.sparsify.temperature,
        "value_codec": m.sparsify.value_codec,
        "value_scale": m.sparsify.value_scale,
        "id_codec": m.sparsify.id_codec,
        "tail_model": m.sparsify.tail_model,
        "tail_prior_exponent": m.sparsify.tail_prior_exponent,
        "mean_ids_per_token": ids_per_token / sample_tokens if sample_tokens else None,
        "entropy_histogram": {
            "bins_nats": [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(ENTROPY_BINS)],
            "tokens": entropy_counts.tolist(),
        },
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
