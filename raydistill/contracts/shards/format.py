"""Shard format v1: the Arrow schema, and whole-shard encode/decode between targets and cells.

One row per document window; every per-token array lives in a ``binary`` cell of
fixed-width little-endian elements, byte-shuffled (docs/format.md), never in a nested list
column: list columns decode slowly, while a binary column decodes with a few vectorized
numpy operations over its value buffer. Element codecs are named in the manifest
(``raydistill.contracts.shards.codec``), so later versions can add codecs without breaking old sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raydistill.contracts.shards import codec as C
from raydistill.contracts.shards.codec import Codec
from raydistill.errors import ShardError

FORMAT_VERSION = "1.4"
# 1.1 adds mode "budget" (rows laid out as adaptive's) and the manifest's mean_ids; 1.2 adds the unit's identity
# (unit, unit hash, plan hash) to each shard's metadata and completion record, and the tokenizer copy's checksums;
# 1.3 plans units as slices of corpus files (a unit hash is its slice's: file identity and range) and adds what the
# worker read (documents, content_sha256, skipped) to each completion record; 1.4 adds mode "hybrid" (exact top ids
# plus draws from the rest, a ``num_drawn`` column) and its manifest fields
SUPPORTED_VERSIONS = ("1.0", "1.1", "1.2", "1.3", "1.4")
UNIT_METADATA_KEY = b"raydistill.unit"  # JSON {"unit", "unit_sha256", "plan_sha256"} in the Parquet schema metadata

SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("window", pa.int32(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("tokens", pa.binary(), nullable=False),
        pa.field("num_ids", pa.binary(), nullable=False),
        pa.field("ids", pa.binary(), nullable=False),
        pa.field("values", pa.binary(), nullable=False),
        pa.field("tail", pa.binary(), nullable=False),
    ],
    metadata={b"raydistill.format_version": FORMAT_VERSION.encode()},
)
COLUMNS = tuple(SCHEMA.names)
# Hybrid mode: how many distinct ids of each token were drawn from its tail (they follow its exact ids).
HYBRID_SCHEMA = SCHEMA.append(pa.field("num_drawn", pa.binary(), nullable=False))


def schema_for(mode: str) -> pa.Schema:
    """The Arrow schema of a shard of ``mode``: hybrid shards have one more column."""
    return HYBRID_SCHEMA if mode == "hybrid" else SCHEMA

_MAX_CELL_BYTES = 2**31 - 1  # pa.binary() uses int32 offsets
_MASS_TOLERANCE = 1e-2  # |sum(stored probs) + tail - 1|; loose enough for bf16 teachers, catches logits


def budget_total(mean_ids: float, tokens: int, k: int) -> int:
    """Ids a budget-mode unit of ``tokens`` tokens stores in all: round(mean_ids · tokens), at least
    one per token and at most k per token (format.md §2.5)."""
    return min(max(round(mean_ids * tokens), tokens), tokens * k)


def count_dtype_for(k: int) -> np.dtype:
    """Element type of ``num_ids``: one byte while a token stores at most 255 ids."""
    return np.dtype("u1") if k <= 255 else np.dtype("<u2")


@dataclass
class TargetWindow:
    """Sparse teacher targets for one document window, as capture produces them.

    Position ``t`` holds the teacher's distribution for the token *after* ``tokens[t]``.
    ``ids`` [n, K] lists each token's stored ids first (any order) and pads with -1;
    ``probs`` [n, K] holds their probabilities (sampled mode: draw counts / draws, exactly);
    ``tail`` [n] is 1 − the stored ids' true mass. Hybrid mode: ``counts`` [n, K] is nonzero at
    the ids drawn from the tail (how often each was drawn; their ``probs`` are not read) and 0 at
    the exact ids, and ``tail`` is the mass outside the exact ids.
    """

    doc_id: str
    window: int
    tokens: np.ndarray
    ids: np.ndarray
    probs: np.ndarray
    tail: np.ndarray
    counts: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def _check_shapes(w: TargetWindow, i: int) -> tuple[int, int]:
    """Shape/dtype checks for one window (per row, not per token); returns (n, K)."""
    where = f"window {i} (doc_id={w.doc_id!r}, window={w.window})"
    if not isinstance(w.doc_id, str) or not w.doc_id:
        raise ValueError(f"{where}: doc_id must be a non-empty string")
    tokens, ids, probs, tail = (np.asarray(a) for a in (w.tokens, w.ids, w.probs, w.tail))
    if tokens.ndim != 1:
        raise ValueError(f"{where}: tokens must be 1-D, got shape {tokens.shape}")
    n = tokens.shape[0]
    if ids.ndim != 2 or ids.shape[0] != n:
        raise ValueError(f"{where}: ids has shape {ids.shape}, expected ({n}, K)")
    if probs.shape != ids.shape or tail.shape != (n,):
        raise ValueError(f"{where}: probs {probs.shape} / tail {tail.shape} do not match ids {ids.shape}")
    if w.counts is not None and np.shape(w.counts) != ids.shape:
        raise ValueError(f"{where}: counts {np.shape(w.counts)} do not match ids {ids.shape}")
    for name, arr in (("tokens", tokens), ("ids", ids)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{where}: {name} must be integers, got {arr.dtype}")
    if not 0 <= int(w.window) < 2**31:
        raise ValueError(f"{where}: window index must be in [0, 2^31)")
    return n, ids.shape[1]


def _locate(windows: list[TargetWindow], offsets: np.ndarray, what: str, bad: np.ndarray) -> ValueError:
    """Error naming the first window with a bad position (slow path, only after a check failed)."""
    row = int(np.searchsorted(offsets, int(np.flatnonzero(bad)[0]), side="right") - 1)
    w = windows[row]
    return ValueError(f"window {row} (doc_id={w.doc_id!r}, window={w.window}): {what}")


def _concat(windows: list[TargetWindow], lengths: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
    """All windows' arrays concatenated; ids/probs/counts padded to ``width`` columns."""
    T = int(lengths.sum())
    tokens = np.zeros(T, np.int64)
    ids = np.full((T, width), -1, np.int64)
    probs = np.zeros((T, width), np.float32)
    tail = np.zeros(T, np.float32)
    counts = np.zeros((T, width), np.int64)
    pos = 0
    for w, n in zip(windows, lengths, strict=True):
        if n:
            wid = np.asarray(w.ids)
            tokens[pos : pos + n] = w.tokens
            ids[pos : pos + n, : wid.shape[1]] = wid
            probs[pos : pos + n, : wid.shape[1]] = w.probs
            tail[pos : pos + n] = w.tail
            if w.counts is not None:
                counts[pos : pos + n, : wid.shape[1]] = w.counts
            pos += n
    return tokens, ids, probs, tail, counts


def _validate(windows, offsets, codec: Codec, tokens, ids, probs, tail, valid, counts, exact) -> None:
    """Range checks over the concatenated arrays: whole-array reductions first (fast path),
    per-position masks only to name the culprit once a check has failed. ``exact``: the entries
    whose probabilities are stored (all valid ones, except hybrid's draws); ``counts``: how many."""
    V = codec.vocab_size
    if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
        raise _locate(windows, offsets, "token id out of [0, vocab_size)", (tokens < 0) | (tokens >= V))
    pad_inside = valid[:, 1:] & ~valid[:, :-1]
    if pad_inside.any():
        raise _locate(windows, offsets, "stored ids must come first, then -1 padding", pad_inside.any(1))
    if (ids >= V).any() or (ids < -1).any():
        raise _locate(windows, offsets, "stored id out of [0, vocab_size)", ((ids >= V) | (ids < -1)).any(1))
    if (counts > codec.k).any():
        raise _locate(windows, offsets, f"more than k={codec.k} stored ids", counts > codec.k)
    if codec.mode == "topk" and (counts != codec.k).any():
        raise _locate(windows, offsets, f"top-k mode stores exactly k={codec.k} ids per token", counts != codec.k)
    if codec.mode != "topk" and (counts < 1).any():
        raise _locate(windows, offsets, "every token must store at least one id", counts < 1)
    p = np.where(exact, probs, 0.0)
    if not (np.isfinite(p).all() and p.min(initial=0) >= 0 and p.max(initial=0) <= 1 + 1e-3):
        bad = (~np.isfinite(p) | (p < 0) | (p > 1 + 1e-3)).any(axis=1)
        raise _locate(windows, offsets, "stored probability not finite or outside [0, 1]", bad)
    if not (np.isfinite(tail).all() and tail.min(initial=0) >= 0 and tail.max(initial=0) <= 1):
        bad = ~np.isfinite(tail) | (tail < 0) | (tail > 1)
        raise _locate(windows, offsets, "tail not finite or outside [0, 1]", bad)
    if codec.mode == "sampled":
        draws = p * codec.draws
        off = np.abs(draws - np.rint(draws)).max(initial=0) > 1e-3
        if off or (np.rint(draws).sum(1) != codec.draws).any():
            bad = (np.abs(draws - np.rint(draws)) > 1e-3).any(1) | (np.rint(draws).sum(1) != codec.draws)
            raise _locate(windows, offsets, f"sampled probs must be counts / {codec.draws} summing to 1", bad)
    else:
        gap = np.abs(p.sum(axis=1, dtype=np.float64) + tail - 1.0)
        if gap.size and gap.max() > _MASS_TOLERANCE:
            what = f"stored probs + tail differ from 1 by more than {_MASS_TOLERANCE}"
            raise _locate(windows, offsets, what, gap > _MASS_TOLERANCE)


def _validate_draws(windows, offsets, codec: Codec, tail, valid, draw_counts, drawn, num_drawn) -> None:
    """Hybrid mode: each token's tail draws are ``draws`` draws (or none, where its tail is empty)."""
    if (draw_counts[~valid] != 0).any():
        raise _locate(windows, offsets, "a draw count on a padding entry", (draw_counts * ~valid != 0).any(1))
    if (draw_counts < 0).any() or (num_drawn > codec.draws).any():
        bad = (draw_counts < 0).any(1) | (num_drawn > codec.draws)
        raise _locate(windows, offsets, f"draw counts below 0 or more than draws={codec.draws} drawn ids", bad)
    total = draw_counts.sum(axis=1)
    bad = ((total != codec.draws) & (total != 0)) | ((total == 0) & (tail > _MASS_TOLERANCE))
    if bad.any():
        raise _locate(windows, offsets, f"hybrid draw counts must sum to draws={codec.draws} (0 only where the "
                      f"tail is below {_MASS_TOLERANCE})", bad)


def _hybrid_cells(ranks, probs, draw_counts, exact, drawn, num_exact, num_drawn, codec: Codec
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Flat deltas and values of hybrid tokens: each token's exact ids (ascending rank, sqrt-u8 codes)
    then its drawn ids (ascending rank, counts), as two delta-coded runs."""
    T, K = ranks.shape
    order_e, order_d = C.sort_rows(ranks, exact), C.sort_rows(ranks, drawn)
    runs = np.stack([np.take_along_axis(ranks, order_e, 1), np.take_along_axis(ranks, order_d, 1)], 1)
    lengths = np.stack([num_exact, num_drawn], 1).reshape(-1)
    deltas = C.delta_encode(runs.reshape(2 * T, K), lengths)
    codes = C.quantize_probs(np.clip(np.take_along_axis(probs, order_e, 1), 0.0, 1.0), codec.value_scale)
    values = np.stack([codes, np.take_along_axis(draw_counts, order_d, 1).astype(np.uint8)], 1).reshape(2 * T, K)
    return deltas, values[np.arange(K)[None, :] < lengths[:, None]]


def _row_sums(per_token: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of a per-token array over each row (rows given by token offsets)."""
    total = np.concatenate([[0], np.cumsum(per_token, dtype=np.int64)])
    return total[offsets[1:]] - total[offsets[:-1]]


def _binary_array(data: np.ndarray, row_bytes: np.ndarray, column: str) -> pa.Array:
    """One binary cell per row from a flat byte array, without per-row Python work."""
    offsets = np.zeros(len(row_bytes) + 1, dtype=np.int64)
    np.cumsum(row_bytes, out=offsets[1:])
    if offsets[-1] > _MAX_CELL_BYTES:
        raise ValueError(
            f"column '{column}' would hold {offsets[-1]} bytes, over the 2 GiB a v{FORMAT_VERSION} shard "
            "column allows; use fewer documents per unit"
        )
    return pa.Array.from_buffers(
        pa.binary(), len(row_bytes), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )


def _cell_column(flat: np.ndarray, row_elems: np.ndarray, column: str) -> pa.Array:
    return _binary_array(C.shuffle_bytes(flat, row_elems), row_elems * flat.dtype.itemsize, column)


def encode_windows(windows: list[TargetWindow], codec: Codec) -> pa.Table:
    """Validate ``windows`` and encode them as one v1 shard table (one row per window)."""
    shapes = [_check_shapes(w, i) for i, w in enumerate(windows)]
    lengths = np.array([n for n, _ in shapes], dtype=np.int64)
    width = max([codec.width] + [kk for _, kk in shapes])
    offsets = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens, ids, probs, tail, draw_counts = _concat(windows, lengths, width)
    hybrid = codec.mode == "hybrid"
    valid = ids >= 0
    drawn = valid & (draw_counts > 0) if hybrid else np.zeros_like(valid)
    exact = valid & ~drawn
    counts, num_drawn = exact.sum(axis=1), drawn.sum(axis=1)
    _validate(windows, offsets, codec, tokens, ids, probs, tail, valid, counts, exact)
    if hybrid:
        _validate_draws(windows, offsets, codec, tail, valid, draw_counts, drawn, num_drawn)

    ranks = codec.table.rank_of_id[np.where(valid, ids, 0)]
    order = C.sort_rows(ranks, valid)
    sorted_ranks = np.take_along_axis(ranks, order, axis=1)
    sorted_valid = np.take_along_axis(valid, order, axis=1)
    repeated = (np.diff(sorted_ranks, axis=1) == 0) & sorted_valid[:, 1:]
    if repeated.any():
        raise _locate(windows, offsets, "a token stores the same id twice", repeated.any(axis=1))
    if hybrid:
        deltas, values = _hybrid_cells(ranks, probs, draw_counts, exact, drawn, counts, num_drawn, codec)
    else:
        deltas = C.delta_encode(sorted_ranks, counts)
        sorted_probs = np.take_along_axis(probs, order, axis=1)[sorted_valid]
        if codec.mode == "sampled":
            values = np.rint(sorted_probs.astype(np.float64) * codec.draws).astype(C.value_dtype(codec.value_codec))
        else:
            values = C.quantize_probs(sorted_probs, codec.value_scale)

    row_ids = _row_sums(counts + num_drawn, offsets)
    id_dtype = C.id_dtype(codec.id_codec)
    columns = {
        "doc_id": pa.array([w.doc_id for w in windows], pa.string()),
        "window": pa.array(np.array([w.window for w in windows], dtype=np.int32)),
        "num_tokens": pa.array(lengths.astype(np.int32)),
        "tokens": _cell_column(tokens.astype(codec.token_dtype), lengths, "tokens"),
        "num_ids": _cell_column(counts.astype(count_dtype_for(codec.k)), lengths, "num_ids"),
        "ids": _cell_column(deltas.astype(id_dtype), row_ids, "ids"),
        "values": _cell_column(values, row_ids, "values"),
        "tail": _cell_column(C.quantize_tail(tail), lengths, "tail"),
    }
    if hybrid:
        columns["num_drawn"] = _cell_column(num_drawn.astype(np.uint8), lengths, "num_drawn")
    return pa.Table.from_pydict(columns, schema=schema_for(codec.mode))


@dataclass
class DecodedShard:
    """A whole shard as flat arrays; row ``i`` spans ``offsets[i]:offsets[i+1]`` of each.

    ``ids`` [T, k] are the stored ids padded with -1, ``probs`` [T, k] the target the loss
    uses at them (0 at padding), ``tail`` [T] the ghost bucket's mass, so each token's
    probs + tail sum to 1. Top-k/adaptive: dequantized probabilities rescaled to 1 − tail.
    Sampled: counts / draws and a ghost of 0 (the draws already speak for the tail), while
    ``stored_tail`` keeps the true mass the drawn ids miss (for inspection). Hybrid: the exact
    ids' probabilities rescaled to 1 − τ, then the tail draws' ids at τ · count / draws (τ the
    stored tail), and a ghost of 0 (τ where a token has no draws); ``counts`` [T, k + draws]
    holds the draw counts (0 at exact ids and padding).
    """

    doc_ids: list[str]
    windows: np.ndarray  # [rows] int32
    offsets: np.ndarray  # [rows+1] int64
    tokens: np.ndarray  # [T] int64
    num_ids: np.ndarray  # [T] int64
    ids: np.ndarray  # [T, k] int64, -1 = padding
    probs: np.ndarray  # [T, k] float32
    tail: np.ndarray  # [T] float32
    stored_tail: np.ndarray  # [T] float32
    unit: dict | None = None  # the writer's unit identity (UNIT_METADATA_KEY); None before format 1.2
    counts: np.ndarray | None = None  # hybrid: [T, k + draws] int64 draw counts; None in the other modes

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def row_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> TargetWindow:
        """Row ``i`` as a TargetWindow of views into the flat arrays (no copy)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for a shard of {len(self)} rows")
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return TargetWindow(doc_id=self.doc_ids[i], window=int(self.windows[i]), tokens=self.tokens[a:b],
                            ids=self.ids[a:b], probs=self.probs[a:b], tail=self.stored_tail[a:b],
                            counts=None if self.counts is None else self.counts[a:b])


def _cells(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat bytes, bytes per cell) of a binary column, zero-copy for a single chunk."""
    pieces, sizes = [], []
    for chunk in column.chunks:
        if chunk.null_count:
            raise ShardError(f"column '{name}' has {chunk.null_count} null cells")
        if pa.types.is_large_binary(chunk.type):
            off_dtype = np.int64
        elif pa.types.is_binary(chunk.type):
            off_dtype = np.int32
        else:
            raise ShardError(f"column '{name}' has type {chunk.type}, expected binary")
        n = len(chunk)
        _, off_buf, data_buf = chunk.buffers()
        offs = np.frombuffer(off_buf, dtype=off_dtype, count=n + 1, offset=chunk.offset * off_dtype().itemsize)
        sizes.append(np.diff(offs).astype(np.int64))
        if n and offs[-1] > offs[0]:
            pieces.append(np.frombuffer(data_buf, dtype=np.uint8, count=int(offs[-1] - offs[0]), offset=int(offs[0])))
    data = np.zeros(0, np.uint8) if not pieces else pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return data, np.concatenate(sizes) if sizes else np.zeros(0, np.int64)


def _decode_cells(table: pa.Table, name: str, dtype: np.dtype, row_elems: np.ndarray) -> np.ndarray:
    """Flat elements of a byte-shuffled binary column, after checking every cell's size."""
    data, sizes = _cells(table.column(name), name)
    want = row_elems * dtype.itemsize
    if not np.array_equal(sizes, want):
        bad = int(np.flatnonzero(sizes != want)[0])
        raise ShardError(
            f"column '{name}' row {bad} holds {sizes[bad]} bytes, expected {want[bad]} "
            f"({row_elems[bad]} {dtype.name} elements)"
        )
    return C.unshuffle_bytes(data, row_elems, dtype)


def decode_table(table: pa.Table, codec: Codec) -> DecodedShard:
    """Decode a v1 shard table with the set's codec (from its manifest); vectorized throughout."""
    hybrid = codec.mode == "hybrid"
    missing = [c for c in schema_for(codec.mode).names if c not in table.column_names]
    if missing:
        raise ShardError(f"shard table lacks column(s) {', '.join(missing)}")
    for name in ("doc_id", "window", "num_tokens"):
        if table.column(name).null_count:
            raise ShardError(f"column '{name}' has null cells")
    lengths = table.column("num_tokens").to_numpy().astype(np.int64)
    if (lengths < 0).any():
        raise ShardError("column 'num_tokens' has negative values")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    T, K, V = int(offsets[-1]), codec.k, codec.vocab_size

    tokens = _decode_cells(table, "tokens", codec.token_dtype, lengths).astype(np.int64)
    counts = _decode_cells(table, "num_ids", count_dtype_for(K), lengths).astype(np.int64)
    if counts.size and (counts.max() > K or (codec.mode == "topk" and (counts != K).any())):
        raise ShardError(f"column 'num_ids' has counts outside what mode '{codec.mode}' with k={K} allows")
    num_drawn = _decode_cells(table, "num_drawn", np.dtype("u1"), lengths).astype(np.int64) if hybrid else None
    if hybrid and num_drawn.size and num_drawn.max() > codec.draws:
        raise ShardError(f"column 'num_drawn' has more than draws={codec.draws} drawn ids for a token")
    entries = counts if num_drawn is None else counts + num_drawn
    row_ids = _row_sums(entries, offsets)
    deltas = _decode_cells(table, "ids", C.id_dtype(codec.id_codec), row_ids)
    values = _decode_cells(table, "values", C.value_dtype(codec.value_codec), row_ids)
    stored_tail = C.dequantize_tail(_decode_cells(table, "tail", np.dtype("<u2"), lengths))
    if tokens.size and tokens.max() >= V:
        raise ShardError(f"column 'tokens' holds ids >= vocab_size {V}")

    dense = codec.mode == "topk"  # every token stores exactly K ids: reshape instead of scatter
    if dense:
        ranks = np.cumsum(deltas.reshape(T, K), axis=1, dtype=np.int64)
    elif hybrid:  # two delta-coded runs per token: its exact ids, then its drawn ids
        ranks = C.delta_decode(deltas, np.stack([counts, num_drawn], 1).reshape(-1))
    else:
        ranks = C.delta_decode(deltas, counts)
    if ranks.size and (ranks.max() >= V or (ranks.min() < 0)):
        raise ShardError(f"column 'ids' decodes to ids outside [0, {V})")
    flat_ids = codec.table.id_of_rank[ranks]
    if hybrid:
        return _decode_hybrid(table, codec, offsets, tokens, counts, num_drawn, flat_ids, values, stored_tail)
    if codec.mode == "sampled":
        if row_ids.size and (_row_sums(values.astype(np.int64), np.concatenate([[0], np.cumsum(counts)]))
                             != codec.draws).any():
            raise ShardError(f"column 'values' has draw counts that do not sum to draws={codec.draws}")
        flat_probs = values.astype(np.float32) / np.float32(codec.draws)
    else:
        if values.size and values.max() > codec.value_scale:
            raise ShardError(f"column 'values' has codes above value_scale={codec.value_scale} (probabilities > 1)")
        flat_probs = C.dequantize_probs(values, codec.value_scale)
    if dense:
        ids, probs = flat_ids.reshape(T, K), flat_probs.reshape(T, K)
    else:
        ids = np.full((T, K), -1, np.int64)
        probs = np.zeros((T, K), np.float32)
        # entry j of token t goes to t·K + (j − first entry of t): one repeat, one flat scatter
        where = np.repeat(np.arange(T, dtype=np.int64) * K - (np.cumsum(counts) - counts), counts)
        where += np.arange(where.size, dtype=np.int64)
        ids.reshape(-1)[where] = flat_ids
        probs.reshape(-1)[where] = flat_probs

    if codec.mode == "sampled":
        tail = np.zeros(T, np.float32)
    else:  # rescale so stored + tail = 1 exactly: the quantization error is spread proportionally
        total = probs.sum(axis=1)
        scale = np.divide(1.0 - stored_tail, total, out=np.zeros_like(total), where=total > 0)
        probs *= scale[:, None]
        tail = np.where(total > 0, stored_tail, np.float32(1.0)).astype(np.float32)
    return DecodedShard(
        doc_ids=table.column("doc_id").to_pylist(),
        windows=table.column("window").to_numpy().astype(np.int32),
        offsets=offsets,
        tokens=tokens,
        num_ids=counts,
        ids=ids,
        probs=probs,
        tail=tail,
        stored_tail=stored_tail,
        unit=_unit_metadata(table),
    )


def _decode_hybrid(table: pa.Table, codec: Codec, offsets, tokens, num_exact, num_drawn, flat_ids, values,
                   stored_tail) -> DecodedShard:
    """Hybrid tokens: exact probabilities rescaled to 1 − τ, draws at τ · count / draws (see DecodedShard)."""
    T, W = len(tokens), codec.width
    is_drawn = np.repeat(np.tile(np.array([False, True]), T), np.stack([num_exact, num_drawn], 1).reshape(-1))
    token_of = np.repeat(np.arange(T, dtype=np.int64), num_exact + num_drawn)
    draw_sums = np.bincount(token_of[is_drawn], weights=values[is_drawn], minlength=T).astype(np.int64)
    if ((draw_sums != codec.draws) & (draw_sums != 0)).any() or (values[is_drawn] == 0).any():
        raise ShardError(f"column 'values' has tail draw counts that do not sum to draws={codec.draws}")
    exact_codes = values[~is_drawn]
    if exact_codes.size and exact_codes.max() > codec.value_scale:
        raise ShardError(f"column 'values' has codes above value_scale={codec.value_scale} (probabilities > 1)")
    flat_probs = np.zeros(len(values), np.float32)
    flat_probs[~is_drawn] = C.dequantize_probs(exact_codes, codec.value_scale)
    exact_total = np.bincount(token_of[~is_drawn], weights=flat_probs[~is_drawn], minlength=T)
    scale = np.divide(1.0 - stored_tail, exact_total, out=np.zeros(T), where=exact_total > 0)
    flat_probs[~is_drawn] *= scale[token_of[~is_drawn]].astype(np.float32)
    flat_probs[is_drawn] = stored_tail[token_of[is_drawn]] * values[is_drawn] / np.float32(codec.draws)
    where = token_of * W + np.arange(len(values), dtype=np.int64) - np.repeat(
        np.cumsum(num_exact + num_drawn) - (num_exact + num_drawn), num_exact + num_drawn)
    ids, probs, counts = np.full((T, W), -1, np.int64), np.zeros((T, W), np.float32), np.zeros((T, W), np.int64)
    ids.reshape(-1)[where], probs.reshape(-1)[where] = flat_ids, flat_probs
    counts.reshape(-1)[where[is_drawn]] = values[is_drawn]
    tail = np.where(draw_sums > 0, np.float32(0.0), np.where(exact_total > 0, stored_tail, np.float32(1.0)))
    return DecodedShard(
        doc_ids=table.column("doc_id").to_pylist(), windows=table.column("window").to_numpy().astype(np.int32),
        offsets=offsets, tokens=tokens, num_ids=num_exact, ids=ids, probs=probs, tail=tail.astype(np.float32),
        stored_tail=stored_tail, unit=_unit_metadata(table), counts=counts)


def _unit_metadata(table: pa.Table) -> dict | None:
    raw = (table.schema.metadata or {}).get(UNIT_METADATA_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardError(f"schema metadata '{UNIT_METADATA_KEY.decode()}' is not JSON") from None
    if not isinstance(value, dict):
        raise ShardError(f"schema metadata '{UNIT_METADATA_KEY.decode()}' is not a JSON object")
    return value
