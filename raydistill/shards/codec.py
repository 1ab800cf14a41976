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
* the tail mass is a 16-bit log code (1/1024-octave steps), precise down to 2^-63.
"""

from __future__ import annotations

import numpy as np

from raydistill.errors import ContractError

VALUE_CODECS = ("sqrt-u8",)  # top-k and adaptive modes
DEFAULT_VALUE_SCALE = 128  # q = round(128·√p): codes 0..128 cover [0, 1]
COUNT_CODECS = ("count-u8", "count-u16")  # sampled mode: how many of the n draws hit each id
TAIL_CODECS = ("log2-u16",)
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
    if codec in ("sqrt-u8", "count-u8"):
        return np.dtype("u1")
    if codec == "count-u16":
        return np.dtype("<u2")
    known = ", ".join(VALUE_CODECS + COUNT_CODECS)
    raise ContractError(f"value codec '{codec}' is unknown to this raydistill (known: {known})")


def check_tail_codec(codec: str) -> None:
    if codec not in TAIL_CODECS:
        raise ContractError(f"tail codec '{codec}' is unknown to this raydistill (known: {', '.join(TAIL_CODECS)})")


# --- probabilities ---------------------------------------------------------------------------

def check_value_scale(scale: int) -> None:
    if not 1 <= scale <= 255:
        raise ContractError(f"value_scale {scale} must be in [1, 255] (codes are one byte)")


def quantize_probs(p: np.ndarray, scale: int = DEFAULT_VALUE_SCALE) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 codes ``round(scale·√p)``."""
    check_value_scale(scale)
    root = np.sqrt(np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0))
    return np.rint(root * np.float32(scale)).astype(np.uint8)


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

def _cell_bounds(cell_elems: np.ndarray) -> list[tuple[int, int]]:
    ends = np.cumsum(cell_elems)
    return list(zip((ends - cell_elems).tolist(), ends.tolist(), strict=True))


def shuffle_bytes(flat: np.ndarray, cell_elems: np.ndarray) -> np.ndarray:
    """Bytes of ``flat`` (little-endian) with each cell's byte planes laid one after another.

    A cell of n elements of s bytes becomes s runs of n bytes (all byte 0s, then all byte 1s,
    ...). One loop step per cell (a document window), none per token.
    """
    size = flat.dtype.itemsize
    plain = np.ascontiguousarray(flat).view(np.uint8).reshape(-1, size)
    if size == 1:
        return plain.reshape(-1)
    out = np.empty(plain.size, dtype=np.uint8)
    for a, b in _cell_bounds(cell_elems):
        out[a * size : b * size].reshape(size, b - a)[...] = plain[a:b].T
    return out


def unshuffle_bytes(data: np.ndarray, cell_elems: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of ``shuffle_bytes``: the flat elements, as ``dtype``."""
    size = dtype.itemsize
    if size == 1:
        return data.view(dtype)
    plain = np.empty((data.size // size, size), dtype=np.uint8)
    for a, b in _cell_bounds(cell_elems):
        plain[a:b] = data[a * size : b * size].reshape(size, b - a).T
    return plain.reshape(-1).view(dtype)
