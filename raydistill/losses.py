"""Sparse knowledge-distillation losses: pure functions of student logits and stored targets.

A stored target (see ``raydistill.sparsify``) is the teacher's top-k ids, their
probabilities ``probs`` and the leftover ``tail`` mass, all at the capture temperature T.
The KD loss compares teacher and student over k+1 buckets -- the k stored ids plus one
"ghost" bucket holding everything else -- so both sides are proper distributions with
exact total mass, and the student is taught how much mass belongs outside the top-k
without the loss pretending to know how the teacher spread it.

The full-vocab work is one pass that yields only the log-probs of the ids it is asked
for (``stored_log_probs``), with a hand-written backward that reuses its single float32
[N, V] buffer: the [N, V] log-softmax and autograd's chain of [N, V] temporaries are where
a sparse-KD step loses time and memory against plain cross-entropy (docs/design.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from raydistill.errors import ConfigError

__all__ = [
    "LossOutput",
    "distillation_loss",
    "next_token_cross_entropy",
    "sparse_forward_kl",
    "stored_log_probs",
]

# The student's ghost-bucket mass is 1 minus a float32 sum near 1, resolved to ~1e-7; floor it
# a little above that so its log-prob is never -inf/NaN nor dominated by rounding noise.
_MIN_GHOST_MASS = 1e-6
_MAX_IN_LOGPROB = math.log1p(-_MIN_GHOST_MASS)  # cap on log(sum of q over the stored ids)


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


def _forward_kl_per_position(logq_ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """KL(p̃ ‖ q̃) [N] over the k stored ids plus the ghost bucket."""
    p = probs.to(torch.float32)
    p_tail = tail.to(torch.float32)
    logq_tail = _ghost_logprob(logq_ids)
    # xlogy(0, 0) = 0 and 0 * finite = 0: empty buckets add nothing (no 0·log 0 NaN).
    stored = (torch.xlogy(p, p) - p * logq_ids).sum(dim=-1)
    return stored + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail


def sparse_forward_kl(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """T² · mean over masked positions of KL(p̃ ‖ q̃) over the k stored ids + the ghost bucket.

    student_logits [N, V_padded] (columns past ``vocab_size`` are ignored); ids/probs [N, k];
    tail [N]; mask [N] bool marks positions that have a target (None = all). Leading
    dimensions beyond N (e.g. [B, S, ...]) are flattened. q = softmax(logits / T) over the
    true vocabulary; p̃ = (probs, tail) and q̃ = (q[ids], 1 - Σ q[ids]). Terms with zero teacher
    mass contribute 0, and a batch with no masked-in position gives 0, not NaN. The T² factor
    keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    _check_temperature(temperature)
    vocab = _vocab(student_logits, vocab_size)
    logits2d, ids2d, probs2d, tail1d = _flatten_targets(student_logits, ids, probs, tail)
    logq_ids = stored_log_probs(logits2d, ids2d, temperature=temperature, vocab=vocab)
    per_position = _forward_kl_per_position(logq_ids, probs2d, tail1d)
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


def _mixed_kd_and_ce(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    tail: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parts from gathered log-probs: the CE label is one more id to gather.

    At T = 1 KD and CE share one softmax, so one full-vocab pass serves both; otherwise
    the label's log-prob comes from a second pass at T = 1.
    """
    logits2d, ids2d, probs2d, tail1d = _flatten_targets(student_logits, ids, probs, tail)
    flat = labels.reshape(-1).long()
    if flat.shape[0] != logits2d.shape[0]:
        raise ValueError(f"labels have {flat.shape[0]} positions, student logits have {logits2d.shape[0]}")
    has_label = flat != -100
    label_ids = torch.where(has_label, flat, torch.zeros_like(flat)).unsqueeze(1)
    if temperature == 1.0:
        logq = stored_log_probs(
            logits2d, torch.cat([ids2d.long(), label_ids], dim=1), temperature=1.0, vocab=vocab
        )
        logq_ids, logq_label = logq[:, :-1], logq[:, -1]
    else:
        logq_ids = stored_log_probs(logits2d, ids2d, temperature=temperature, vocab=vocab)
        logq_label = stored_log_probs(logits2d, label_ids, temperature=1.0, vocab=vocab)[:, 0]
    kd = _masked_mean(_forward_kl_per_position(logq_ids, probs2d, tail1d), target_mask) * temperature**2
    ce = _masked_mean(-logq_label, has_label)
    return kd, ce


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
) -> LossOutput:
    """loss = alpha · KD + (1 - alpha) · CE, skipping whichever part has weight 0.

    alpha = 0 is the CE-only baseline (no KD cost at all); alpha = 1 is pure distillation.
    labels use -100 for "no CE target"; target_mask marks positions with a KD target.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} must be in [0, 1] (loss = alpha*KD + (1-alpha)*CE)")
    _check_temperature(temperature)
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if alpha == 0.0:
        ce = next_token_cross_entropy(student_logits, labels, vocab_size=vocab_size)
        return LossOutput(loss=ce, kd=zero, ce=ce)
    if alpha == 1.0:
        kd = sparse_forward_kl(
            student_logits, ids, probs, tail, temperature=temperature, mask=target_mask, vocab_size=vocab_size
        )
        return LossOutput(loss=kd, kd=kd, ce=zero)
    vocab = _vocab(student_logits, vocab_size)
    kd, ce = _mixed_kd_and_ce(student_logits, labels, ids, probs, tail, target_mask, temperature, vocab)
    return LossOutput(loss=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce)
