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

from raydistill.contracts.plan import PLAN_NAME, read_plan
from raydistill.contracts.shards.format import DecodedShard, budget_total
from raydistill.contracts.shards.manifest import MANIFEST_NAME, SHARDS_DIR, Manifest
from raydistill.contracts.shards.reader import ShardSet, parse_shard_bytes, shard_mismatch
from raydistill.contracts.units import DONE_DIR, read_completions
from raydistill.errors import RaydistillError, ShardError
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
    if mode in ("adaptive", "budget", "hybrid") and shard.num_ids.size and shard.num_ids.min() < 1:
        out.append(f"{mode} targets with no stored id")
    if mode == "hybrid":
        out += _check_draws(shard, manifest)
    if mode in ("budget", "hybrid"):  # the unit's cut stores exactly its budget (fewer only where rows are short of k)
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


def _check_draws(shard: DecodedShard, manifest: Manifest) -> list[str]:
    """Hybrid: every token with a tail draws from it, and never an exact id (counts that do not sum to
    ``draws`` are refused by the decoder already)."""
    out = []
    sums = shard.counts.sum(axis=1)
    if ((sums == 0) & (shard.stored_tail > _MASS_TOLERANCE)).any():
        out.append(f"hybrid tokens with a tail above {_MASS_TOLERANCE} but no draws from it")
    ordered = np.sort(np.where(shard.ids >= 0, shard.ids, -1 - np.arange(shard.ids.shape[1])), axis=1)
    if (np.diff(ordered, axis=1) == 0).any():
        out.append("hybrid tokens that store an id both exactly and among the draws")
    return out


def _check_rows(shard: DecodedShard, seen: dict[str, str], url: str) -> list[str]:
    """Each document's windows sit together, numbered 0, 1, 2, ...; no document is in two shards
    (which would train on it twice: a unit captured twice, or shards of two captures mixed)."""
    out, last_doc, expected = [], None, 0
    for doc_id, window in zip(shard.doc_ids, shard.windows.tolist(), strict=True):
        if doc_id != last_doc:
            if doc_id in seen:
                out.append(f"document {doc_id[:16]} is also in {seen[doc_id]} (a duplicated unit)")
                break
            seen[doc_id], last_doc, expected = url, doc_id, 0
        if window != expected:
            out.append(f"document {doc_id[:16]} has window {window} where {expected} was expected")
            break
        expected += 1
    return out


def _verify_shards(ss: ShardSet, *, checksums: bool = True) -> list[Problem]:
    """Each shard is there with its size; with ``checksums``, also its sha256, its decoded contents
    against its entry and its values (what training reads). Without, only sizes: a listing, no reads."""
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for i, info in enumerate(ss.manifest.shards):
        url = ss.shard_url(i)
        if not checksums:
            fs, path = storage.filesystem(url)
            if not fs.exists(path):
                problems.append(Problem(url, f"missing (unit {info.unit})"))
            elif (size := fs.size(path)) != info.bytes:
                problems.append(Problem(url, f"{size} bytes, manifest says {info.bytes} (truncated or replaced)"))
            continue
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
        mismatch = shard_mismatch(shard, info)
        if mismatch:
            problems.append(Problem(url, mismatch))
        problems.extend(Problem(url, msg) for msg in _check_values(shard, ss.manifest))
        problems.extend(Problem(url, msg) for msg in _check_rows(shard, seen, url))
    return problems


def _verify_plan(ss: ShardSet) -> list[Problem]:
    """plan.json is there, hashes to itself, is the plan the manifest names, and every entry was
    written for its unit of it."""
    url = storage.join(ss.root, PLAN_NAME)
    try:
        plan = read_plan(ss.root)
    except RaydistillError as err:
        return [Problem(url, str(err).removeprefix(f"{url} "))]
    m = ss.manifest
    if plan is None:
        return [Problem(url, "missing: the set cannot be checked against its plan, nor resumed")]
    if plan.sha256 != m.plan.sha256 or len(plan.units) != m.plan.num_units:
        return [Problem(url, f"is plan {plan.sha256[:12]} of {len(plan.units)} units, the manifest names plan "
                        f"{m.plan.sha256[:12]} of {m.plan.num_units} (plan or manifest replaced)")]
    problems = []
    for info in m.shards:
        if info.plan_sha256 is None:
            continue  # written before format 1.2
        if (info.plan_sha256 != plan.sha256 or info.unit >= len(plan.units)
                or info.unit_sha256 != plan.units[info.unit].sha256):
            problems.append(Problem(storage.join(ss.root, info.path),
                                    f"its entry is not unit {info.unit} of plan {plan.sha256[:12]}"))
    return problems


def _verify_tokenizer(ss: ShardSet) -> list[Problem]:
    """The tokenizer copy training exports beside the student: every file there with its checksum."""
    info, root = ss.manifest.tokenizer, ss.tokenizer_url()
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return [Problem(root, "missing: the student could not be exported with its tokenizer; re-run capture")]
    if info.files is None:  # before format 1.2: no checksums to check
        return []
    problems = []
    for name, sha in sorted(info.files.items()):
        url = storage.join(root, name)
        if not storage.exists(url):
            problems.append(Problem(url, "missing from the tokenizer copy; re-run capture to restore it"))
        elif storage.sha256_bytes(storage.read_bytes(url)) != sha:
            problems.append(Problem(url, "sha256 does not match the manifest (tokenizer file changed)"))
    base = path.rstrip("/") + "/"
    for entry in fs.find(path):
        name = entry.removeprefix(base)
        if name not in info.files and ".tmp-" not in name.rsplit("/", 1)[-1]:
            problems.append(Problem(storage.join(root, name), "not listed in the manifest's tokenizer files"))
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


def verify_shard_set(root: str, *, checksums: bool = True) -> list[Problem]:
    """Every problem found in the shard set at ``root``; an empty list means it is sound.

    ``checksums=False`` reads no shard (sizes from a listing): what training checks before its
    workers start when told to trust the contents until each shard is read (and checked) there.
    """
    try:
        ss = ShardSet(root)
    except RaydistillError as err:
        return [Problem(storage.join(root.rstrip("/"), MANIFEST_NAME), str(err))]
    around = _verify_plan(ss) + _verify_tokenizer(ss) + _verify_listing(ss)
    try:
        _ = ss.codec  # loads and checks vocab.parquet, without which no shard decodes
    except RaydistillError as err:
        return [Problem(storage.join(ss.root, ss.manifest.vocab_table.path), str(err)), *around]
    return _verify_shards(ss, checksums=checksums) + around


def require_sound(root: str, *, checksums: bool = True) -> None:
    """Raise ShardError unless the shard set at ``root`` verifies: what training calls before any worker
    starts, so it refuses a damaged set with ``raydistill verify``'s own words instead of failing later."""
    problems = verify_shard_set(root, checksums=checksums)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ShardError(f"shard set {root} does not verify: {problems[0]}{more}; run `raydistill verify {root}` "
                         "for the full list, then re-run the capture to repair it")


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
        ids_per_token += float((shard.ids >= 0).sum())  # hybrid: its exact ids and the draws' ids
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
