"""Dense teacher logits -> sparse targets (ids, probabilities, tail mass), in four modes.

The capture stage stores, per token, a few next-token ids of the teacher with their
probabilities under softmax(logits / temperature) over the *true* vocabulary, and the
leftover "tail" mass. The loss treats that tail as one extra "ghost" bucket, so the stored
target keeps the exact total mass instead of silently renormalizing. Modes:

* ``topk``: the k most probable ids;
* ``adaptive``: the most probable ids, stopping once their mass reaches ``threshold`` or at
  the first id below ``min_prob``, at least one and at most k (a confident token needs one or
  two ids, a flat one up to k). ``min_prob`` is the allocation that minimizes total variation
  for a given mean number of ids: leaving id j in the tail costs about p_j of TV, so the ids
  worth their bytes are those above one probability cut, wherever they sit;
* ``budget``: per token the k most probable ids (k is the cap), then ``budget_cut`` over a whole
  work unit keeps the ``mean_ids · tokens`` most probable of them (at least one per token): the
  probability cut above, with the cut chosen per unit so that the bytes are what the user budgeted,
  on a flat teacher or a confident one alike;
* ``sampled``: n = ``uniforms.shape[1]`` draws from the distribution (inverse CDF on
  caller-supplied uniforms, so a token's draws depend only on its seed, not on batching),
  kept as unique ids with probabilities count / n: an unbiased estimate of the whole
  distribution (Sparse Logit Sampling). Its ``tail`` is the true mass of the ids not drawn;
* ``hybrid``: budget's exact ids, plus ``draws`` draws from the rest of each token's distribution
  (``hybrid_cut``): exact where the mass is, unbiased in the tail. Per chunk the k most probable
  ids are found and ``drawn`` holds draws from the ids outside them (the "deep" tail); after the
  unit's budget cut each tail draw is taken from the cut ids (known exactly) or is the deep draw
  of its slot, in proportion to their masses, so every draw follows the whole tail's distribution.

Rows store fewer than their width of ids in adaptive and sampled mode: the rest is padding,
id -1 with probability 0, always after the real entries.

Work is done in float32, ``chunk_size`` rows at a time: a [16k, 152k] bf16 logits batch
is 5 GiB, and a whole-batch float32 softmax would add 10 GiB more. Per chunk there is one
[chunk, V] float32 scratch buffer, allocated once per call, and three reads of the logits:
top-k, then exp((x - max) / T) into the scratch, then its row sums. Small chunks (a few MiB,
as the CPU capture uses) keep all three in cache. On CPU the top-k and the sums run in two
compiled kernels (``cpu_kernels``) that read each row twice and write no [chunk, V] temporary; on a
GPU with Triton, ``gpu_kernels`` read the model-dtype logits once (twice to draw) and no float32
scratch is allocated at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raydistill.contracts.shards.codec import MODES
from raydistill.contracts.shards.format import budget_total
from raydistill.errors import ConfigError
from raydistill.stages.capture import cpu_kernels, gpu_kernels

__all__ = ["HybridTargets", "SparseTargets", "budget_cut", "hybrid_cut", "sparse_to_dense", "sparsify_hidden",
           "sparsify_topk"]

# On CPU, top-k and the normaliser run in compiled kernels (cpu_kernels); False keeps torch's ops there,
# which benchmarks and tests use as the reference.
USE_CPU_KERNELS = True
# Devices whose logits go through the Triton kernels (``gpu_kernels``) when Triton can run there; an empty
# set keeps torch's ops (the reference). The tests add "cpu" under Triton's interpreter.
TRITON_DEVICES = {"cuda"}


def _triton_head(device: torch.device) -> bool:
    return device.type in TRITON_DEVICES and gpu_kernels.available(device)


@dataclass
class SparseTargets:
    """Top-k picture of N next-token distributions."""

    ids: torch.Tensor  # [N, k] int64 (top-k/adaptive: descending probability; -1 = padding)
    probs: torch.Tensor  # [N, k] float32, softmax(logits / T) over the true vocab at `ids` (sampled: count / n)
    tail: torch.Tensor  # [N] float32, 1 - the true mass at `ids`, clipped to [0, 1]: the ghost bucket's mass
    # All three are exact to float32 precision of the log-sum-exp (~1e-6 absolute on the tail).
    drawn: torch.Tensor | None = None  # hybrid: [N, draws] int64 draws from outside `ids` (-1: nothing there)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _check_mode(mode: str, threshold: float | None, uniforms: torch.Tensor | None, n: int,
                min_prob: float = 0.0) -> None:
    if mode not in MODES:
        raise ConfigError(f"sparsify mode '{mode}' is unknown; valid modes: {', '.join(MODES)}")
    if mode == "adaptive" and (threshold is None or not 0 < threshold <= 1):
        raise ConfigError(f"adaptive mode needs a mass threshold in (0, 1], got {threshold}")
    if not 0 <= min_prob < 1:
        raise ConfigError(f"min_prob={min_prob} must be in [0, 1) (0: no probability cut)")
    if mode in ("sampled", "hybrid") and (uniforms is None or uniforms.dim() != 2 or uniforms.shape[0] != n):
        shape = None if uniforms is None else tuple(uniforms.shape)
        raise ValueError(f"{mode} mode needs uniforms of shape [{n}, draws], got {shape}")


def _check_params(k: int, temperature: float, vocab_size: int, padded_size: int, chunk_size: int) -> None:
    """Reject user-chosen parameters that cannot describe a distribution over this vocabulary."""
    if vocab_size < 1 or vocab_size > padded_size:
        raise ConfigError(
            f"vocab_size={vocab_size} must be between 1 and the logits' width ({padded_size} columns)"
        )
    if k < 1:
        raise ConfigError(f"k={k} must be at least 1")
    if k > vocab_size:
        raise ConfigError(
            f"k={k} is larger than the teacher's vocabulary ({vocab_size} ids); choose k <= {vocab_size}"
        )
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0 (1.0 keeps the teacher's distribution)")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be at least 1")


def _topk_chunk(
    logits: torch.Tensor, k: int, temperature: float, scratch: torch.Tensor | None, mode: str = "topk",
    threshold: float | None = None, uniforms: torch.Tensor | None = None, min_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k ids, probabilities, tail (and hybrid's deep draws) of one chunk of (already vocab-truncated) logits.

    ``scratch`` is a float32 buffer with at least as many rows, reused across chunks so a
    capture allocates its one [chunk, V] temporary once; it may be ``logits`` itself when
    the caller owns them (then they are overwritten). Softmax(x / T) is monotonic in x, so
    top-k runs on the raw logits, and the normaliser is the row max (top-k's first value)
    plus one pass of exp((x - max) / T): no [chunk, V] log-softmax is ever formed. On CPU both
    run in the compiled kernels of ``cpu_kernels`` (the same results to float32 rounding).
    """
    if _triton_head(logits.device):
        return _triton_chunk(logits, k, temperature, mode, threshold, uniforms, min_prob)
    n = logits.shape[0]
    x = logits
    if x.dtype != torch.float32:  # compare and sum in float32 (bf16 logits have many ties)
        x = scratch[:n].copy_(logits)
    if mode not in ("sampled", "hybrid") and USE_CPU_KERNELS and x.device.type == "cpu":
        threads = torch.get_num_threads()
        vals, ids = (torch.from_numpy(a) for a in cpu_kernels.top_k_rows(x.numpy(), k, threads))
        _refuse_nonfinite(vals[:, :1])
        rest = cpu_kernels.exp_sums(x.numpy(), vals.numpy(), temperature, threads)
        return *_finish(vals, ids, torch.from_numpy(rest).unsqueeze(1), temperature, mode, threshold, min_prob), None
    top_vals, top_ids = torch.topk(x, 1 if mode == "sampled" else k, dim=-1, largest=True, sorted=True)
    _refuse_nonfinite(top_vals[:, :1])
    e = torch.sub(x, top_vals[:, :1], out=scratch[:n])  # x may be scratch itself: elementwise, safe
    if temperature != 1.0:
        e.div_(temperature)
    e.exp_()
    if mode == "sampled":
        return *_sample_chunk(e, uniforms), None
    # The tail is summed directly over the unstored ids (their entries zeroed first), not taken as
    # 1 − Σ top: for a confident token that difference cancels to 0 in float32, while the direct sum
    # keeps ~7 significant digits however small the tail is. Still one full pass over the row.
    # float32 is enough here: torch's cascaded sum keeps ~1e-7 relative error over any row width, and
    # a float64 sum of a [chunk, V] row costs 35x more on CPU (a cast per element).
    rest = e.scatter_(1, top_ids, 0.0).sum(dim=-1, keepdim=True).double()
    drawn = _draw_deep_tail(e, rest, uniforms) if mode == "hybrid" else None
    return *_finish(top_vals, top_ids, rest, temperature, mode, threshold, min_prob), drawn


def _triton_chunk(
    logits: torch.Tensor, k: int, temperature: float, mode: str, threshold: float | None,
    uniforms: torch.Tensor | None, min_prob: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``_topk_chunk`` through the Triton kernels: the same targets from one read of the logits (two with draws)."""
    if mode == "sampled":
        top_val, _, rest = gpu_kernels.top_k_stats(logits, 1, temperature)
        _refuse_nonfinite(top_val)
        total = rest + 1.0  # the top id's own exp(0)
        drawn = gpu_kernels.draw_ids(logits, top_val[:, 0], total[:, 0], uniforms, temperature)

        def mass(ids: torch.Tensor) -> torch.Tensor:
            return (logits.gather(1, ids).float() - top_val).div_(temperature).exp_().double().div_(total).float()

        return *_draws_as_targets(drawn, mass), None
    top_vals, top_ids, rest = gpu_kernels.top_k_stats(logits, k, temperature)
    _refuse_nonfinite(top_vals[:, :1])
    drawn = None
    if mode == "hybrid":
        drawn = gpu_kernels.draw_ids(logits, top_vals[:, 0], rest[:, 0], uniforms, temperature, skip=top_ids)
        drawn.masked_fill_(rest <= 0, -1)
    return *_finish(top_vals, top_ids, rest, temperature, mode, threshold, min_prob), drawn


def _draw_deep_tail(e: torch.Tensor, rest: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draws by inverse CDF from ``e`` [n, V] (unnormalized, 0 at the top-k ids; overwritten by its
    cumulative sum): ids never in the top k, since a zero-width entry cannot be landed on; -1 in
    rows whose deep tail has no mass."""
    cdf = e.cumsum_(dim=-1)
    drawn = torch.searchsorted(cdf, uniforms.to(cdf) * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)
    return drawn.masked_fill_(rest <= 0, -1)


def _refuse_nonfinite(row_max: torch.Tensor) -> None:
    """Stop on NaN or +inf logits (both top-k paths rank NaN first, and +inf is the maximum)."""
    broken = ~torch.isfinite(row_max)
    if broken.any():
        raise ValueError(
            f"the teacher's logits hold NaN or +inf at {int(broken.sum())} of {len(row_max)} positions: a float16 "
            "teacher overflows (set dtype: bfloat16 or float32 in the capture config), or its weights are broken"
        )


def _finish(top_vals: torch.Tensor, top_ids: torch.Tensor, rest: torch.Tensor, temperature: float, mode: str,
            threshold: float | None, min_prob: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities and tail from the top-k logits and ``rest`` [n, 1] float64, the sum of
    exp((x - max) / T) over the unstored ids; in adaptive mode, the cut to a prefix of each row."""
    row_max = top_vals[:, :1]
    shifted = top_vals - row_max
    if temperature != 1.0:
        shifted.div_(temperature)
    top_e = shifted.exp_()
    norm = rest + top_e.sum(dim=-1, dtype=torch.float64, keepdim=True)
    probs = (top_e / norm).to(torch.float32)
    tail = rest / norm
    if mode == "adaptive":  # the prefix up to the mass threshold or the probability cut (at least one id)
        before = probs.cumsum(dim=-1) - probs  # mass of the ids ranked above each one
        drop = (before >= threshold) | (probs < min_prob)
        drop[:, 0] = False
        tail = tail + torch.where(drop, top_e, 0.0).sum(dim=-1, dtype=torch.float64, keepdim=True) / norm
        top_ids = top_ids.masked_fill(drop, -1)
        probs = probs.masked_fill(drop, 0.0)
    return top_ids, probs, tail.squeeze(1).clamp_(0.0, 1.0).to(torch.float32)


def _sample_chunk(
    e: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws by inverse CDF from unnormalized probabilities ``e`` [n, V] (overwritten), as
    unique ids (ascending, -1 padded) with count / draws, and the true mass not drawn."""
    cdf = e.cumsum_(dim=-1)
    total = cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniforms.to(cdf) * total, right=True).clamp_(max=cdf.shape[1] - 1)

    def mass(ids: torch.Tensor) -> torch.Tensor:
        below = torch.where(ids > 0, cdf.gather(1, (ids - 1).clamp_(min=0)), torch.zeros_like(ids, dtype=cdf.dtype))
        return ((cdf.gather(1, ids) - below) / total).float()

    return _draws_as_targets(drawn, mass)


def _draws_as_targets(
    drawn: torch.Tensor, mass: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws [n, d] as unique ids (ascending, -1 padded) with count / d, and the true mass not drawn;
    ``mass(ids)`` gives each id's true probability."""
    n, draws = drawn.shape
    drawn, _ = drawn.sort(dim=-1)
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(dim=-1) - 1  # which unique id each draw belongs to
    counts = torch.zeros(n, draws, dtype=torch.float32, device=drawn.device).scatter_add_(
        1, slot, torch.ones_like(slot, dtype=torch.float32))
    used = counts > 0
    ids = torch.full_like(drawn, -1).scatter_(1, slot, drawn).masked_fill_(~used, -1)
    true_mass = mass(ids.clamp(min=0)).masked_fill_(~used, 0.0)
    tail = (1.0 - true_mass.sum(dim=-1, dtype=torch.float64)).clamp_(0.0, 1.0).to(torch.float32)
    return ids, counts / draws, tail


@dataclass
class HybridTargets:
    """Hybrid mode's unit after its cut: exact ids first, then the tail draws' distinct ids (numpy)."""

    ids: np.ndarray  # [N, k + draws] int64: exact ids, then drawn ids, then -1 padding
    probs: np.ndarray  # [N, k + draws] float32: exact probabilities (0 at drawn ids and padding)
    tail: np.ndarray  # [N] float32: the mass outside the exact ids, which the draws stand for
    counts: np.ndarray  # [N, k + draws] int64: how often each drawn id was drawn (0 elsewhere)


def hybrid_cut(ids: np.ndarray, probs: np.ndarray, tail: np.ndarray, drawn: np.ndarray, uniforms: np.ndarray,
               mean_ids: float) -> HybridTargets:
    """``budget_cut``, then ``draws`` draws per token from everything outside the exact ids it keeps.

    ``ids``/``probs`` [N, K] are top-k rows and ``tail`` [N] the mass outside them; ``drawn`` [N, d]
    holds d draws from outside the top-k (-1 where that part is empty) and ``uniforms`` [N, d] one
    more uniform per draw. The tail after the cut is the cut ids (known exactly) plus that deep part;
    draw j lands at u_j · τ in the tail's mass: inside the cut ids' share it picks one of them by its
    probability, past it it is deep draw j. So each draw follows the tail's distribution, counts / d
    times τ is an unbiased estimate of every tail probability, and the result depends only on the
    inputs (its draws are keyed per token, as ``sampled`` mode's are).
    """
    n, k = ids.shape
    d = drawn.shape[1]
    kept_ids, kept_probs, new_tail = budget_cut(ids, probs, tail, mean_ids)
    cut = np.where((ids >= 0) & (kept_ids < 0), probs, 0.0).astype(np.float64)
    cut_mass = cut.sum(axis=1)
    deep = drawn[:, 0] >= 0
    scale = np.where(deep, new_tail.astype(np.float64), cut_mass)  # no deep tail: the cut ids hold it all
    point = uniforms.astype(np.float64) * scale[:, None]
    from_cut = (point < cut_mass[:, None]) | ~deep[:, None]
    lift = 2.0 * np.arange(n)[:, None]  # rows' cumulative masses stacked into one ascending array
    where = np.searchsorted((np.cumsum(cut, axis=1) + lift).ravel(), (point + lift).ravel(), side="right")
    col = np.minimum(where.reshape(n, d) - np.arange(n)[:, None] * k, k - 1)
    last_cut = k - 1 - np.argmax((cut > 0)[:, ::-1], axis=1)  # rounding past the end: the last cut id
    col = np.where(cut[np.arange(n)[:, None], col] > 0, col, last_cut[:, None])
    chosen = np.where(from_cut, ids[np.arange(n)[:, None], col], drawn)
    chosen[(cut_mass <= 0) & ~deep] = -1  # nothing outside the exact ids: no draws
    uniq, counts = _distinct_with_counts(chosen)
    out_ids = np.concatenate([kept_ids, np.full((n, d), -1, np.int64)], axis=1)
    out_counts = np.zeros_like(out_ids)
    rows, slots = np.nonzero(uniq >= 0)
    cols = (kept_ids >= 0).sum(axis=1)[rows] + slots  # right after each row's exact prefix
    out_ids[rows, cols], out_counts[rows, cols] = uniq[rows, slots], counts[rows, slots]
    out_probs = np.concatenate([kept_probs, np.zeros((n, d), np.float32)], axis=1)
    return HybridTargets(ids=out_ids, probs=out_probs, tail=new_tail, counts=out_counts)


def _distinct_with_counts(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distinct non-negative values (ascending, -1 padded) and how often each occurs."""
    n, d = chosen.shape
    ordered = np.sort(chosen, axis=1)
    real = ordered >= 0
    new = real.copy()
    new[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    slot = np.cumsum(new, axis=1) - 1
    flat = (np.arange(n)[:, None] * d + slot)[real]
    counts = np.bincount(flat, minlength=n * d).reshape(n, d)
    uniq = np.full((n, d), -1, np.int64)
    uniq.reshape(-1)[flat] = ordered[real]
    return uniq, counts


def budget_cut(ids: np.ndarray, probs: np.ndarray, tail: np.ndarray, mean_ids: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``round(mean_ids · N)`` most probable entries of N tokens' top-k rows, at least one
    per token; the rest become padding (id -1, probability 0) and their mass joins the tail.

    ``ids``/``probs`` [N, K] are top-k rows (descending probability); returns new arrays. The kept
    set is every entry above one probability cut τ plus, among entries equal to τ, the first in
    row-major order, so each row keeps a prefix and the result depends only on the inputs (a unit
    captured in any batching is cut the same way). Leaving an entry in the tail costs about its
    probability of TV, so for a fixed total this is the allocation with the least error.
    """
    n, k = probs.shape
    budget = budget_total(mean_ids, n, k) - n  # entries beyond each token's first
    rest = np.ascontiguousarray(probs[:, 1:]).reshape(-1)
    keep = np.zeros(rest.shape, dtype=bool)
    if 0 < budget < rest.size:
        cut = np.partition(rest, rest.size - budget)[rest.size - budget]  # the budget-th largest
        keep = rest > cut
        ties = np.flatnonzero(rest == cut)[: budget - int(keep.sum())]
        keep[ties] = True
    elif budget >= rest.size:
        keep[:] = True
    keep = np.concatenate([np.ones((n, 1), dtype=bool), keep.reshape(n, k - 1)], axis=1) & (ids >= 0)
    dropped = np.where(keep, 0.0, probs).sum(axis=1, dtype=np.float64)
    new_tail = np.clip(tail.astype(np.float64) + dropped, 0.0, 1.0).astype(np.float32)
    return np.where(keep, ids, -1), np.where(keep, probs, 0.0).astype(np.float32), new_tail


def _empty_targets(n: int, k: int, device: torch.device, draws: int = 0) -> SparseTargets:
    return SparseTargets(
        ids=torch.empty(n, k, dtype=torch.int64, device=device),
        probs=torch.empty(n, k, dtype=torch.float32, device=device),
        tail=torch.empty(n, dtype=torch.float32, device=device),
        drawn=torch.empty(n, draws, dtype=torch.int64, device=device) if draws else None,
    )


def _store(out: SparseTargets, start: int, stop: int, chunk: tuple) -> None:
    out.ids[start:stop], out.probs[start:stop], out.tail[start:stop] = chunk[:3]
    if out.drawn is not None:
        out.drawn[start:stop] = chunk[3]


def sparsify_topk(
    logits: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int = 4096,
    mode: str = "topk",
    threshold: float | None = None,
    uniforms: torch.Tensor | None = None,
    min_prob: float = 0.0,
) -> SparseTargets:
    """Sparse targets of ``logits`` [N, V_padded] (any float dtype), on the logits' device.

    ``vocab_size`` (< V_padded) drops the padded embedding columns before the softmax, so
    padding never takes probability mass nor appears among the stored ids. ``mode``,
    ``threshold`` and ``min_prob`` (adaptive) and ``uniforms`` [N, draws] in [0, 1) (sampled):
    see the module doc.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    n, padded = logits.shape
    vocab = padded if vocab_size is None else int(vocab_size)
    _check_params(k, temperature, vocab, padded, chunk_size)
    _check_mode(mode, threshold, uniforms, n, min_prob)
    out = _empty_targets(n, _width(mode, k, uniforms), logits.device, _deep_draws(mode, uniforms))
    scratch = None if _triton_head(logits.device) else torch.empty(
        min(chunk_size, n), vocab, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            u = None if uniforms is None else uniforms[start:stop]
            _store(out, start, stop, _topk_chunk(logits[start:stop, :vocab], k, temperature, scratch, mode,
                                                 threshold, u, min_prob))
    return out


def _width(mode: str, k: int, uniforms: torch.Tensor | None) -> int:
    return int(uniforms.shape[1]) if mode == "sampled" and uniforms is not None else k


def _deep_draws(mode: str, uniforms: torch.Tensor | None) -> int:
    return int(uniforms.shape[1]) if mode == "hybrid" and uniforms is not None else 0


def sparsify_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int = 4096,
    mode: str = "topk",
    threshold: float | None = None,
    uniforms: torch.Tensor | None = None,
    min_prob: float = 0.0,
) -> SparseTargets:
    """Like ``sparsify_topk(hidden @ lm_head_weight.T)``, without ever forming the full logits.

    Capture takes the teacher's final hidden states [N, H] and applies the output projection
    [V_padded, H] one chunk of rows at a time: the full [N, V] logits of a large-vocabulary
    teacher would dominate accelerator memory. Padded vocab rows are never multiplied.
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and lm_head_weight [V, H], got {tuple(hidden.shape)} "
            f"and {tuple(lm_head_weight.shape)}"
        )
    if hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden has {hidden.shape[1]} features, "
            f"lm_head_weight has {lm_head_weight.shape[1]}"
        )
    n, padded = hidden.shape[0], lm_head_weight.shape[0]
    vocab = padded if vocab_size is None else int(vocab_size)
    _check_params(k, temperature, vocab, padded, chunk_size)
    _check_mode(mode, threshold, uniforms, n, min_prob)
    weight_t = lm_head_weight[:vocab].t()  # a view: the projection skips padded rows
    out = _empty_targets(n, _width(mode, k, uniforms), hidden.device, _deep_draws(mode, uniforms))
    rows = min(chunk_size, n)
    # One logits buffer for every chunk; for a float32 model it is also the softmax scratch, and the
    # Triton kernels need none.
    logits_buf = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    scratch = None if _triton_head(hidden.device) else logits_buf if hidden.dtype == torch.float32 else torch.empty(
        rows, vocab, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            # in the model's dtype, as its lm_head would compute it
            logits = torch.mm(hidden[start:stop], weight_t, out=logits_buf[: stop - start])
            u = None if uniforms is None else uniforms[start:stop]
            _store(out, start, stop, _topk_chunk(logits, k, temperature, scratch, mode, threshold, u, min_prob))
    return out


def sparse_to_dense(
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    vocab_size: int,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense distribution [N, vocab_size] a sparse target stands for.

    Stored ids keep their probabilities (ids of -1 are padding); the tail mass is spread over
    the unstored ids in proportion to ``prior`` [vocab_size] (the tail model), or uniformly
    (the maximum-entropy reading of "the rest") when it is None. Used by fidelity measures
    and tests, not by training.
    """
    if ids.shape != probs.shape or ids.dim() != 2 or tail.shape != ids.shape[:1]:
        raise ValueError(
            f"expected ids/probs [N, k] and tail [N], got {tuple(ids.shape)}, "
            f"{tuple(probs.shape)}, {tuple(tail.shape)}"
        )
    n, k = ids.shape
    if k > vocab_size and prior is None and (ids >= 0).sum(-1).max() > vocab_size:
        raise ConfigError(f"k={k} stored ids do not fit in vocab_size={vocab_size}")
    dtype = probs.dtype if probs.is_floating_point() else torch.float32
    valid = ids >= 0
    safe = ids.long().clamp(min=0)
    weights = torch.ones(vocab_size, dtype=dtype, device=probs.device) if prior is None else prior.to(dtype)
    spread = weights.expand(n, vocab_size).clone().scatter_(1, safe, torch.where(
        valid, torch.zeros_like(probs, dtype=dtype), weights[safe]))
    total = spread.sum(dim=-1, keepdim=True)
    dense = spread.mul_(torch.where(total > 0, tail.to(dtype).unsqueeze(1) / total, torch.zeros_like(total)))
    return dense.scatter_add_(1, safe, torch.where(valid, probs.to(dtype), torch.zeros_like(probs, dtype=dtype)))
