"""Sparse knowledge-distillation losses: pure functions of student logits and stored targets.

A stored target (see ``raydistill.stages.capture.sparsify``) is the teacher's top-k ids, their
probabilities ``probs`` and the leftover ``tail`` mass, all at the capture temperature T.
The KD loss compares teacher and student over k+1 buckets -- the k stored ids plus one
"ghost" bucket holding everything else -- so both sides are proper distributions with
exact total mass, and the student is taught how much mass belongs outside the top-k
without the loss pretending to know how the teacher spread it. Which divergence compares
the two bucket distributions (forward/reverse/skew KL, TVD, JSD, optionally against a TAID
target) is ``raydistill.stages.train.divergences``' business. Sampled targets (ids drawn from the teacher,
with counts) use an unbiased cross-entropy estimate instead, with no ghost bucket.

The full-vocab work is one pass that yields only the log-probs of the ids it is asked
for (``stored_log_probs``), with a hand-written backward that reuses its single float32
[N, V] buffer: the [N, V] log-softmax and autograd's chain of [N, V] temporaries are where
a sparse-KD step loses time and memory against plain cross-entropy (docs/design.md).
Every loss here needs only log q at the stored ids (the ghost bucket's log mass follows
from them), so all of them cost that one pass plus element-wise work on [N, k+1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from raydistill.errors import ConfigError
from raydistill.stages.train.divergences import KINDS, bucket_divergence, check_divergence_args, taid_lambda

__all__ = [
    "KINDS",
    "LossOutput",
    "dense_distillation_loss",
    "distillation_loss",
    "next_token_cross_entropy",
    "sampled_cross_entropy",
    "sampled_distillation_loss",
    "sparse_divergence",
    "sparse_forward_kl",
    "stored_log_probs",
    "taid_lambda",
]

# The student's ghost-bucket mass is 1 minus a float32 sum near 1, resolved to ~1e-7; floor it
# a little above that so its log-prob is never -inf/NaN nor dominated by rounding noise.
_MIN_GHOST_MASS = 1e-6
_MAX_IN_LOGPROB = math.log1p(-_MIN_GHOST_MASS)  # cap on log(sum of q over the stored ids)
_PAD_LOGQ = -1.0e4  # student log-prob given to padding entries: exp() is exactly 0 in float32


class _StoredLogProbs(torch.autograd.Function):
    """log softmax(z[:, :vocab] / T)[ids] with one float32 [N, vocab] buffer, forward and backward."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, ids: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
        zv = z[:, :vocab]
        # Shift by the row max: exp() cannot overflow, and log Σ exp stays small (~0 for a
        # confident row), so log-probs near 0 -- and the ghost mass, 1 minus their sum -- keep
        # float32 precision instead of the float spacing at the logits' magnitude (1e-3 at 1e4).
        m = zv.amax(dim=-1, keepdim=True).to(torch.float32)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        buf = torch.sub(zv, m)  # float32 by type promotion: the upcast and the shift in one pass
        if temperature != 1.0:
            buf.div_(temperature)
        picked = buf.gather(1, ids)
        buf.exp_()  # the buffer now holds unnormalized probabilities, kept for backward
        total = buf.sum(dim=-1, keepdim=True)
        ctx.save_for_backward(buf, total, ids)
        ctx.meta = (z.shape, z.dtype, vocab, temperature)
        ctx.spent = False
        return picked - total.log()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if ctx.spent:
            raise RuntimeError("stored_log_probs reuses its buffer in backward; it cannot run backward twice")
        ctx.spent = True
        buf, total, ids = ctx.saved_tensors
        shape, dtype, vocab, temperature = ctx.meta
        grad_out = grad_out.to(torch.float32)
        # d/dz_j of log q_i = ([i == j] - q_j) / T, so grad_z = (scatter(g) - q · Σg) / T.
        buf.mul_(grad_out.sum(dim=-1, keepdim=True).div_(total).mul_(-1.0 / temperature))
        buf.scatter_add_(1, ids, grad_out / temperature)
        if buf.shape == shape:
            return buf.to(dtype), None, None, None  # no copy for float32 logits
        grad = torch.zeros(shape, dtype=dtype, device=buf.device)  # padded columns get no gradient
        grad[:, :vocab] = buf
        return grad, None, None, None


def stored_log_probs(
    student_logits: torch.Tensor, ids: torch.Tensor, *, temperature: float, vocab: int
) -> torch.Tensor:
    """log softmax(student_logits[:, :vocab] / T) at ``ids`` [N, m], as float32 [N, m].

    Differentiable (once) with respect to the logits; the only [N, V] tensors it creates
    are one float32 buffer and, for bf16 or padded logits, the gradient it returns.
    """
    return _StoredLogProbs.apply(student_logits, ids.long(), vocab, float(temperature))


def _vocab(student_logits: torch.Tensor, vocab_size: int | None) -> int:
    padded = student_logits.shape[-1]
    if vocab_size is None:
        return padded
    if not 1 <= vocab_size <= padded:
        raise ConfigError(
            f"vocab_size={vocab_size} does not fit the student's logits ({padded} columns); "
            "the student's vocabulary must cover the teacher's"
        )
    return int(vocab_size)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0 (use the temperature recorded at capture)")


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate on both sides of a = -log 2 (Maechler, 2012)."""
    near_zero = a > -math.log(2.0)
    # Each branch is evaluated on a safe argument so neither forward nor backward sees NaN/inf.
    a_near = torch.where(near_zero, a, torch.full_like(a, -math.log(2.0)))
    a_far = torch.where(near_zero, torch.full_like(a, -math.log(2.0)), a)
    return torch.where(near_zero, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def _ghost_logprob(logq_ids: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ q[ids]) [N]: the student's log-prob of everything it was not asked about."""
    logq_in = torch.logsumexp(logq_ids, dim=-1)
    # When the student puts ~all its mass on the stored ids, log(sum) rounds to >= 0 and the
    # ghost log-prob would be -inf/NaN. Cap the value, but let the gradient through as if at
    # the cap (straight-through): a student collapsed onto the top-k is still pushed back
    # toward the teacher's tail, with a bounded gradient, instead of getting none.
    overshoot = (logq_in - _MAX_IN_LOGPROB).clamp(min=0.0).detach()
    return _log1mexp(logq_in - overshoot)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` [N] over ``mask`` (all if None); 0, not NaN, when nothing is masked in."""
    if mask is None:
        return values.sum() / max(values.shape[0], 1)
    keep = mask.reshape(-1).to(torch.bool)
    if keep.shape[0] != values.shape[0]:
        raise ValueError(f"mask has {keep.shape[0]} positions, student logits have {values.shape[0]}")
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp(min=1)


def _flatten_targets(
    student_logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., V] logits and [..., k] targets as [N, V], [N, k], [N, k], [N], shapes checked."""
    k = ids.shape[-1]
    logits2d = student_logits.reshape(-1, student_logits.shape[-1])
    ids2d, probs2d, tail1d = ids.reshape(-1, k), probs.reshape(-1, k), tail.reshape(-1)
    n = logits2d.shape[0]
    if ids2d.shape[0] != n or probs2d.shape != ids2d.shape or tail1d.shape[0] != n:
        raise ValueError(
            f"target shapes do not match {n} student positions: ids {tuple(ids.shape)}, "
            f"probs {tuple(probs.shape)}, tail {tuple(tail.shape)}"
        )
    return logits2d, ids2d, probs2d, tail1d


def _split_padding(ids2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids safe to gather, mask of real entries or None): adaptive and sampled targets pad with -1."""
    ids2d = ids2d.long()
    valid = ids2d >= 0  # no host sync: a data-dependent branch would stall a GPU step
    return ids2d.clamp(min=0), valid


def _bucket_divergence_per_position(
    logq_ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    kind: str,
    skew: float,
    interpolate: float | None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """D(p̃, q̃) [N] over the k stored ids plus the ghost bucket.

    Padding entries (``valid`` False, probability 0) are made empty buckets for both sides:
    the student's log-prob there is set to ``_PAD_LOGQ``, whose exp is exactly 0, so they add
    nothing to any divergence, to the ghost bucket's mass, or to the gradient.
    """
    if valid is not None:
        logq_ids = torch.where(valid, logq_ids, torch.full_like(logq_ids, _PAD_LOGQ))
    log_q = torch.cat([logq_ids, _ghost_logprob(logq_ids).unsqueeze(-1)], dim=-1)
    p = torch.cat([probs.to(torch.float32), tail.to(torch.float32).unsqueeze(-1)], dim=-1)
    return bucket_divergence(log_q, p, kind=kind, skew=skew, interpolate=interpolate)


def _prior_tail_kl_per_position(
    logq_ids: torch.Tensor,
    student2d: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    valid: torch.Tensor,
    prior: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """KL(p̂ ‖ q) [N] over the whole vocabulary, p̂ = the stored ids plus the tail spread over every
    unstored id in proportion to ``prior`` (the set's tail model): what ``sparse_to_dense`` reads.

    Needs no [N, V] target: with w = prior (Σ w = 1) and Z = 1 − Σ_stored w, the unstored part is
    Σ_unstored w_v log q_v = (Σ_v w_v log q_v − Σ_stored w_i log q_i) / Z, and Σ_v w_v log q_v =
    (w · s) / T − logsumexp(s / T): one matrix-vector product. The log-sum-exp is read off any
    stored id (log q_i = s_i / T − lse), column 0 here, which is a real entry in every row.
    """
    p = probs.to(torch.float32)
    t = tail.to(torch.float32)
    w = prior.to(device=student2d.device, dtype=torch.float32)
    w_ids = torch.where(valid, w[ids], 0.0)
    logq = torch.where(valid, logq_ids, 0.0)
    lse = student2d[:, : w.shape[0]].gather(1, ids[:, :1]).squeeze(1).float() / temperature - logq_ids[:, 0]
    all_w_logq = torch.mv(student2d[:, : w.shape[0]].float(), w) / temperature - lse
    z = (1.0 - w_ids.sum(dim=-1)).clamp_min(1e-12)
    unstored_w_logq = (all_w_logq - (w_ids * logq).sum(dim=-1)) / z
    w_log_w = torch.where(w > 0, w * w.clamp_min(1e-38).log(), 0.0)
    unstored_entropy_part = (w_log_w.sum() - torch.where(valid, w_log_w[ids], 0.0).sum(dim=-1)) / z - z.log()
    stored = torch.where(valid & (p > 0), p * (p.clamp_min(1e-38).log() - logq), 0.0).sum(dim=-1)
    spread = t * (t.clamp_min(1e-38).log() + unstored_entropy_part - unstored_w_logq)
    return stored + torch.where(t > 0, spread, 0.0)


def _sampled_cross_entropy_per_position(
    logq_ids: torch.Tensor, counts: torch.Tensor, n_draws: torch.Tensor
) -> torch.Tensor:
    """−Σ_i (c_i / n) · log q_i [N]: an unbiased estimate of H(p, q) when c counts n draws from p."""
    weights = counts.to(torch.float32) / n_draws.unsqueeze(-1)
    return -(weights * logq_ids).sum(dim=-1)


def sparse_divergence(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    skew: float = 0.1,
    interpolate: float | None = None,
) -> torch.Tensor:
    """T² · mean over masked positions of D(p̃, q̃) over the k stored ids + the ghost bucket.

    student_logits [N, V_padded] (columns past ``vocab_size`` are ignored); ids/probs [N, k];
    tail [N]; mask [N] bool marks positions that have a target (None = all). Leading
    dimensions beyond N (e.g. [B, S, ...]) are flattened. q = softmax(logits / T) over the
    true vocabulary; p̃ = (probs, tail) and q̃ = (q[ids], 1 − Σ q[ids]). ``kind``, ``skew``
    and ``interpolate`` (the TAID weight of the teacher) are those of
    ``raydistill.stages.train.divergences.bucket_divergence``. A batch with no masked-in position gives 0,
    not NaN. The T² factor keeps gradient magnitudes comparable across temperatures (Hinton
    et al., 2015) and is applied to every kind so their values share one scale.
    """
    check_divergence_args(kind, skew, interpolate)
    _check_temperature(temperature)
    vocab = _vocab(student_logits, vocab_size)
    logits2d, ids2d, probs2d, tail1d = _flatten_targets(student_logits, ids, probs, tail)
    ids2d, valid = _split_padding(ids2d)
    logq_ids = stored_log_probs(logits2d, ids2d, temperature=temperature, vocab=vocab)
    per_position = _bucket_divergence_per_position(logq_ids, probs2d, tail1d, kind, skew, interpolate, valid)
    return _masked_mean(per_position, mask) * temperature**2


def sparse_forward_kl(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    interpolate: float | None = None,
) -> torch.Tensor:
    """T² · mean over masked positions of KL(p̃ ‖ q̃): ``sparse_divergence`` with kind forward_kl."""
    return sparse_divergence(
        student_logits, ids, probs, tail, kind="forward_kl", temperature=temperature, mask=mask,
        vocab_size=vocab_size, interpolate=interpolate,
    )


def _flatten_sampled(
    student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, n_draws: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, V] logits, [N, m] ids (padding pointed at id 0), [N, m] counts, [N] float32 draw counts."""
    m = ids.shape[-1]
    logits2d = student_logits.reshape(-1, student_logits.shape[-1])
    ids2d, counts2d = ids.reshape(-1, m).long(), counts.reshape(-1, m)
    n = logits2d.shape[0]
    if ids2d.shape[0] != n or counts2d.shape != ids2d.shape:
        raise ValueError(
            f"sampled target shapes do not match {n} student positions: ids {tuple(ids.shape)}, "
            f"counts {tuple(counts.shape)}"
        )
    # Padding (count 0) may carry any id, -1 included; point it at a valid one: its weight is 0.
    ids2d = torch.where(counts2d > 0, ids2d, torch.zeros_like(ids2d))
    if isinstance(n_draws, torch.Tensor):
        draws = n_draws.reshape(-1).to(device=logits2d.device, dtype=torch.float32)
        if draws.shape[0] != n:
            raise ValueError(f"n_draws has {draws.shape[0]} positions, student logits have {n}")
        draws = draws.clamp(min=1.0)  # positions without a target may say 0 draws
    else:
        if not n_draws >= 1:
            raise ValueError(f"n_draws={n_draws} must be >= 1 (draws per position at capture)")
        draws = torch.full((n,), float(n_draws), device=logits2d.device)
    return logits2d, ids2d, counts2d, draws


def sampled_cross_entropy(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    n_draws: int | torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """T² · mean over masked positions of −Σ_i (c_i / n) · log q_i, for sampled targets.

    ids/counts [N, m]: the distinct ids among n = ``n_draws`` (an int, or [N]) draws from the
    teacher at temperature T, and how often each was drawn (count 0 = padding, any id). Since
    E[c_i / n] = p_i, its expectation over draws is exactly the cross-entropy H(p, q) over the
    whole vocabulary (Sparse Logit Sampling / RS-KD), with the same gradient in expectation as
    forward KL: the two differ by the teacher's entropy, a constant. So no ghost bucket: the
    draws already speak for the tail.
    """
    _check_temperature(temperature)
    vocab = _vocab(student_logits, vocab_size)
    logits2d, ids2d, counts2d, draws = _flatten_sampled(student_logits, ids, counts, n_draws)
    logq_ids = stored_log_probs(logits2d, ids2d, temperature=temperature, vocab=vocab)
    per_position = _sampled_cross_entropy_per_position(logq_ids, counts2d, draws)
    return _masked_mean(per_position, mask) * temperature**2


def next_token_cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of already-shifted next-token ``labels`` [N] (0 if all are ignored).

    labels[t] is the token that follows position t; ``ignore_index`` marks positions without
    one (document ends, padding). Computed in float32 over the true vocabulary.
    """
    vocab = _vocab(student_logits, vocab_size)
    logits2d = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab].float()
    flat = labels.reshape(-1)
    if flat.shape[0] != logits2d.shape[0]:
        raise ValueError(f"labels have {flat.shape[0]} positions, student logits have {logits2d.shape[0]}")
    total = F.cross_entropy(logits2d, flat.long(), ignore_index=ignore_index, reduction="sum")
    count = (flat != ignore_index).sum().clamp(min=1)
    return total / count


@dataclass
class LossOutput:
    """The training loss and its parts (parts that alpha switched off are a constant 0)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def _mix_with_ce(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    ids2d: torch.Tensor,
    target_mask: torch.Tensor,
    kd_per_position: Callable[[torch.Tensor], torch.Tensor],
    *,
    alpha: float,
    temperature: float,
    vocab: int,
) -> LossOutput:
    """alpha · KD + (1 − alpha) · CE, where KD is T² · masked mean of kd_per_position(log q[ids]).

    A part with weight 0 is not computed at all. At T = 1 KD and CE share one softmax, so the
    CE label is one more id to gather in the same full-vocab pass; otherwise the label's
    log-prob comes from a second pass at T = 1.
    """
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if alpha == 0.0:
        ce = next_token_cross_entropy(student_logits, labels, vocab_size=vocab)
        return LossOutput(loss=ce, kd=zero, ce=ce)
    logits2d = student_logits.reshape(-1, student_logits.shape[-1])
    if alpha == 1.0:
        logq_ids = stored_log_probs(logits2d, ids2d, temperature=temperature, vocab=vocab)
        kd = _masked_mean(kd_per_position(logq_ids), target_mask) * temperature**2
        return LossOutput(loss=kd, kd=kd, ce=zero)
    flat = labels.reshape(-1).long()
    if flat.shape[0] != logits2d.shape[0]:
        raise ValueError(f"labels have {flat.shape[0]} positions, student logits have {logits2d.shape[0]}")
    has_label = flat != -100
    label_ids = torch.where(has_label, flat, torch.zeros_like(flat)).unsqueeze(1)
    if temperature == 1.0:
        logq = stored_log_probs(logits2d, torch.cat([ids2d, label_ids], dim=1), temperature=1.0, vocab=vocab)
        logq_ids, logq_label = logq[:, :-1], logq[:, -1]
    else:
        logq_ids = stored_log_probs(logits2d, ids2d, temperature=temperature, vocab=vocab)
        logq_label = stored_log_probs(logits2d, label_ids, temperature=1.0, vocab=vocab)[:, 0]
    kd = _masked_mean(kd_per_position(logq_ids), target_mask) * temperature**2
    ce = _masked_mean(-logq_label, has_label)
    return LossOutput(loss=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} must be in [0, 1] (loss = alpha*KD + (1-alpha)*CE)")


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    kind: str = "forward_kl",
    skew: float = 0.1,
    taid_lambda: float | None = None,
    tail_prior: torch.Tensor | None = None,
) -> LossOutput:
    """loss = alpha · KD + (1 − alpha) · CE for stored targets, skipping whichever part has weight 0.

    ids [N, k] may pad with -1 (probability 0): adaptive and sampled shard sets store fewer
    than k ids for some tokens.

    KD is ``sparse_divergence`` of ``kind`` (one of ``KINDS``) with ``skew`` for the skew KLs
    and, when ``taid_lambda`` is given, the TAID target (see ``taid_lambda()``) in place of the
    teacher. alpha = 0 is the CE-only baseline (no KD cost at all); alpha = 1 is pure
    distillation. labels use -100 for "no CE target"; target_mask marks positions with a KD target.

    ``tail_prior`` [vocab_size] (forward KL only): instead of one ghost bucket, the tail is spread
    over the unstored ids by these weights (the shard set's tail model), and KD is the forward KL
    over the whole vocabulary against that reading of the target (``_prior_tail_kl_per_position``).
    """
    _check_alpha(alpha)
    _check_temperature(temperature)
    check_divergence_args(kind, skew, taid_lambda)
    vocab = _vocab(student_logits, vocab_size)
    logits2d, ids2d, probs2d, tail1d = _flatten_targets(student_logits, ids, probs, tail)
    ids2d, valid = _split_padding(ids2d)
    if tail_prior is not None:
        if kind != "forward_kl" or taid_lambda is not None:
            raise ConfigError(f"a tail prior works with forward_kl without TAID, not kind '{kind}'"
                              f"{' with TAID' if taid_lambda is not None else ''}")
        if tail_prior.shape != (vocab,):
            raise ValueError(f"tail_prior has shape {tuple(tail_prior.shape)}, expected ({vocab},)")
        prior = tail_prior / tail_prior.sum()

        def kd_per_position(logq_ids: torch.Tensor) -> torch.Tensor:
            return _prior_tail_kl_per_position(logq_ids, logits2d, ids2d, probs2d, tail1d, valid, prior, temperature)
    else:
        def kd_per_position(logq_ids: torch.Tensor) -> torch.Tensor:
            return _bucket_divergence_per_position(logq_ids, probs2d, tail1d, kind, skew, taid_lambda, valid)

    return _mix_with_ce(
        student_logits, labels, ids2d, target_mask, kd_per_position,
        alpha=alpha, temperature=temperature, vocab=vocab,
    )


def sampled_distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    n_draws: int | torch.Tensor,
    target_mask: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> LossOutput:
    """loss = alpha · KD + (1 − alpha) · CE for sampled targets (KD = ``sampled_cross_entropy``).

    The KD part estimates the cross-entropy H(p, q), not KL(p ‖ q): it is larger by the
    teacher's entropy, a constant with no gradient, so its values are not comparable with
    ``distillation_loss``'s KD but its optimum and expected gradient are the same.
    """
    _check_alpha(alpha)
    _check_temperature(temperature)
    vocab = _vocab(student_logits, vocab_size)
    _, ids2d, counts2d, draws = _flatten_sampled(student_logits, ids, counts, n_draws)

    def kd_per_position(logq_ids: torch.Tensor) -> torch.Tensor:
        return _sampled_cross_entropy_per_position(logq_ids, counts2d, draws)

    return _mix_with_ce(
        student_logits, labels, ids2d, target_mask, kd_per_position,
        alpha=alpha, temperature=temperature, vocab=vocab,
    )


def dense_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> LossOutput:
    """loss = alpha · KD + (1 − alpha) · CE with the teacher's *full* distribution: online KD.

    The baseline that sparse targets approximate: the teacher runs in the training loop and
    KD = T² · masked mean of KL(softmax(t / T) ‖ softmax(s / T)) over the whole vocabulary.
    With every id stored (k = V, no tail) ``distillation_loss`` gives the same value.
    """
    _check_alpha(alpha)
    _check_temperature(temperature)
    vocab = _vocab(student_logits, vocab_size)
    s2d = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab].float()
    t2d = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :vocab].float().detach()
    if t2d.shape != s2d.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not cover the student's "
                         f"{tuple(s2d.shape)} (vocabulary {vocab}); online KD needs the teacher's tokenizer")
    zero = s2d.new_zeros(())
    ce = next_token_cross_entropy(s2d, labels, vocab_size=vocab) if alpha < 1.0 else zero
    if alpha == 0.0:
        return LossOutput(loss=ce, kd=zero, ce=ce)
    logp = F.log_softmax(t2d / temperature, dim=-1)
    logq = F.log_softmax(s2d / temperature, dim=-1)
    per_position = (logp.exp() * (logp - logq)).sum(dim=-1)
    kd = _masked_mean(per_position, target_mask.reshape(-1)) * temperature**2
    return LossOutput(loss=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce)
