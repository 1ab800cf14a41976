"""Shard format v0.1: the Arrow schema and the codecs between numpy targets and binary cells.

Every variable-length array lives in a ``binary`` cell holding fixed-width little-endian
elements, never in a nested list column: list columns decode slowly and break Ray/torch
conversion, while a binary column decodes to one ``np.frombuffer`` over its value buffer.
Each element encoding is a named codec (``uint16``, ``float16``, ...) recorded in the
manifest, and decoding is keyed on those names, so later versions can add codecs without
breaking old shard sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raydistill.errors import ContractError, ShardError

FORMAT_VERSION = "0.1"
SUPPORTED_VERSIONS = ("0.1",)

# codec name -> little-endian numpy dtype of one element
ID_CODECS = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
PROB_CODECS = {"float16": np.dtype("<f2")}
TAIL_CODECS = {"float32": np.dtype("<f4")}

SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("window", pa.int32(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("tokens", pa.binary(), nullable=False),
        pa.field("topk_ids", pa.binary(), nullable=False),
        pa.field("topk_probs", pa.binary(), nullable=False),
        pa.field("tail_mass", pa.binary(), nullable=False),
    ],
    metadata={b"raydistill.format_version": FORMAT_VERSION.encode()},
)
COLUMNS = tuple(SCHEMA.names)

_MAX_CELL_BYTES = 2**31 - 1  # pa.binary() uses int32 offsets
_MASS_TOLERANCE = 1e-2  # |sum(top-k) + tail - 1|; loose enough for bf16 teachers, catches logits/log-probs


def token_dtype_for(vocab_size: int) -> str:
    """Narrowest id codec that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _codec(codecs: dict[str, np.dtype], name: str, field: str) -> np.dtype:
    if name not in codecs:
        raise ContractError(
            f"shard set uses {field} '{name}', which this raydistill cannot decode "
            f"(known: {', '.join(sorted(codecs))}); upgrade raydistill"
        )
    return codecs[name]


@dataclass
class TargetWindow:
    """Sparse teacher targets for one document window, as capture produces them.

    Position ``t`` holds the teacher's distribution for the token *after* ``tokens[t]``.
    """

    doc_id: str
    window: int
    tokens: np.ndarray  # [n] integer
    topk_ids: np.ndarray  # [n, k] integer, descending probability
    topk_probs: np.ndarray  # [n, k] float32
    tail_mass: np.ndarray  # [n] float32, 1 - sum of the true top-k probs, in [0, 1]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def _check_shapes(w: TargetWindow, k: int, i: int) -> int:
    """Shape/dtype checks for one window (per row, not per token); returns n."""
    where = f"window {i} (doc_id={w.doc_id!r}, window={w.window})"
    if not isinstance(w.doc_id, str) or not w.doc_id:
        raise ValueError(f"{where}: doc_id must be a non-empty string")
    tokens, ids, probs, tail = (np.asarray(a) for a in (w.tokens, w.topk_ids, w.topk_probs, w.tail_mass))
    if tokens.ndim != 1:
        raise ValueError(f"{where}: tokens must be 1-D, got shape {tokens.shape}")
    n = tokens.shape[0]
    for name, arr, shape in (
        ("topk_ids", ids, (n, k)),
        ("topk_probs", probs, (n, k)),
        ("tail_mass", tail, (n,)),
    ):
        if arr.shape != shape:
            raise ValueError(f"{where}: {name} has shape {arr.shape}, expected {shape} (n={n}, k={k})")
    for name, arr in (("tokens", tokens), ("topk_ids", ids)):
        if n and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{where}: {name} must be integers, got {arr.dtype}")
    if not 0 <= int(w.window) < 2**31:
        raise ValueError(f"{where}: window index must be in [0, 2^31)")
    return n


def _locate(windows: list[TargetWindow], offsets: np.ndarray, what: str, bad: np.ndarray) -> ValueError:
    """Error naming the first window with a bad position (slow path, only after a check failed)."""
    row = int(np.searchsorted(offsets, int(np.flatnonzero(bad)[0]), side="right") - 1)
    w = windows[row]
    return ValueError(f"window {row} (doc_id={w.doc_id!r}, window={w.window}): {what}")


def _validate_values(
    windows: list[TargetWindow], offsets: np.ndarray, tokens, ids, probs, tail, vocab_size: int
) -> None:
    """Range checks over the concatenated arrays: whole-array reductions first (fast path),
    per-position masks only to name the culprit once a check has failed."""

    def in_range(a: np.ndarray, lo: float, hi: float) -> bool:
        return a.size == 0 or bool(a.min() >= lo and a.max() <= hi)  # NaN fails both comparisons

    if not in_range(tokens, 0, vocab_size - 1):
        raise _locate(
            windows, offsets, "token id out of [0, vocab_size)", (tokens < 0) | (tokens >= vocab_size)
        )
    if not in_range(ids, 0, vocab_size - 1):
        bad = ((ids < 0) | (ids >= vocab_size)).any(axis=1)
        raise _locate(windows, offsets, "top-k id out of [0, vocab_size)", bad)
    if not in_range(probs, 0, 1 + 1e-3):
        bad = (~np.isfinite(probs) | (probs < 0) | (probs > 1 + 1e-3)).any(axis=1)
        raise _locate(windows, offsets, "top-k prob not finite or outside [0, 1]", bad)
    if not in_range(tail, 0, 1):
        bad = ~np.isfinite(tail) | (tail < 0) | (tail > 1)
        raise _locate(windows, offsets, "tail_mass not finite or outside [0, 1]", bad)
    rising = probs[:, 1:] > probs[:, :-1]
    if rising.any():
        raise _locate(windows, offsets, "top-k probs not in descending order", rising.any(axis=1))
    gap = np.abs(probs.sum(axis=1) + tail - 1.0)
    if gap.size and gap.max() > _MASS_TOLERANCE:
        what = f"top-k probs + tail_mass differ from 1 by more than {_MASS_TOLERANCE}"
        raise _locate(windows, offsets, what, gap > _MASS_TOLERANCE)


def _torch():
    """torch if installed: its float16 casts use the CPU's F16C instructions, while numpy's
    float32 -> float16 cast is a scalar loop (~25x slower); both round to nearest even."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _to_float16(x: np.ndarray) -> np.ndarray:
    torch = _torch()
    if torch is None:
        return x.astype("<f2")
    return torch.from_numpy(np.ascontiguousarray(x)).half().numpy().astype("<f2", copy=False)


def _to_float32(x: np.ndarray) -> np.ndarray:
    """Widen decoded probabilities (any float codec) to a fresh native float32 array."""
    torch = _torch()
    if torch is None or x.dtype != np.float16 or not x.dtype.isnative:
        return x.astype(np.float32)
    flags = x.flags
    if not (flags.aligned and flags.c_contiguous and flags.writeable):  # torch.from_numpy needs all three
        x = x.copy()
    return torch.from_numpy(x).float().numpy()


def _binary_array(flat: np.ndarray, row_elems: np.ndarray, column: str) -> pa.Array:
    """One binary cell per row from a flat little-endian array, without per-row Python work."""
    data = np.ascontiguousarray(flat).view(np.uint8).reshape(-1)
    offsets = np.zeros(len(row_elems) + 1, dtype=np.int64)
    np.cumsum(row_elems * flat.dtype.itemsize * (flat.shape[1] if flat.ndim == 2 else 1), out=offsets[1:])
    if offsets[-1] > _MAX_CELL_BYTES:
        raise ValueError(
            f"column '{column}' would hold {offsets[-1]} bytes, over the 2 GiB a v{FORMAT_VERSION} shard "
            "column allows; use fewer documents per unit"
        )
    return pa.Array.from_buffers(
        pa.binary(), len(row_elems), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )


def encode_windows(windows: list[TargetWindow], *, vocab_size: int, k: int) -> pa.Table:
    """Validate ``windows`` and encode them as one v0.1 shard table (one row per window)."""
    if k < 1 or k > vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={vocab_size}], got {k}")
    id_dtype = ID_CODECS[token_dtype_for(vocab_size)]
    lengths = np.array([_check_shapes(w, k, i) for i, w in enumerate(windows)], dtype=np.int64)
    offsets = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    def cat(name: str, shape: tuple[int, ...], dtype=None) -> np.ndarray:
        """Concatenate one field over windows, keeping the caller's dtype unless told otherwise."""
        # skip empty windows: np.zeros(0) is float64 and would upcast the concatenation
        parts = [np.asarray(getattr(w, name)) for w, n in zip(windows, lengths, strict=True) if n]
        if not parts:
            return np.zeros(shape, dtype=dtype or np.int64)
        out = np.concatenate(parts)
        return out if dtype is None else out.astype(dtype, copy=False)

    tokens = cat("tokens", (0,))
    ids = cat("topk_ids", (0, k)).reshape(-1, k)
    probs = cat("topk_probs", (0, k), np.float32).reshape(-1, k)
    tail = cat("tail_mass", (0,), np.float32)
    _validate_values(windows, offsets, tokens, ids, probs, tail, vocab_size)

    columns = {
        "doc_id": pa.array([w.doc_id for w in windows], pa.string()),
        "window": pa.array(np.array([w.window for w in windows], dtype=np.int32)),
        "num_tokens": pa.array(lengths.astype(np.int32)),
        "tokens": _binary_array(tokens.astype(id_dtype), lengths, "tokens"),
        "topk_ids": _binary_array(ids.astype(id_dtype), lengths, "topk_ids"),
        "topk_probs": _binary_array(
            _to_float16(np.minimum(probs, 1) if probs.max(initial=0) > 1 else probs), lengths, "topk_probs"
        ),
        "tail_mass": _binary_array(tail.astype(TAIL_CODECS["float32"]), lengths, "tail_mass"),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


@dataclass
class DecodedShard:
    """A whole shard as flat arrays; row ``i`` spans ``offsets[i]:offsets[i+1]`` of each."""

    doc_ids: list[str]
    windows: np.ndarray  # [rows] int32
    offsets: np.ndarray  # [rows+1] int64
    tokens: np.ndarray  # [T] int64
    topk_ids: np.ndarray  # [T, k] int64
    topk_probs: np.ndarray  # [T, k] float32
    tail_mass: np.ndarray  # [T] float32

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
        return TargetWindow(
            doc_id=self.doc_ids[i],
            window=int(self.windows[i]),
            tokens=self.tokens[a:b],
            topk_ids=self.topk_ids[a:b],
            topk_probs=self.topk_probs[a:b],
            tail_mass=self.tail_mass[a:b],
        )


def _decode_binary(
    column: pa.ChunkedArray, name: str, dtype: np.dtype, expected_bytes: np.ndarray
) -> np.ndarray:
    """Flat elements of a binary column via its value buffers; checks every cell's byte size."""
    pieces, row = [], 0
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
        offs = np.frombuffer(
            off_buf, dtype=off_dtype, count=n + 1, offset=chunk.offset * off_dtype().itemsize
        )
        sizes = np.diff(offs)
        want = expected_bytes[row : row + n]
        if not np.array_equal(sizes, want):
            bad = int(np.flatnonzero(sizes != want)[0])
            raise ShardError(
                f"column '{name}' row {row + bad} holds {sizes[bad]} bytes, expected {want[bad]} "
                f"({dtype.name} elements for its num_tokens)"
            )
        if n and offs[-1] > offs[0]:
            pieces.append(
                np.frombuffer(data_buf, dtype=np.uint8, count=int(offs[-1] - offs[0]), offset=int(offs[0]))
            )
        row += n
    if not pieces:
        return np.zeros(0, dtype=dtype)
    return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)).view(dtype)


def decode_table(
    table: pa.Table,
    *,
    vocab_size: int,
    k: int,
    token_dtype: str | None = None,
    prob_encoding: str = "float16",
    tail_encoding: str = "float32",
) -> DecodedShard:
    """Decode a shard table with the encodings its manifest records (defaults: v0.1's)."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ShardError(f"shard table lacks column(s) {', '.join(missing)}")
    id_dtype = _codec(ID_CODECS, token_dtype or token_dtype_for(vocab_size), "token_dtype")
    prob_dtype = _codec(PROB_CODECS, prob_encoding, "prob_encoding")
    tail_dtype = _codec(TAIL_CODECS, tail_encoding, "tail_encoding")

    for name in ("doc_id", "window", "num_tokens"):
        if table.column(name).null_count:
            raise ShardError(f"column '{name}' has null cells")
    lengths = table.column("num_tokens").to_numpy().astype(np.int64)
    if (lengths < 0).any():
        raise ShardError("column 'num_tokens' has negative values")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    def column(name: str, dtype: np.dtype, per_token: int) -> np.ndarray:
        return _decode_binary(table.column(name), name, dtype, lengths * dtype.itemsize * per_token)

    total = int(offsets[-1])
    return DecodedShard(
        doc_ids=table.column("doc_id").to_pylist(),
        windows=table.column("window").to_numpy().astype(np.int32),
        offsets=offsets,
        tokens=column("tokens", id_dtype, 1).astype(np.int64),
        topk_ids=column("topk_ids", id_dtype, k).astype(np.int64).reshape(total, k),
        topk_probs=_to_float32(column("topk_probs", prob_dtype, k)).reshape(total, k),
        tail_mass=column("tail_mass", tail_dtype, 1).astype(np.float32),
    )
