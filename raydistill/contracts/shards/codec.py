"""Element codecs of shard format v1: quantizers and byte layouts, vectorized over a whole shard.

Each function maps flat numpy arrays to flat numpy arrays; nothing here loops over tokens.
The choices (and the measurements behind them) are in docs/format.md:

* stored ids are renumbered by corpus frequency, sorted within each token and delta-coded,
  so they become small numbers; each cell is then *byte-shuffled* (all low bytes, then all
  high bytes) so Parquet's zstd sees long runs of near-zero high bytes;
* probabilities are quantized to one byte in the square-root domain, ``q = round(S·√p)``
  (S = ``value_scale`` in the manifest, 128 by default):
  between linear steps (which waste bits on the large probabilities) and log steps (which
  waste them on the small ones) for the total-variation error the loss cares about;
* the tail mass is a 16-bit log code (1/1024-octave steps), down to 2^-64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raydistill.contracts.shards.vocab import VocabTable
from raydistill.errors import ContractError

VALUE_CODECS = ("sqrt-u8",)  # top-k and adaptive modes
DEFAULT_VALUE_SCALE = 128  # q = round(128·√p): codes 0..128 cover [0, 1]
COUNT_CODECS = ("count-u8", "count-u16")  # sampled mode: how many of the n draws hit each id
HYBRID_VALUE_CODEC = "sqrt-u8+count-u8"  # hybrid mode: exact ids' sqrt-u8 codes, then the tail draws' counts
HYBRID_MAX_DRAWS = 255  # hybrid's counts are one byte
TAIL_CODEC = "log2-u16"  # the only one in v1 (the manifest's Literal enforces it)
TAIL_STEPS_PER_OCTAVE = 1024
TAIL_ZERO_CODE = 65535  # an exact zero tail (the stored ids hold all the mass)
ID_CODECS = ("delta-sorted-u16", "delta-sorted-u32")


def id_codec_for(vocab_size: int) -> str:
    """Narrowest delta codec for a vocabulary: a delta is at most vocab_size - 1."""
    return "delta-sorted-u16" if vocab_size <= 2**16 else "delta-sorted-u32"


def id_dtype(codec: str) -> np.dtype:
    if codec == "delta-sorted-u16":
        return np.dtype("<u2")
    if codec == "delta-sorted-u32":
        return np.dtype("<u4")
    raise ContractError(f"id codec '{codec}' is unknown to this raydistill (known: {', '.join(ID_CODECS)})")


def count_codec_for(draws: int) -> str:
    return "count-u8" if draws <= 255 else "count-u16"


def value_dtype(codec: str) -> np.dtype:
    """Element type of the ``values`` column for a value codec."""
    if codec in ("sqrt-u8", "count-u8", HYBRID_VALUE_CODEC):
        return np.dtype("u1")
    if codec == "count-u16":
        return np.dtype("<u2")
    known = ", ".join((*VALUE_CODECS, *COUNT_CODECS, HYBRID_VALUE_CODEC))
    raise ContractError(f"value codec '{codec}' is unknown to this raydistill (known: {known})")


# --- probabilities ---------------------------------------------------------------------------

def check_value_scale(scale: int) -> None:
    if not 1 <= scale <= 255:
        raise ContractError(f"value_scale {scale} must be in [1, 255] (codes are one byte)")


def quantize_probs(p: np.ndarray, scale: int = DEFAULT_VALUE_SCALE) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 codes ``round(scale·√p)``, at least 1 where p > 0.

    Code 0 is kept for p = 0: a stored id the teacher gives any mass never decodes to 0
    (which would make KL(p‖p̂) infinite and reverse-KL losses push the student off it).
    """
    check_value_scale(scale)
    p = np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)
    codes = np.rint(np.sqrt(p) * np.float32(scale))
    return np.where(p > 0, np.maximum(codes, 1), 0).astype(np.uint8)


def dequantize_probs(codes: np.ndarray, scale: int = DEFAULT_VALUE_SCALE) -> np.ndarray:
    """uint8 codes -> float32 probabilities ``(q / scale)²`` (a 256-entry table lookup)."""
    check_value_scale(scale)
    table = ((np.arange(256, dtype=np.float64) / scale) ** 2).astype(np.float32)
    return table[codes]


# --- tail mass -------------------------------------------------------------------------------

def quantize_tail(tail: np.ndarray) -> np.ndarray:
    """Tail masses in [0, 1] -> uint16 codes ``round(-1024·log2 t)``; 65535 means exactly 0."""
    t = np.clip(np.asarray(tail, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        code = np.rint(-np.log2(t) * TAIL_STEPS_PER_OCTAVE)
    return np.where(t > 0, np.minimum(code, TAIL_ZERO_CODE - 1), TAIL_ZERO_CODE).astype("<u2")


def dequantize_tail(codes: np.ndarray) -> np.ndarray:
    codes = codes.astype(np.int64)
    out = np.exp2(-codes / TAIL_STEPS_PER_OCTAVE)
    out[codes == TAIL_ZERO_CODE] = 0.0
    return out.astype(np.float32)


# --- ids -------------------------------------------------------------------------------------

def sort_rows(ranks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-row permutation that puts the valid entries of ``ranks`` [T, K] first, ascending."""
    key = np.where(valid, ranks, np.iinfo(np.int64).max)
    return np.argsort(key, axis=1, kind="stable")


def delta_encode(sorted_ranks: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat deltas of per-token ascending ranks; the first of each token is taken from 0.

    ``sorted_ranks`` [T, K] holds each token's ``counts[t]`` valid ranks first (ascending).
    """
    deltas = np.diff(sorted_ranks, axis=1, prepend=0)
    valid = np.arange(sorted_ranks.shape[1])[None, :] < counts[:, None]
    return deltas[valid]


def delta_decode(deltas: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Inverse of ``delta_encode``: flat ranks from flat deltas (a segmented cumulative sum)."""
    total = np.cumsum(deltas, dtype=np.int64)
    starts = np.cumsum(counts) - counts  # index of each token's first delta
    before = np.zeros(len(counts), dtype=np.int64)
    nonempty = counts > 0
    first = starts[nonempty]
    before[nonempty] = total[first] - deltas[first]
    return total - np.repeat(before, counts)


# --- byte shuffling of binary cells ------------------------------------------------------------

def _runs(cell_elems: np.ndarray) -> list[tuple[int, int, int]]:
    """(first element, cells, elements per cell) of each run of consecutive equal-size cells.

    Windows of a long document all have ``max_length`` tokens, so a shard is a few runs, and
    each run is (un)shuffled as one [cells, planes, n] block: no loop over tokens, few over cells.
    """
    cell_elems = np.asarray(cell_elems, dtype=np.int64)
    if cell_elems.size == 0:
        return []
    change = np.flatnonzero(np.diff(cell_elems)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [cell_elems.size]]))
    first_elem = np.concatenate([[0], np.cumsum(cell_elems)])[starts]
    return list(zip(first_elem.tolist(), lengths.tolist(), cell_elems[starts].tolist(), strict=True))


def shuffle_bytes(flat: np.ndarray, cell_elems: np.ndarray) -> np.ndarray:
    """Bytes of ``flat`` (little-endian) with each cell's byte planes laid one after another.

    A cell of n elements of s bytes becomes s runs of n bytes (all byte 0s, then all byte 1s, ...).
    """
    size = flat.dtype.itemsize
    plain = np.ascontiguousarray(flat).view(np.uint8).reshape(-1, size)
    if size == 1:
        return plain.reshape(-1)
    out = np.empty(plain.size, dtype=np.uint8)
    for first, cells, n in _runs(cell_elems):
        if n == 0:
            continue
        block = out[first * size : (first + cells * n) * size].reshape(cells, size, n)
        block[...] = plain[first : first + cells * n].reshape(cells, n, size).transpose(0, 2, 1)
    return out


def unshuffle_bytes(data: np.ndarray, cell_elems: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of ``shuffle_bytes``: the flat elements, as ``dtype`` (a view when one byte wide)."""
    size = dtype.itemsize
    if size == 1:
        return data.view(dtype)
    wide = np.dtype(f"u{size}")
    out = np.empty(data.size // size, dtype=wide)
    for first, cells, n in _runs(cell_elems):
        if n == 0:
            continue
        planes = data[first * size : (first + cells * n) * size].reshape(cells, size, n)
        dest = out[first : first + cells * n].reshape(cells, n)
        np.copyto(dest, planes[:, 0, :], casting="unsafe")
        for b in range(1, size):  # contiguous reads of each plane: far faster than a byte transpose
            dest |= planes[:, b, :].astype(wide) << np.array(8 * b, dtype=wide)
    return out.view(dtype.newbyteorder("<")) if dtype.byteorder == ">" else out.astype(dtype, copy=False)

MODES = ("topk", "adaptive", "sampled", "budget", "hybrid")
_TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype_for(vocab_size: int) -> str:
    """Narrowest token codec that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return "uint16" if vocab_size <= 2**16 else "uint32"


@dataclass(frozen=True)
class Codec:
    """Everything needed to encode or decode the shards of one set (all of it is in the manifest)."""

    mode: str
    k: int  # most ids a token may store (top-k: exactly k; hybrid: exact ids, the draws' ids come on top)
    vocab_size: int
    table: VocabTable
    draws: int = 0  # sampled mode: draws per token; hybrid: draws from each token's tail
    value_scale: int = DEFAULT_VALUE_SCALE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ContractError(f"sparsify mode '{self.mode}' is unknown (known: {', '.join(MODES)})")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"k must be in [1, vocab_size={self.vocab_size}], got {self.k}")
        if self.table.vocab_size != self.vocab_size:
            raise ValueError(f"vocab table has {self.table.vocab_size} ids, vocab_size is {self.vocab_size}")
        if self.mode == "sampled" and not 1 <= self.draws <= 65535:
            raise ValueError(f"sampled mode needs draws in [1, 65535], got {self.draws}")
        if self.mode == "hybrid" and not 1 <= self.draws <= HYBRID_MAX_DRAWS:
            raise ValueError(f"hybrid mode needs draws in [1, {HYBRID_MAX_DRAWS}], got {self.draws}")
        check_value_scale(self.value_scale)

    @classmethod
    def for_mode(cls, mode: str, *, k: int, draws: int, vocab_size: int, table: VocabTable,
                 value_scale: int = DEFAULT_VALUE_SCALE) -> Codec:
        """The codec of a capture setting: width k, except sampled mode's width of ``draws``."""
        sampled = mode == "sampled"
        return cls(mode=mode, k=draws if sampled else k, vocab_size=vocab_size, table=table,
                   draws=draws if mode in ("sampled", "hybrid") else 0, value_scale=value_scale)

    @property
    def width(self) -> int:
        """Entries per token a decoded shard makes room for: k, plus the tail draws in hybrid mode."""
        return self.k + self.draws if self.mode == "hybrid" else self.k

    @property
    def token_dtype(self) -> np.dtype:
        return _TOKEN_DTYPES[token_dtype_for(self.vocab_size)]

    @property
    def id_codec(self) -> str:
        return id_codec_for(self.vocab_size)

    @property
    def value_codec(self) -> str:
        return value_codec_for(self.mode, self.draws)


def value_codec_for(mode: str, draws: int) -> str:
    """The ``values`` codec a mode writes (the manifest names it, and checks it against the mode)."""
    if mode == "sampled":
        return count_codec_for(draws)
    return HYBRID_VALUE_CODEC if mode == "hybrid" else "sqrt-u8"
