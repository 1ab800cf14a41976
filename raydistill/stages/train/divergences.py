"""Divergences between teacher and student over the same few buckets, and the TAID schedule.

A stored target describes the teacher over k + 1 buckets: the k stored ids plus one "ghost"
bucket holding the rest of the vocabulary (see ``raydistill.stages.train.losses``). Once the student's
log-probabilities over those buckets are known -- one full-vocabulary pass, done elsewhere --
every divergence of the family is an element-wise function of two [N, k+1] tensors, so the
choice of divergence costs nothing measurable in a training step.

Inputs are the teacher's bucket probabilities ``p`` (a constant) and the student's bucket
log-probabilities ``log_q`` (differentiable). The student is handled in log space throughout:
its probabilities at stored ids can underflow to 0 in float32, its log-probabilities cannot.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from raydistill.errors import ConfigError

__all__ = [
    "KINDS",
    "MIN_TARGET_PROB",
    "bucket_divergence",
    "check_divergence_args",
    "interpolate_target",
    "taid_lambda",
]

KINDS = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tvd", "jsd")

# KL(q ‖ p) is infinite wherever the teacher bucket is empty and the student's is not (an empty
# tail when k covers the vocabulary, a probability quantized to 0 in a shard). Reverse KL reads
# log p through this floor, so such a bucket costs the student at most q · log(q / 1e-8) and
# its gradient stays finite; every other divergence here is finite at p = 0 as it stands.
MIN_TARGET_PROB = 1e-8


def check_divergence_args(kind: str, skew: float, interpolate: float | None) -> None:
    """One ConfigError line for a kind, skew or interpolation weight the family does not have."""
    if kind not in KINDS:
        raise ConfigError(f"unknown loss kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    if not 0.0 < skew < 1.0:
        raise ConfigError(f"skew={skew} must be in (0, 1) (the student/teacher mix of skew KL, e.g. 0.1)")
    if interpolate is not None and not 0.0 <= interpolate <= 1.0:
        raise ConfigError(f"TAID interpolation weight {interpolate} must be in [0, 1] (1 = the teacher)")


def interpolate_target(p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """TAID target (1 − w) · stopgrad(q) + w · p over the buckets.

    The student half is detached: the target moves with the student but is never itself
    optimized, so at w = 0 the loss is exactly 0 with no gradient, and at w = 1 it is p.
    """
    if weight == 1.0:
        return p
    return (1.0 - weight) * log_q.detach().exp() + weight * p


def _forward_kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor, skew: float) -> torch.Tensor:
    # xlogy(0, 0) = 0 and 0 · finite = 0: empty teacher buckets add nothing.
    return (torch.xlogy(p, p) - p * log_q).sum(dim=-1)


def _reverse_kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor, skew: float) -> torch.Tensor:
    log_p_floored = torch.log(p.clamp(min=MIN_TARGET_PROB))
    return (log_q.exp() * (log_q - log_p_floored)).sum(dim=-1)


def _skew_forward_kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor, skew: float) -> torch.Tensor:
    # log(λp + (1−λ)q) in log space: finite even where p = 0 and q underflows.
    log_m = torch.logaddexp(log_p + math.log(skew), log_q + math.log1p(-skew))
    return (torch.xlogy(p, p) - p * log_m).sum(dim=-1)


def _skew_reverse_kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor, skew: float) -> torch.Tensor:
    # The mixture holds λq, so log q − log m <= −log λ: bounded even where p = 0.
    log_m = torch.logaddexp(log_q + math.log(skew), log_p + math.log1p(-skew))
    return (log_q.exp() * (log_q - log_m)).sum(dim=-1)


def _tvd(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor, skew: float) -> torch.Tensor:
    return 0.5 * (p - log_q.exp()).abs().sum(dim=-1)


def _jsd(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor, skew: float) -> torch.Tensor:
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    to_teacher = torch.xlogy(p, p) - p * log_m
    to_student = log_q.exp() * (log_q - log_m)
    return 0.5 * (to_teacher + to_student).sum(dim=-1)


_DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
    "jsd": _jsd,
}


def bucket_divergence(
    log_q: torch.Tensor,
    p: torch.Tensor,
    *,
    kind: str = "forward_kl",
    skew: float = 0.1,
    interpolate: float | None = None,
) -> torch.Tensor:
    """D(p̃, q̃) per row [N] for student log-probs ``log_q`` [N, B] and teacher probs ``p`` [N, B].

    kind: forward_kl KL(p‖q); reverse_kl KL(q‖p); skew_forward_kl KL(p ‖ λp + (1−λ)q) and
    skew_reverse_kl KL(q ‖ λq + (1−λ)p) with λ = ``skew`` (DistiLLM); tvd ½Σ|p − q|; jsd
    ½KL(p‖m) + ½KL(q‖m) with m = ½(p + q). ``interpolate`` = w replaces p by the TAID target
    (1 − w)·stopgrad(q) + w·p first. Rows must be distributions (each sums to 1).
    """
    check_divergence_args(kind, skew, interpolate)
    # At least float32 (bf16/fp16 targets are upcast); float64 stays float64 for references.
    dtype = torch.promote_types(torch.promote_types(p.dtype, log_q.dtype), torch.float32)
    p, log_q = p.to(dtype), log_q.to(dtype)
    if interpolate is not None:
        p = interpolate_target(p, log_q, float(interpolate))
    return _DIVERGENCES[kind](p, torch.log(p), log_q, float(skew))


def taid_lambda(step: int, total_steps: int, start: float = 0.2, fraction: float = 0.5) -> float:
    """TAID weight of the teacher at optimizer step ``step`` (0-based) of ``total_steps``.

    Rises linearly from ``start`` at step 0 to 1 at ``fraction`` · total_steps, then stays 1:
    early on the target sits close to the student, so a small student is not asked to jump
    straight to a distribution far from its own (Shing et al., 2025, "TAID").
    """
    if total_steps < 1 or step < 0:
        raise ConfigError(f"TAID schedule needs total_steps >= 1 and step >= 0, got {step} of {total_steps}")
    if not 0.0 <= start <= 1.0:
        raise ConfigError(f"taid_start={start} must be in [0, 1]")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"taid_fraction={fraction} must be in [0, 1] (share of training spent ramping up)")
    ramp = fraction * total_steps
    if ramp <= 0.0:
        return 1.0
    return min(1.0, start + (1.0 - start) * step / ramp)
