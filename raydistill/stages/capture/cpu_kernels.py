"""Compiled (numba) CPU kernels for the sparsify: an exact top-k and the normaliser's sum.

On CPU the capture's cost beyond the teacher's forward is the per-token top-k and the one pass of
exp over the vocabulary that the normaliser needs. ``torch.topk`` on CPU costs far more at the k a
capture uses (96 of 4,096 columns: ~30 µs per row on one thread) than the work needs, and torch's
exp pass writes a [rows, V] temporary and reads it back twice. These kernels do both per row while
the row is in cache: the whole sparsify takes 0.36× torch's time at k = 96 on the demo teacher, 0.26× on
SmolLM2's 49k vocabulary (``tools/bench_topk.py``, docs/benchmarks.md "Capture throughput"). GPUs run
the Triton kernels of ``gpu_kernels``.

* ``top_k_rows``: the k largest entries of each row, descending, equal values by ascending id.
  Exact: if k block maxima (of 8 columns each) reach a value t, the row has k entries >= t, so
  every entry of its top k is >= t and lies in a block whose maximum reaches t; only those blocks
  are scanned, and only their entries >= t ranked. t is guessed from a quarter of the maxima and
  checked (else selected exactly). Each entry is ranked by one int64 key (order-preserving bits of
  the float32 value, then the inverted id), so an integer select and sort give the order.
* ``exp_sums``: per row the direct sum of exp((x - max) / T) over the entries *not* stored (below
  the k-th value, plus the k-th value's unstored duplicates): float32 vector lanes within blocks of
  256 columns, float64 across them, ~1e-7 relative error at any width.

Both release the GIL, so a second capture call's forward runs beside them.
"""

from __future__ import annotations

import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["exp_sums", "top_k_rows"]

BLOCK = 8  # columns per block maximum: 4,096 columns give 512 maxima to choose a threshold from
SUM_BLOCK = 256  # columns summed in float32 lanes before the float64 total
# exp's range reduction and polynomial (Cephes expf) are plain arithmetic, so LLVM vectorises the
# loop; "reassoc" lets it split the sum over vector lanes. No nnan/ninf: NaN and inf keep their meaning.
FAST = {"reassoc", "contract", "arcp", "nsz"}
LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)
LN2_LO = np.float32(-2.12194440e-4)
_ID_MASK = np.int64(0xFFFFFFFF)
_NAN_KEY = np.int64(0x7FFFFFFF) << 32  # above +inf's key (0x7F800000 << 32)


@numba.njit(fastmath=FAST, inline="always")
def _exp_nonpositive(d: float) -> float:
    """exp(d) for d <= 0 in float32, ≤ 3e-7 relative error; 0 below -87 (where float32 underflows)."""
    underflow = d < np.float32(-87.0)
    d = max(d, np.float32(-87.0))
    n = np.floor(d * LOG2E + np.float32(0.5))
    r = d - n * LN2_HI - n * LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    e = p * np.int32((np.int32(n) + np.int32(127)) << 23).view(np.float32)
    return np.float32(0.0) if underflow else e


@numba.njit(inline="always")
def _select_largest(a: np.ndarray, n: int, kth: int):
    """Reorder ``a[:n]`` so that a[kth] is its (kth+1)-th largest (Hoare quickselect, median of 3)."""
    lo, hi = 0, n - 1
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
        if x < y:
            x, y = y, x
        if y < z:
            y = z
        if x < y:
            y = x
        pivot = y
        i, j = lo, hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            return pivot
    return a[lo]


@numba.njit(inline="always")
def _collect(row, start, stop, threshold, keys, count) -> int:
    """Append the rank key of every entry of ``row[start:stop]`` at or above ``threshold`` (and every
    NaN) to ``keys[count:]``; returns the new count. Branch-free: each entry's key is written, and the
    count moves past it only if it passes (within a block that reaches the threshold, about a quarter do)."""
    for j in range(start, stop):
        v = row[j]
        bits = np.int64(np.float32(v).view(np.int32))
        bits = bits ^ 0x7FFFFFFF if bits < 0 else bits  # negative floats order backwards as integers
        nan = v != v  # NaN (of either sign) fails every compare: it ranks above everything, as in torch.topk
        keys[count] = (_NAN_KEY if nan else bits << 32) | (_ID_MASK - j)  # equal values: the lower id first
        count += (v >= threshold) | nan
    return count


@numba.njit(inline="always")
def _block_threshold(maxima, blocks, k, scratch):
    """A value that at least k of ``maxima[:blocks]`` reach, close to the k-th largest: first guessed
    from every 4th maximum (a quarter of the selection work), checked, else selected exactly."""
    sample = 0
    for b in range(0, blocks, 4):
        scratch[sample] = maxima[b]
        sample += 1
    rank = min(k // 4 + k // 16 + 2, sample)  # a little low: the guess should pass k maxima nearly always
    guess = _select_largest(scratch, sample, rank - 1)
    reached = 0
    for b in range(blocks):
        reached += not maxima[b] < guess
    if reached >= k:
        return guess
    scratch[:blocks] = maxima[:blocks]
    return _select_largest(scratch, blocks, k - 1)


@numba.njit(nogil=True, cache=True)
def _top_k_kernel(k, x, out_vals, out_ids):  # pragma: no cover - compiled; tested through top_k_rows
    n, columns = x.shape
    blocks = columns // BLOCK
    maxima = np.empty(max(blocks, 1), np.float32)
    order = np.empty_like(maxima)
    keys = np.empty(columns, np.int64)
    for r in range(n):
        row = x[r]
        count = 0
        if blocks >= 4 * k:  # few entries pass the k-th largest block maximum; else rank them all
            for b in range(blocks):
                m = row[b * BLOCK]
                for j in range(b * BLOCK + 1, b * BLOCK + BLOCK):
                    v = row[j]
                    m = v if (v > m or v != v) else m  # a NaN entry makes the block's maximum NaN
                maxima[b] = m
            threshold = _block_threshold(maxima, blocks, k, order)
            for b in range(blocks):
                if not maxima[b] < threshold:  # only blocks holding an entry that can pass (or a NaN)
                    count = _collect(row, b * BLOCK, b * BLOCK + BLOCK, threshold, keys, count)
            count = _collect(row, blocks * BLOCK, columns, threshold, keys, count)  # the partial last block
        if count < k:  # small rows, or a NaN threshold
            count = _collect(row, 0, columns, -np.inf, keys, 0)
        if count > k:
            _select_largest(keys, count, k - 1)
        keys[:k].sort()  # in place: ascending keys, so the largest entry is last
        for s in range(k):
            j = _ID_MASK - (keys[k - 1 - s] & _ID_MASK)
            out_ids[r, s] = j
            out_vals[r, s] = row[j]


@numba.njit(nogil=True, cache=True, fastmath=FAST)
def _exp_sums_kernel(scale, x, row_max, kth, kth_stored, out_rest):  # pragma: no cover - compiled
    n, columns = x.shape
    for r in range(n):
        row = x[r]
        m, t = row_max[r], kth[r]
        total = 0.0
        equal = 0
        for start in range(0, columns, SUM_BLOCK):
            block = row[start:start + SUM_BLOCK]  # a slice, not index arithmetic: this form vectorises
            part = np.float32(0.0)
            for j in range(block.shape[0]):
                v = block[j]
                e = _exp_nonpositive((v - m) * scale)
                part += e if v < t else np.float32(0.0)
                equal += v == t
            total += part
        # the k-th value's duplicates that did not fit in the top k are unstored too
        out_rest[r] = total + (equal - kth_stored[r]) * _exp_nonpositive((t - m) * scale)


def _row_parts(n: int, threads: int) -> list[slice]:
    parts = max(1, min(threads, n // 64))  # a thread per 64+ rows: fewer rows cost more to hand out
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="raydistill-kernel")


def _over_rows(kernel, scalars: tuple, arrays: tuple, threads: int) -> None:
    """``kernel(*scalars, *arrays)`` over slices of the arrays' rows, one per thread (the kernels drop the GIL)."""
    parts = _row_parts(arrays[0].shape[0], threads)
    if len(parts) == 1:
        kernel(*scalars, *arrays)
        return
    futures = [_pool().submit(kernel, *scalars, *(a[p] for a in arrays)) for p in parts]
    for f in futures:
        f.result()


def top_k_rows(x: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Values [n, k] float32 and ids [n, k] int64 of each row's k largest entries of ``x`` [n, V]
    float32 (k <= V), descending, equal values by ascending id; NaN ranks first, as in torch.topk.
    ``threads`` (torch's intra-op count, usually) splits the rows."""
    n = x.shape[0]
    vals = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    if n:
        _over_rows(_top_k_kernel, (k,), (x, vals, ids), threads)
    return vals, ids


def exp_sums(x: np.ndarray, top_vals: np.ndarray, temperature: float, threads: int = 1) -> np.ndarray:
    """Per row of ``x`` [n, V] float32, the sum of exp((x - max) / T) over the entries not among
    ``top_vals`` [n, k] (that row's top k, descending; max = its first), in float64."""
    n = x.shape[0]
    rest = np.empty(n, np.float64)
    if n:
        kth = np.ascontiguousarray(top_vals[:, -1])
        stored = (top_vals == kth[:, None]).sum(axis=1)
        _over_rows(_exp_sums_kernel, (np.float32(1.0 / temperature),),
                   (x, np.ascontiguousarray(top_vals[:, 0]), kth, stored, rest), threads)
    return rest
