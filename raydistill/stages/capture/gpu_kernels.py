"""Triton kernels for the capture head on GPU: one read of each logits row gives its top k, max and tail sum.

torch's GPU head reads a chunk's bf16 logits into a float32 copy, then runs ``torch.topk``, a subtraction,
an exp, a scatter and a sum over it: five passes over [chunk, V] and two [chunk, V] float32 temporaries.
These kernels read the model-dtype logits once (twice for draws) and write only the [chunk, k] results:

* ``top_k_stats``: per row the k largest logits (descending; equal values by ascending id, as the CPU
  kernels and the shard contract order them), and ``rest``, the direct sum of exp((x - max) / T) over
  every entry *not* among them. One pass over vocabulary tiles keeps a running top k (each value and its
  id packed into one int64 key, so ``tl.topk`` over keys ranks both; a tile with nothing above any of
  its rows' k-th key so far is not sorted at all, which after the first tiles is most of them), a
  running max, and adds the exp of every entry that drops out of the running top k to ``rest``
  (rescaled when the max grows): a direct sum, never ``total − Σ top``, which would cancel to 0 for a
  confident token.
* ``draw_ids``: inverse-CDF draws (sampled mode, and hybrid's deep tail with the top ids excluded): draw j
  lands on the first id whose cumulative exp((x - max) / T) exceeds u_j · total, found tile by tile by
  counting how many cumulative sums each target has passed, with no [chunk, V] cumulative sum stored;
  only the few tiles that hold a target compare targets with columns.

``tl.topk`` needs a power of two; other k run at the next one and the wrapper moves the extra entries'
mass to ``rest``. Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported) runs both
kernels on CPU tensors, which is how the tests check them against torch here; on CPU the capture keeps
its numba kernels (``cpu_kernels``).
"""

from __future__ import annotations

import math
import os

import torch

try:  # triton ships with CUDA builds of torch; CPU installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["available", "draw_ids", "top_k_stats"]

BLOCK_V = 1024  # vocabulary columns per tile: 149 tiles at V = 151,936
BLOCK_N = 4  # rows per program of the top-k kernel
DRAW_BLOCK_V = 512  # the draw kernel compares every target with every column of a tile: [draws, 512]


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: compiled on a CUDA GPU, interpreted anywhere under
    ``TRITON_INTERPRET=1`` (the tests)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    EMPTY = tl.constexpr(-(2**63))  # below every key

    @triton.jit
    def _keys(x, cols, vocab):
        """Order-preserving int64 keys: float32 bits made monotone in the high half, the inverted id in the
        low half (so of two equal values the lower id ranks first)."""
        bits = x.to(tl.int32, bitcast=True)
        mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        low = tl.where(cols < vocab, vocab - 1 - cols, 0)
        return (mono.to(tl.int64) << 32) | low.to(tl.int64)

    @triton.jit
    def _key_values(keys):
        high = (keys >> 32).to(tl.int32)
        bits = tl.where(high >= 0, high, high ^ 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _top_k_stats_kernel(x_ptr, stride, n_rows, vocab, inv_t, vals_ptr, ids_ptr, rest_ptr,
                            K: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        live = rows < n_rows
        best = tl.full([BLOCK_ROWS, K], EMPTY, tl.int64)
        row_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        rest = tl.zeros([BLOCK_ROWS], tl.float32)
        for start in range(0, vocab, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            inside = live[:, None] & (cols < vocab)[None, :]
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=inside,
                        other=float("-inf")).to(tl.float32)
            keys = _keys(x, cols[None, :], vocab)
            # most tiles of a long row hold nothing above any row's k-th key so far: no sort for them
            if tl.max(tl.max((keys > tl.min(best, 1)[:, None]).to(tl.int32), 1), 0) > 0:
                merged = tl.topk(tl.reshape(tl.join(best, tl.topk(keys, K)), [BLOCK_ROWS, 2 * K]), K)
            else:
                merged = best
            cut = tl.min(merged, 1)  # keys are distinct: everything below the k-th key leaves the top k
            new_max = tl.maximum(row_max, tl.max(x, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # dead rows: no inf - inf
            dropped = tl.sum(tl.where(keys < cut[:, None], tl.exp((x - safe_max[:, None]) * inv_t), 0.0), 1)
            left = (best < cut[:, None]) & (best != EMPTY)  # EMPTY: the starting slots, no value
            dropped += tl.sum(tl.where(left, tl.exp((_key_values(best) - safe_max[:, None]) * inv_t), 0.0), 1)
            rest = rest * tl.exp((row_max - safe_max) * inv_t) + dropped
            row_max = new_max
            best = merged
        slots = tl.arange(0, K)
        out = rows[:, None] * K + slots[None, :]
        tl.store(vals_ptr + out, _key_values(best), mask=live[:, None])
        tl.store(ids_ptr + out, vocab - 1 - (best & 0xFFFFFFFF), mask=live[:, None])
        tl.store(rest_ptr + rows, rest, mask=live)

    @triton.jit
    def _draw_kernel(x_ptr, stride, vocab, inv_t, max_ptr, total_ptr, u_ptr, skip_ptr, out_ptr,
                     DRAWS: tl.constexpr, SKIP: tl.constexpr, BLOCK_COLS: tl.constexpr):
        row = tl.program_id(0)
        row_max = tl.load(max_ptr + row)
        draws = tl.arange(0, DRAWS)
        target = tl.load(u_ptr + row * DRAWS + draws) * tl.load(total_ptr + row)
        passed = tl.zeros([DRAWS], tl.int64)  # per draw: columns whose cumulative sum is <= its target
        below = 0.0
        if SKIP > 0:
            skip = tl.load(skip_ptr + row * SKIP + tl.arange(0, SKIP))
        for start in range(0, vocab, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            x = tl.load(x_ptr + row.to(tl.int64) * stride + cols, mask=cols < vocab,
                        other=float("-inf")).to(tl.float32)
            e = tl.exp((x - row_max) * inv_t)
            if SKIP > 0:
                e = tl.where(tl.max((cols[:, None] == skip[None, :]).to(tl.int32), 1) > 0, 0.0, e)
            cdf = tl.cumsum(e, 0) + below
            top = tl.max(cdf, 0)  # the last column's cumulative sum (padding adds 0)
            # a target below this tile passes none of it, one above passes all of it: only a tile that holds a
            # target (at most `draws` of the row's tiles) compares every target with every column
            if tl.max(((target >= below) & (target < top)).to(tl.int32), 0) > 0:
                passed += tl.sum(((cdf[None, :] <= target[:, None]) & (cols < vocab)[None, :]).to(tl.int64), 1)
            else:
                passed += tl.where(target >= top, tl.minimum(vocab - start, BLOCK_COLS), 0).to(tl.int64)
            below = top
        tl.store(out_ptr + row * DRAWS + draws, tl.minimum(passed, vocab - 1))


def _power_of_two(k: int) -> int:
    return 1 << max(0, math.ceil(math.log2(k)))


def top_k_stats(x: torch.Tensor, k: int, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of ``x`` [n, V] (any float dtype, read once) as float32 values
    and int64 ids, descending, and ``rest`` [n, 1] float64: Σ exp((x - max) / T) over the other entries."""
    n, vocab = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    width = _power_of_two(k)
    block = max(BLOCK_V, width)
    vals = torch.empty(n, width, dtype=torch.float32, device=x.device)
    ids = torch.empty(n, width, dtype=torch.int64, device=x.device)
    rest = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _top_k_stats_kernel[(triton.cdiv(n, BLOCK_N),)](
            x, x.stride(0), n, vocab, 1.0 / temperature, vals, ids, rest,
            K=width, BLOCK_ROWS=BLOCK_N, BLOCK_COLS=block)
    rest = rest.double().unsqueeze(1)
    if width > k:  # the power-of-two extras are not stored: their mass belongs to the rest
        extra = vals[:, k:].double().sub_(vals[:, :1].double()).div_(temperature).exp_()
        rest = rest + extra.sum(dim=1, keepdim=True)
    return vals[:, :k].contiguous(), ids[:, :k].contiguous(), rest


def draw_ids(x: torch.Tensor, row_max: torch.Tensor, total: torch.Tensor, uniforms: torch.Tensor,
             temperature: float = 1.0, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF draws [n, d] int64 from exp((x - row_max) / T) over each row of ``x`` [n, V], whose sum
    over the entries drawn from is ``total`` [n]; the ids in ``skip`` [n, s] are left out (hybrid's deep tail)."""
    n, vocab = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    draws = uniforms.shape[1]
    width = _power_of_two(draws)
    u = torch.ones(n, width, dtype=torch.float32, device=x.device)  # padding draws: discarded below
    u[:, :draws] = uniforms
    out = torch.empty(n, width, dtype=torch.int64, device=x.device)
    skips = 0 if skip is None else _power_of_two(skip.shape[1])
    skip_ids = torch.full((n, max(skips, 1)), -1, dtype=torch.int64, device=x.device)
    if skip is not None:
        skip_ids[:, : skip.shape[1]] = skip
    if n:
        _draw_kernel[(n,)](
            x, x.stride(0), vocab, 1.0 / temperature, row_max.float().contiguous(), total.float().contiguous(),
            u, skip_ids, out, DRAWS=width, SKIP=skips, BLOCK_COLS=DRAW_BLOCK_V)
    return out[:, :draws]
