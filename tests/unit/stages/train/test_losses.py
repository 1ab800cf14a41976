"""Sparse KD losses against slow float64 references written with explicit loops."""

from __future__ import annotations

import itertools
import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from raydistill.config import TrainConfig
from raydistill.errors import ConfigError
from raydistill.stages.capture.sparsify import sparse_to_dense, sparsify_topk
from raydistill.stages.train import losses
from raydistill.stages.train.divergences import MIN_TARGET_PROB, bucket_divergence
from raydistill.stages.train.losses import (
    distillation_loss,
    next_token_cross_entropy,
    sparse_forward_kl,
    stored_log_probs,
    taid_lambda,
)


def reference_kl(student_logits, ids, probs, tail, temperature=1.0, mask=None, vocab_size=None):
    """KL(p̃ ‖ q̃) over k stored ids + one ghost bucket, one position and one bucket at a time."""
    n, padded = student_logits.shape
    vocab = padded if vocab_size is None else vocab_size
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(n):
        if mask is not None and not bool(mask[i]):
            continue
        count += 1
        q = torch.softmax(student_logits[i, :vocab].double() / temperature, dim=0)
        q_in = torch.zeros((), dtype=torch.float64)
        for j in range(ids.shape[1]):
            if int(ids[i, j]) < 0:  # padding (adaptive/sampled sets store fewer than k ids)
                continue
            p_j, q_j = float(probs[i, j]), q[int(ids[i, j])]
            q_in = q_in + q_j
            if p_j > 0:
                total = total + p_j * (math.log(p_j) - torch.log(q_j))
        p_tail = float(tail[i])
        if p_tail > 0:
            total = total + p_tail * (math.log(p_tail) - torch.log(1.0 - q_in))
    if count == 0:
        return total
    return total / count * temperature**2


def random_targets(n, k, vocab, seed, tail_scale=1.0):
    """Arbitrary (not top-k) distinct ids with Dirichlet-like probabilities and a tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    w = torch.rand(n, k + 1, generator=g) + 0.05
    w[:, -1] *= tail_scale
    w = w / w.sum(-1, keepdim=True)
    return ids, w[:, :k].float(), w[:, k].float()


def student(n, padded, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, padded, generator=g) * scale).to(dtype).requires_grad_(True)


def check_against_reference(logits, ids, probs, tail, temperature, mask=None, vocab_size=None, rtol=1e-5):
    got = sparse_forward_kl(
        logits, ids, probs, tail, temperature=temperature, mask=mask, vocab_size=vocab_size
    )
    (got_grad,) = torch.autograd.grad(got, logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = reference_kl(ref_logits, ids, probs, tail, temperature, mask, vocab_size)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), ref.detach(), rtol=rtol, atol=1e-6)
    # Gradients here are O(1e-2); float32 log-sum-exp rounding leaves ~1e-6 of noise in them.
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=max(rtol, 1e-4), atol=1e-5)
    return got, got_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_stored_log_probs_matches_log_softmax(dtype: torch.dtype, temperature: float) -> None:
    """The hand-written backward against autograd through a plain float64 log_softmax + gather."""
    vocab, padded = 45, 52
    logits = student(9, padded, 30, dtype=dtype)
    g = torch.Generator().manual_seed(31)
    ids = torch.randint(0, vocab, (9, 6), generator=g)
    ids[:, 1] = ids[:, 0]  # duplicate ids: their gradients must add up
    weights = torch.randn(9, 6, generator=g)
    got = stored_log_probs(logits, ids, temperature=temperature, vocab=vocab)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = torch.log_softmax(ref_logits[:, :vocab] / temperature, dim=-1).gather(1, ids)
    (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), ref_logits)
    assert got.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)
    assert torch.equal(grad[:, vocab:], torch.zeros(9, padded - vocab, dtype=dtype))


def test_stored_log_probs_refuses_a_second_backward() -> None:
    logits = student(3, 10, 32)
    out = stored_log_probs(logits, torch.tensor([[1], [2], [3]]), temperature=1.0, vocab=10).sum()
    torch.autograd.grad(out, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        torch.autograd.grad(out, logits)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_targets_value_and_gradient(temperature: float, seed: int) -> None:
    logits = student(11, 53, seed)
    ids, probs, tail = random_targets(11, 6, 53, seed + 100)
    check_against_reference(logits, ids, probs, tail, temperature)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.0])
def test_teacher_topk_targets_with_mask_and_padded_vocab(temperature: float) -> None:
    vocab, padded, n = 40, 48, 13
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(n, padded, generator=g) * 3.0
    target = sparsify_topk(teacher, k=8, temperature=temperature, vocab_size=vocab)
    mask = torch.rand(n, generator=g) > 0.4
    mask[0] = True
    logits = student(n, padded, 8)
    _, grad = check_against_reference(
        logits, target.ids, target.probs, target.tail, temperature, mask=mask, vocab_size=vocab
    )
    assert torch.equal(grad[:, vocab:], torch.zeros(n, padded - vocab)), "padded columns get no gradient"
    assert torch.equal(grad[~mask], torch.zeros(int((~mask).sum()), padded)), "unmasked rows get no gradient"


def test_bf16_student_logits() -> None:
    logits = student(9, 64, 9, dtype=torch.bfloat16)
    ids, probs, tail = random_targets(9, 5, 64, 10)
    got = sparse_forward_kl(logits, ids, probs, tail, temperature=1.5)
    (grad,) = torch.autograd.grad(got, logits)
    assert grad.dtype == torch.bfloat16
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = reference_kl(ref_logits, ids, probs, tail, 1.5)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-4)  # bf16 gradient rounding


def test_batched_leading_dims_are_flattened() -> None:
    logits = student(12, 30, 11)
    ids, probs, tail = random_targets(12, 4, 30, 12)
    mask = torch.arange(12) % 3 != 0
    flat = sparse_forward_kl(logits, ids, probs, tail, temperature=2.0, mask=mask)
    batched = sparse_forward_kl(
        logits.reshape(3, 4, 30),
        ids.reshape(3, 4, 4),
        probs.reshape(3, 4, 4),
        tail.reshape(3, 4),
        temperature=2.0,
        mask=mask.reshape(3, 4),
    )
    torch.testing.assert_close(batched, flat)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_zero_when_bucketed_student_equals_target(temperature: float) -> None:
    """Only the bucketed distribution matters: how the student spreads its tail is free."""
    logits = student(10, 35, 13)
    q = torch.softmax(logits.detach().double() / temperature, dim=-1)
    g = torch.Generator().manual_seed(14)
    ids = torch.stack([torch.randperm(35, generator=g)[:7] for _ in range(10)])
    probs = q.gather(1, ids)
    tail = 1.0 - probs.sum(-1)
    loss = sparse_forward_kl(logits, ids, probs.float(), tail.float(), temperature=temperature)
    (grad,) = torch.autograd.grad(loss, logits)
    assert abs(float(loss.detach())) < 1e-6
    assert grad.abs().max() < 1e-6
    # A student that differs only inside the ghost bucket has the same loss.
    other = logits.detach().clone()
    outside = torch.ones(10, 35, dtype=torch.bool).scatter_(1, ids, False)
    shuffled = other[outside].reshape(10, 28).flip(-1)
    other[outside] = shuffled.reshape(-1)
    assert (
        abs(float(sparse_forward_kl(other, ids, probs.float(), tail.float(), temperature=temperature))) < 1e-6
    )
    # ... and a different bucketed student has a clearly positive loss.
    assert float(sparse_forward_kl(logits.detach() * 0.3, ids, probs.float(), tail.float())) > 1e-3


def test_tail_zero_target() -> None:
    logits = student(8, 20, 15)
    # k == vocab: the target is the whole distribution, no ghost bucket mass.
    teacher = torch.randn(8, 20)
    full = sparsify_topk(teacher, k=20)
    full_tail = torch.zeros(8)
    got, _ = check_against_reference(
        logits, full.ids, full.probs / full.probs.sum(-1, keepdim=True), full_tail, 1.0
    )
    dense_kl = F.kl_div(
        torch.log_softmax(logits.detach(), -1), torch.softmax(teacher, -1), reduction="batchmean"
    )
    torch.testing.assert_close(got.detach(), dense_kl, rtol=1e-4, atol=1e-6)
    # k < vocab but the teacher says the tail is empty (and some stored probs are 0 too).
    ids, probs, _ = random_targets(8, 5, 20, 16, tail_scale=0.0)
    probs[:, -1] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    check_against_reference(logits, ids, probs, torch.zeros(8), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_student_is_finite(dtype: torch.dtype) -> None:
    """All the student's mass on the stored ids: the ghost log-prob must not become -inf/NaN."""
    n, vocab, k = 6, 50, 4
    ids, probs, tail = random_targets(n, k, vocab, 17)
    for high in (30.0, 100.0, 1e4):
        logits = torch.zeros(n, vocab).scatter_(1, ids, high).to(dtype).requires_grad_(True)
        for temperature in (0.5, 1.0):
            loss = sparse_forward_kl(logits, ids, probs, tail, temperature=temperature)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
            # The tail's share is large (tail * -log(floor) at least): the student is far from the teacher.
            assert float(loss.detach()) / temperature**2 > float(tail.mean()) * 10
            # The gradient still pushes mass back toward the unstored ids (descent raises them), boundedly.
            outside = torch.ones(n, vocab, dtype=torch.bool).scatter_(1, ids, False)
            assert (grad.float()[outside] <= 0).all()
            assert grad.abs().max() < 10.0


def test_near_extreme_student_matches_reference() -> None:
    """Student tail mass ~1e-3: small, but resolved to float32 precision near 0."""
    ids, probs, tail = random_targets(5, 3, 30, 18)
    logits = torch.zeros(5, 30).scatter_(1, ids, 9.0).requires_grad_(True)
    check_against_reference(logits, ids, probs, tail, 1.0)


def test_large_logit_offsets_do_not_cost_precision() -> None:
    """softmax is shift-invariant; the loss must be too, even where float32 spacing is ~1e-3."""
    ids, probs, tail = random_targets(7, 5, 40, 27)
    logits = torch.zeros(7, 40).scatter_(1, ids, 10.0) + torch.randn(7, 40) * 0.1
    base = sparse_forward_kl(logits, ids, probs, tail, temperature=1.0)
    for offset in (100.0, 1e4):
        shifted = sparse_forward_kl(logits + offset, ids, probs, tail, temperature=1.0)
        torch.testing.assert_close(shifted, base, rtol=1e-4, atol=0)


def test_no_masked_positions_gives_zero() -> None:
    logits = student(5, 16, 19)
    ids, probs, tail = random_targets(5, 3, 16, 20)
    mask = torch.zeros(5, dtype=torch.bool)
    loss = sparse_forward_kl(logits, ids, probs, tail, mask=mask, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(loss.detach()) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    empty = sparse_forward_kl(torch.empty(0, 16), ids[:0], probs[:0], tail[:0])
    assert float(empty) == 0.0


def test_does_not_modify_student_logits() -> None:
    logits = torch.randn(4, 10)
    before = logits.clone()
    ids, probs, tail = random_targets(4, 2, 10, 21)
    sparse_forward_kl(logits, ids, probs, tail, temperature=3.0)
    next_token_cross_entropy(logits, torch.tensor([1, 2, -100, 3]))
    assert torch.equal(logits, before)


def test_cross_entropy_matches_torch() -> None:
    g = torch.Generator().manual_seed(22)
    logits = torch.randn(15, 40, generator=g, requires_grad=True)
    labels = torch.randint(0, 33, (15,), generator=g)
    labels[[2, 7]] = -100
    got = next_token_cross_entropy(logits, labels, vocab_size=33)
    expected = F.cross_entropy(logits[:, :33], labels, ignore_index=-100)
    torch.testing.assert_close(got, expected)
    (g1,) = torch.autograd.grad(got, logits)
    (g2,) = torch.autograd.grad(F.cross_entropy(logits[:, :33], labels), logits)
    torch.testing.assert_close(g1, g2)
    assert float(next_token_cross_entropy(logits, torch.full((15,), -100)).detach()) == 0.0
    custom = next_token_cross_entropy(
        logits, labels.masked_fill(labels == -100, -1), vocab_size=33, ignore_index=-1
    )
    torch.testing.assert_close(custom, expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # T = 1 reads KD and CE off one softmax pass
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_distillation_loss_mixes_parts(
    alpha: float, temperature: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab, padded, n = 30, 32, 10
    logits = student(n, padded, 23)
    ids, probs, tail = random_targets(n, 4, vocab, 24)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(25))
    labels[-1] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    kd = sparse_forward_kl(logits, ids, probs, tail, temperature=temperature, mask=mask, vocab_size=vocab)
    ce = next_token_cross_entropy(logits, labels, vocab_size=vocab)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a part with weight 0 must not be computed")

    if alpha == 0.0:
        monkeypatch.setattr(losses, "stored_log_probs", must_not_run)
    if alpha == 1.0:
        monkeypatch.setattr(losses, "next_token_cross_entropy", must_not_run)
    out = distillation_loss(
        logits, labels, ids, probs, tail, mask, alpha=alpha, temperature=temperature, vocab_size=vocab
    )
    torch.testing.assert_close(out.loss, alpha * kd + (1 - alpha) * ce)
    torch.testing.assert_close(out.kd, kd if alpha > 0 else torch.zeros(()))
    torch.testing.assert_close(out.ce, ce if alpha < 1 else torch.zeros(()))
    (grad,) = torch.autograd.grad(out.loss, logits, retain_graph=alpha not in (0.0, 1.0))
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if 0.0 < alpha < 1.0:
        (expected,) = torch.autograd.grad(alpha * kd + (1 - alpha) * ce, logits)
        torch.testing.assert_close(grad, expected)


def test_errors() -> None:
    logits = torch.randn(3, 10)
    ids, probs, tail = random_targets(3, 2, 10, 26)
    with pytest.raises(ConfigError, match="temperature"):
        sparse_forward_kl(logits, ids, probs, tail, temperature=0.0)
    with pytest.raises(ConfigError, match="vocab_size=11"):
        sparse_forward_kl(logits, ids, probs, tail, vocab_size=11)
    with pytest.raises(ConfigError, match="alpha"):
        distillation_loss(
            logits,
            torch.zeros(3, dtype=torch.long),
            ids,
            probs,
            tail,
            torch.ones(3, dtype=torch.bool),
            alpha=1.5,
        )
    with pytest.raises(ValueError, match="positions"):
        sparse_forward_kl(logits, ids[:2], probs[:2], tail[:2])
    with pytest.raises(ValueError, match="mask"):
        sparse_forward_kl(logits, ids, probs, tail, mask=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_with_no_targets_at_all(temperature: float) -> None:
    """A micro-batch of padding only: both parts are 0 and the gradient is 0, never NaN."""
    logits = student(6, 12, 29).detach().reshape(2, 3, 12).requires_grad_(True)  # [B, S, V]
    ids, probs, tail = random_targets(6, 3, 12, 28)
    out = distillation_loss(
        logits,
        torch.full((2, 3), -100),
        ids.reshape(2, 3, 3),
        probs.reshape(2, 3, 3),
        tail.reshape(2, 3),
        torch.zeros(2, 3, dtype=torch.bool),
        alpha=0.5,
        temperature=temperature,
    )
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert float(out.kd.detach()) == 0.0 and float(out.ce.detach()) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------------
# The divergence family over the same k + 1 buckets, against per-bucket float64 loops.

KINDS = losses.KINDS


def reference_bucket_divergence(kind, p_buckets, q_buckets, skew):
    """D(p̃, q̃) for one position, one bucket at a time; p/q are lists of float64 0-dim tensors."""
    total = torch.zeros((), dtype=torch.float64)
    for p_b, q_b in zip(p_buckets, q_buckets, strict=True):
        if kind == "forward_kl":
            if p_b > 0:
                total = total + p_b * (torch.log(p_b) - torch.log(q_b))
        elif kind == "reverse_kl":
            p_floored = max(float(p_b), MIN_TARGET_PROB)
            total = total + q_b * (torch.log(q_b) - math.log(p_floored))
        elif kind == "skew_forward_kl":
            if p_b > 0:
                total = total + p_b * (torch.log(p_b) - torch.log(skew * p_b + (1 - skew) * q_b))
        elif kind == "skew_reverse_kl":
            total = total + q_b * (torch.log(q_b) - torch.log(skew * q_b + (1 - skew) * p_b))
        elif kind == "tvd":
            total = total + 0.5 * torch.abs(p_b - q_b)
        elif kind == "jsd":
            m_b = 0.5 * (p_b + q_b)
            if p_b > 0:
                total = total + 0.5 * p_b * (torch.log(p_b) - torch.log(m_b))
            total = total + 0.5 * q_b * (torch.log(q_b) - torch.log(m_b))
        else:
            raise AssertionError(kind)
    return total


def reference_divergence(
    kind, student_logits, ids, probs, tail, temperature=1.0, mask=None, vocab_size=None, skew=0.1,
    interpolate=None,
):
    """T² · mean over masked positions of D over k stored ids + the ghost bucket, in float64 loops."""
    n, padded = student_logits.shape
    vocab = padded if vocab_size is None else vocab_size
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(n):
        if mask is not None and not bool(mask[i]):
            continue
        count += 1
        q = torch.softmax(student_logits[i, :vocab].double() / temperature, dim=0)
        q_buckets = [q[int(ids[i, j])] for j in range(ids.shape[1])]
        q_buckets.append(1.0 - sum(q_buckets))
        p_buckets = [torch.tensor(float(probs[i, j]), dtype=torch.float64) for j in range(ids.shape[1])]
        p_buckets.append(torch.tensor(float(tail[i]), dtype=torch.float64))
        if interpolate is not None:  # TAID: the student half of the target is a constant
            p_buckets = [
                (1 - interpolate) * q_b.detach() + interpolate * p_b
                for p_b, q_b in zip(p_buckets, q_buckets, strict=True)
            ]
        total = total + reference_bucket_divergence(kind, p_buckets, q_buckets, skew)
    if count == 0:
        return total
    return total / count * temperature**2


def check_divergence(kind, logits, ids, probs, tail, temperature, rtol=1e-5, **kwargs):
    got = losses.sparse_divergence(logits, ids, probs, tail, kind=kind, temperature=temperature, **kwargs)
    (got_grad,) = torch.autograd.grad(got, logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = reference_divergence(kind, ref_logits, ids, probs, tail, temperature, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), ref.detach(), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=max(rtol, 1e-4), atol=1e-5)
    return got, got_grad


@pytest.mark.parametrize("interpolate", [None, 0.3])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("kind", KINDS)
def test_divergence_value_and_gradient(kind: str, temperature: float, interpolate: float | None) -> None:
    seed = KINDS.index(kind) * 10 + int(temperature * 2)
    logits = student(11, 53, seed)
    ids, probs, tail = random_targets(11, 6, 53, seed + 100)
    got, _ = check_divergence(kind, logits, ids, probs, tail, temperature, skew=0.25, interpolate=interpolate)
    assert float(got.detach()) > 1e-3  # a random student is measurably away from the target


@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_divergence_topk_targets_with_mask_and_padded_vocab(kind: str, temperature: float) -> None:
    vocab, padded, n = 40, 48, 13
    g = torch.Generator().manual_seed(40)
    target = sparsify_topk(torch.randn(n, padded, generator=g) * 3.0, k=8, temperature=temperature, vocab_size=vocab)
    mask = torch.rand(n, generator=g) > 0.4
    mask[0] = True
    logits = student(n, padded, 41)
    _, grad = check_divergence(
        kind, logits, target.ids, target.probs, target.tail, temperature, mask=mask, vocab_size=vocab
    )
    assert torch.equal(grad[:, vocab:], torch.zeros(n, padded - vocab)), "padded columns get no gradient"
    assert torch.equal(grad[~mask], torch.zeros(int((~mask).sum()), padded)), "unmasked rows get no gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_with_empty_teacher_buckets(kind: str) -> None:
    """p = 0 in stored buckets and in the tail: finite, and equal to the definitions (reverse KL floors p)."""
    ids, probs, _ = random_targets(8, 5, 20, 42, tail_scale=0.0)
    probs[:, -1] = 0.0
    probs[::2, 0] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    logits = student(8, 20, 43)
    got, grad = check_divergence(kind, logits, ids, probs, torch.zeros(8), 1.5)
    assert torch.isfinite(got) and torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_when_the_target_is_the_whole_vocabulary(kind: str) -> None:
    """k = vocab: the ghost bucket is empty on both sides and the loss is the dense divergence."""
    logits = student(6, 16, 44)
    teacher = torch.softmax(torch.randn(6, 16, generator=torch.Generator().manual_seed(45)), dim=-1)
    ids = torch.arange(16).repeat(6, 1)
    got = losses.sparse_divergence(logits, ids, teacher, torch.zeros(6), kind=kind, temperature=1.0)
    (grad,) = torch.autograd.grad(got, logits)
    dense_logits = logits.detach().double().requires_grad_(True)
    log_q = torch.log_softmax(dense_logits, dim=-1)
    dense = bucket_divergence(log_q, teacher.double(), kind=kind).mean()
    (dense_grad,) = torch.autograd.grad(dense, dense_logits)
    # The student's ghost mass is floored at 1e-6; what that costs is below these tolerances.
    torch.testing.assert_close(got.double(), dense.detach(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(grad.double(), dense_grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_divergence_is_zero_when_bucketed_student_equals_target(kind: str, temperature: float) -> None:
    logits = student(10, 35, 46)
    q = torch.softmax(logits.detach().double() / temperature, dim=-1)
    g = torch.Generator().manual_seed(47)
    ids = torch.stack([torch.randperm(35, generator=g)[:7] for _ in range(10)])
    probs = q.gather(1, ids)
    tail = 1.0 - probs.sum(-1)
    loss = losses.sparse_divergence(logits, ids, probs.float(), tail.float(), kind=kind, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, logits)
    assert abs(float(loss.detach())) < 1e-6
    if kind != "tvd":  # |p − q| has no gradient to speak of at p = q
        assert grad.abs().max() < 1e-5
    moved = losses.sparse_divergence(
        logits.detach() * 0.3, ids, probs.float(), tail.float(), kind=kind, temperature=temperature
    )
    assert float(moved) > 1e-3


def test_divergence_inequalities_over_random_bucket_distributions() -> None:
    """Textbook relations between the family's members: any slip in a formula breaks one."""
    g = torch.Generator().manual_seed(48)
    p = torch.softmax(torch.randn(300, 9, generator=g, dtype=torch.float64) * 2, dim=-1)
    log_q = torch.log_softmax(torch.randn(300, 9, generator=g, dtype=torch.float64) * 2, dim=-1)
    lam = 0.1
    d = {kind: bucket_divergence(log_q, p, kind=kind, skew=lam).double() for kind in KINDS}
    tiny = 1e-6
    assert (d["tvd"] >= 0).all() and (d["tvd"] <= 1).all()
    assert (d["jsd"] >= 0).all() and (d["jsd"] <= math.log(2) + tiny).all()
    assert (d["forward_kl"] >= 2 * d["tvd"] ** 2 - tiny).all()  # Pinsker
    assert (d["reverse_kl"] >= 2 * d["tvd"] ** 2 - tiny).all()
    # Convexity of KL in its second argument bounds the skew KLs by (1 − λ) times the plain ones.
    assert (d["skew_forward_kl"] <= (1 - lam) * d["forward_kl"] + tiny).all()
    assert (d["skew_reverse_kl"] <= (1 - lam) * d["reverse_kl"] + tiny).all()
    assert (d["skew_forward_kl"] <= -math.log(lam) + tiny).all()
    assert (d["skew_reverse_kl"] <= -math.log(lam) + tiny).all()
    # TVD and JSD are symmetric; forward and reverse KL swap into each other.
    q, log_p = log_q.exp(), p.log()
    for kind in ("tvd", "jsd"):
        torch.testing.assert_close(bucket_divergence(log_p, q, kind=kind).double(), d[kind], rtol=1e-5, atol=1e-6)
    swapped = bucket_divergence(log_p, q, kind="forward_kl").double()
    torch.testing.assert_close(swapped, d["reverse_kl"], rtol=1e-5, atol=1e-6)
    # As λ → 0 the skew KLs become the plain ones.
    for skewed, plain in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        limit = bucket_divergence(log_q, p, kind=skewed, skew=1e-9).double()
        torch.testing.assert_close(limit, d[plain], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_with_extreme_student_is_finite(kind: str) -> None:
    """All the student's mass on the stored ids: the floored ghost keeps every kind finite and bounded."""
    n, vocab, k = 6, 50, 4
    ids, probs, tail = random_targets(n, k, vocab, 49)
    outside = torch.ones(n, vocab, dtype=torch.bool).scatter_(1, ids, False)
    for high in (30.0, 1e4):
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.zeros(n, vocab).scatter_(1, ids, high).to(dtype).requires_grad_(True)
            loss = losses.sparse_divergence(logits, ids, probs, tail, kind=kind, temperature=0.5)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
            assert float(loss.detach()) > 1e-2
            assert (grad.float()[outside] <= 0).all(), "descent must move mass back to the unstored ids"
            assert grad.abs().max() < 50.0


# ---------------------------------------------------------------------------------------------
# TAID: the target moves from the student towards the teacher.


def test_taid_lambda_schedule() -> None:
    assert taid_lambda(0, 100, 0.2, 0.5) == pytest.approx(0.2)
    assert taid_lambda(25, 100, 0.2, 0.5) == pytest.approx(0.6)
    assert taid_lambda(50, 100, 0.2, 0.5) == pytest.approx(1.0)
    assert taid_lambda(99, 100, 0.2, 0.5) == 1.0
    assert taid_lambda(0, 100, 0.2, 0.0) == 1.0  # no ramp: the teacher from the start
    assert taid_lambda(10, 100, 1.0, 0.5) == 1.0
    values = [taid_lambda(s, 40, 0.1, 0.75) for s in range(40)]
    assert all(b >= a for a, b in itertools.pairwise(values)) and values[-1] == 1.0
    for bad in ((0, 0, 0.2, 0.5), (-1, 10, 0.2, 0.5), (0, 10, 1.5, 0.5), (0, 10, 0.2, -0.1)):
        with pytest.raises(ConfigError):
            taid_lambda(*bad)


@pytest.mark.parametrize("kind", KINDS)
def test_taid_endpoints(kind: str) -> None:
    """Weight 1 is the plain loss; weight 0 targets the student itself: loss 0, no gradient."""
    logits = student(9, 30, 50)
    ids, probs, tail = random_targets(9, 5, 30, 51)
    plain = losses.sparse_divergence(logits, ids, probs, tail, kind=kind, temperature=2.0)
    full = losses.sparse_divergence(logits, ids, probs, tail, kind=kind, temperature=2.0, interpolate=1.0)
    assert torch.equal(plain, full)
    none = losses.sparse_divergence(logits, ids, probs, tail, kind=kind, temperature=2.0, interpolate=0.0)
    (grad,) = torch.autograd.grad(none, logits)
    assert abs(float(none.detach())) < 1e-6
    if kind != "tvd":
        assert grad.abs().max() < 1e-5
    halfway = losses.sparse_divergence(logits, ids, probs, tail, kind=kind, temperature=2.0, interpolate=0.5)
    assert 0 < float(halfway.detach()) < float(plain.detach())


# ---------------------------------------------------------------------------------------------
# The dispatcher train.py calls.


@pytest.mark.parametrize("taid", [None, 0.4])
@pytest.mark.parametrize("kind", KINDS)
def test_distillation_loss_dispatches_kind(kind: str, taid: float | None) -> None:
    vocab, padded, n = 30, 32, 10
    logits = student(n, padded, 52)
    ids, probs, tail = random_targets(n, 4, vocab, 53)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(54))
    labels[0] = -100
    mask = torch.arange(n) != 5
    for temperature in (1.0, 2.0):
        kd = losses.sparse_divergence(
            logits, ids, probs, tail, kind=kind, temperature=temperature, mask=mask, vocab_size=vocab,
            skew=0.2, interpolate=taid,
        )
        ce = next_token_cross_entropy(logits, labels, vocab_size=vocab)
        out = distillation_loss(
            logits, labels, ids, probs, tail, mask, alpha=0.7, temperature=temperature, vocab_size=vocab,
            kind=kind, skew=0.2, taid_lambda=taid,
        )
        torch.testing.assert_close(out.kd, kd)
        torch.testing.assert_close(out.loss, 0.7 * kd + 0.3 * ce)
        (grad,) = torch.autograd.grad(out.loss, logits)
        (expected,) = torch.autograd.grad(0.7 * kd + 0.3 * ce, logits)
        torch.testing.assert_close(grad, expected)
        pure = distillation_loss(
            logits, labels, ids, probs, tail, mask, alpha=1.0, temperature=temperature, vocab_size=vocab,
            kind=kind, skew=0.2, taid_lambda=taid,
        )
        torch.testing.assert_close(pure.loss, kd)


def test_distillation_loss_refuses_bad_settings() -> None:
    logits = torch.randn(3, 10)
    ids, probs, tail = random_targets(3, 2, 10, 55)
    args = (logits, torch.zeros(3, dtype=torch.long), ids, probs, tail, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="unknown loss kind 'kl'") as err:
        distillation_loss(*args, alpha=0.0, kind="kl")  # refused even when KD has no weight
    assert all(kind in str(err.value) for kind in KINDS)
    for skew in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match="skew"):
            distillation_loss(*args, alpha=0.5, kind="skew_forward_kl", skew=skew)
    with pytest.raises(ConfigError, match="TAID"):
        distillation_loss(*args, alpha=0.5, taid_lambda=1.5)
    with pytest.raises(ConfigError, match="unknown loss kind"):
        losses.sparse_divergence(logits, ids, probs, tail, kind="ce")


# ---------------------------------------------------------------------------------------------
# Sampled targets: ids drawn from the teacher, with counts.


def reference_sampled(student_logits, ids, counts, n_draws, temperature=1.0, mask=None, vocab_size=None):
    """T² · mean over masked positions of −Σ_i (c_i / n) · log q_i, one slot at a time."""
    n, padded = student_logits.shape
    vocab = padded if vocab_size is None else vocab_size
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(n):
        if mask is not None and not bool(mask[i]):
            continue
        count += 1
        log_q = torch.log_softmax(student_logits[i, :vocab].double() / temperature, dim=0)
        draws = n_draws if isinstance(n_draws, int) else int(n_draws[i])
        for j in range(ids.shape[1]):
            if int(counts[i, j]) > 0:
                total = total - int(counts[i, j]) / draws * log_q[int(ids[i, j])]
    if count == 0:
        return total
    return total / count * temperature**2


def draw_sampled_targets(p, n_draws, slots, generator):
    """Per row of p [R, V]: distinct drawn ids and their counts in ``slots`` columns; padding is (-1, 0)."""
    draws = torch.multinomial(p, n_draws, replacement=True, generator=generator)
    dense = torch.zeros(p.shape, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))
    counts, ids = dense.topk(slots, dim=-1)
    return torch.where(counts > 0, ids, torch.full_like(ids, -1)), counts, dense


@pytest.mark.parametrize("n_as_tensor", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_cross_entropy_value_and_gradient(temperature: float, n_as_tensor: bool) -> None:
    vocab, padded, n, draws = 37, 40, 12, 10
    g = torch.Generator().manual_seed(56)
    p = torch.softmax(torch.randn(n, vocab, generator=g) * 2 / temperature, dim=-1)
    ids, counts, _ = draw_sampled_targets(p, draws, 8, g)
    assert (counts == 0).any() and (counts.sum(-1) <= draws).all()  # padding and truncation both occur
    mask = torch.arange(n) % 4 != 1
    n_draws = torch.full((n,), draws) if n_as_tensor else draws
    logits = student(n, padded, 57)
    got = losses.sampled_cross_entropy(
        logits, ids, counts, n_draws, temperature=temperature, mask=mask, vocab_size=vocab
    )
    (grad,) = torch.autograd.grad(got, logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = reference_sampled(ref_logits, ids, counts, n_draws, temperature, mask, vocab)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(grad[:, vocab:], torch.zeros(n, padded - vocab))
    assert torch.equal(grad[~mask], torch.zeros(int((~mask).sum()), padded))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_estimator_is_unbiased(temperature: float) -> None:
    """Averaged over many seeded draws, the estimate and its gradient match the dense H(p, q)."""
    vocab, rows, n_draws = 12, 20000, 8
    g = torch.Generator().manual_seed(58)
    p = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5, dim=0)
    z = (torch.randn(1, vocab, generator=g) * 1.5).requires_grad_(True)
    ids, counts, dense_counts = draw_sampled_targets(p.expand(rows, vocab), n_draws, n_draws, g)
    estimate = losses.sampled_cross_entropy(z.expand(rows, vocab), ids, counts, n_draws, temperature=temperature)
    (grad,) = torch.autograd.grad(estimate, z)  # the mean of the per-draw gradients

    z64 = z.detach().double().requires_grad_(True)
    log_q = torch.log_softmax(z64[0] / temperature, dim=0)
    exact = -(p * log_q).sum() * temperature**2  # H(p, q) at T, scaled like every KD term
    (exact_grad,) = torch.autograd.grad(exact, z64)

    freq = dense_counts.double() / n_draws  # [rows, V]: c / n of every draw
    per_draw = -(freq * log_q.detach()).sum(-1) * temperature**2
    se = per_draw.std() / math.sqrt(rows)
    assert 4 * se < 0.02 * exact  # the check below can tell a 2 % bias from noise
    torch.testing.assert_close(estimate.double(), per_draw.mean(), rtol=1e-5, atol=0)
    assert abs(float(estimate.detach()) - float(exact.detach())) < 4 * float(se)
    # Per-draw gradient is T · (q − c/n): its noise is T · std(c/n) per column.
    grad_se = temperature * freq.std(dim=0) / math.sqrt(rows)
    assert ((grad[0].double() - exact_grad[0]).abs() < 4 * grad_se + 1e-6).all()
    assert (grad_se < 0.01 * exact_grad[0].abs().max()).all()


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_sampled_distillation_loss_mixes_parts(alpha: float, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab, n = 25, 9
    g = torch.Generator().manual_seed(59)
    ids, counts, _ = draw_sampled_targets(torch.softmax(torch.randn(n, vocab, generator=g), -1), 6, 6, g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[2] = -100
    mask = torch.arange(n) != 4
    for temperature in (1.0, 1.5):
        logits = student(n, vocab, 60)
        kd = losses.sampled_cross_entropy(logits, ids, counts, 6, temperature=temperature, mask=mask)
        ce = next_token_cross_entropy(logits, labels)
        with monkeypatch.context() as patch:
            if alpha == 0.0:
                patch.setattr(losses, "stored_log_probs", _must_not_run)
            if alpha == 1.0:
                patch.setattr(losses, "next_token_cross_entropy", _must_not_run)
            out = losses.sampled_distillation_loss(
                logits, labels, ids, counts, 6, mask, alpha=alpha, temperature=temperature
            )
        torch.testing.assert_close(out.loss, alpha * kd + (1 - alpha) * ce)
        (grad,) = torch.autograd.grad(out.loss, logits)
        (expected,) = torch.autograd.grad(alpha * kd + (1 - alpha) * ce, logits)
        torch.testing.assert_close(grad, expected)


def _must_not_run(*args, **kwargs):
    raise AssertionError("a part with weight 0 must not be computed")


def test_sampled_errors_and_empty_batches() -> None:
    logits = student(4, 10, 61)
    ids = torch.tensor([[1, 2], [3, -1], [0, -1], [5, 6]])
    counts = torch.tensor([[2, 1], [3, 0], [0, 0], [1, 2]])
    with pytest.raises(ValueError, match="n_draws"):
        losses.sampled_cross_entropy(logits, ids, counts, 0)
    with pytest.raises(ValueError, match="n_draws"):
        losses.sampled_cross_entropy(logits, ids, counts, torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match="positions"):
        losses.sampled_cross_entropy(logits, ids[:3], counts[:3], 3)
    with pytest.raises(ConfigError, match="alpha"):
        losses.sampled_distillation_loss(logits, torch.zeros(4), ids, counts, 3, None, alpha=-0.1)
    # A position whose draws were all padding (n = 0 stored for it) adds nothing and stays finite.
    loss = losses.sampled_cross_entropy(logits, ids, counts, torch.tensor([3, 3, 0, 3]), temperature=2.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.equal(grad[2], torch.zeros(10))
    empty = losses.sampled_cross_entropy(logits, ids, counts, 3, mask=torch.zeros(4, dtype=torch.bool))
    assert float(empty.detach()) == 0.0


def test_train_config_offers_exactly_the_loss_family() -> None:
    """TrainConfig.loss spells the kinds out (config.py stays free of torch); keep the two in step."""
    assert get_args(TrainConfig.model_fields["loss"].annotation) == (*KINDS, "ce")
    cfg = TrainConfig(shards="s", output="o", loss="skew_reverse_kl", taid=True)
    assert (cfg.skew, cfg.taid_start, cfg.taid_fraction) == (0.1, 0.2, 0.5)


def padded_targets(n, k, vocab, seed):
    """Targets with 1..k real ids per row, then id -1 / probability 0 padding (adaptive-mode shards)."""
    ids, probs, tail = random_targets(n, k, vocab, seed)
    g = torch.Generator().manual_seed(seed + 100)
    keep = torch.randint(1, k + 1, (n,), generator=g)
    pad = torch.arange(k)[None, :] >= keep[:, None]
    tail = tail + torch.where(pad, probs, 0.0).sum(-1)  # the dropped mass joins the ghost bucket
    return ids.masked_fill(pad, -1), probs.masked_fill(pad, 0.0), tail


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_padded_targets_match_reference(temperature: float) -> None:
    ids, probs, tail = padded_targets(12, 6, 40, seed=5)
    assert (ids == -1).any()
    check_against_reference(student(12, 40, 6), ids, probs, tail, temperature)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_padding_columns_change_nothing(kind: str) -> None:
    """Appending -1 padding columns leaves every divergence and its gradient unchanged."""
    ids, probs, tail = random_targets(10, 4, 50, seed=8)
    labels = torch.randint(0, 50, (10,))
    mask = torch.ones(10, dtype=torch.bool)
    pad_ids = torch.cat([ids, torch.full((10, 3), -1)], dim=1)
    pad_probs = torch.cat([probs, torch.zeros(10, 3)], dim=1)
    results = []
    for i, p in ((ids, probs), (pad_ids, pad_probs)):
        logits = student(10, 50, 9)
        out = distillation_loss(logits, labels, i, p, tail, mask, alpha=0.5, kind=kind)
        (grad,) = torch.autograd.grad(out.loss, logits)
        results.append((out.loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- online (dense) KD baseline


def reference_dense_kd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float):
    """Per position, slowly in float64: Σ_v p_v (log p_v − log q_v) at temperature T, times T²."""
    total, count = 0.0, 0
    for s_row, t_row, m in zip(student.double(), teacher.double(), mask.tolist(), strict=True):
        if not m:
            continue
        p = torch.softmax(t_row / temperature, -1)
        q = torch.softmax(s_row / temperature, -1)
        total += float(sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p.tolist(), q.tolist(), strict=True)
                           if pv > 0))
        count += 1
    return total / max(count, 1) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_kd_matches_reference_and_full_width_sparse_kd(temperature: float) -> None:
    torch.manual_seed(1)
    n, vocab = 12, 40
    student = torch.randn(n, vocab + 3, requires_grad=True)  # padded vocabulary columns are ignored
    teacher = torch.randn(n, vocab + 3) * 2
    labels = torch.randint(0, vocab, (n,))
    labels[-1] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    out = losses.dense_distillation_loss(student, teacher, labels, mask, alpha=0.6, temperature=temperature,
                                         vocab_size=vocab)
    assert out.kd.item() == pytest.approx(reference_dense_kd(student[:, :vocab], teacher[:, :vocab], mask,
                                                             temperature), rel=1e-5)
    ce = F.cross_entropy(student[:, :vocab], labels, ignore_index=-100)
    assert out.loss.item() == pytest.approx(0.6 * out.kd.item() + 0.4 * ce.item(), rel=1e-5)
    # the same teacher stored in full (k = V, no tail) through the sparse loss: same value and gradient
    full = sparsify_topk(teacher, k=vocab, temperature=temperature, vocab_size=vocab)
    sparse = losses.distillation_loss(student, labels, full.ids, full.probs, full.tail, mask, alpha=0.6,
                                      temperature=temperature, vocab_size=vocab)
    (g_dense,) = torch.autograd.grad(out.loss, student)
    (g_sparse,) = torch.autograd.grad(sparse.loss, student)
    assert out.loss.item() == pytest.approx(sparse.loss.item(), rel=1e-4)
    torch.testing.assert_close(g_dense, g_sparse, atol=1e-6, rtol=1e-4)
    assert g_dense[:, vocab:].abs().max() == 0


def test_dense_kd_refuses_a_teacher_of_another_vocabulary() -> None:
    with pytest.raises(ValueError, match="online KD needs the teacher's tokenizer"):
        losses.dense_distillation_loss(torch.randn(4, 10), torch.randn(4, 8), torch.zeros(4, dtype=torch.long),
                                       torch.ones(4, dtype=torch.bool), alpha=0.5)


# ---------------------------------------------------------------- the tail spread by a prior, inside the loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_prior_tail_kl_matches_the_dense_reading_of_the_target(temperature: float, alpha: float) -> None:
    """KD with a tail prior = forward KL against sparse_to_dense(…, prior): value and gradient."""
    torch.manual_seed(7)
    n, vocab, k = 10, 30, 6
    student = (torch.randn(n, vocab + 2) * 2).requires_grad_(True)  # 2 padded vocabulary columns
    teacher = sparsify_topk(torch.randn(n, vocab) * 2, k=k, temperature=temperature)
    ids, probs, tail = teacher.ids.clone(), teacher.probs.clone(), teacher.tail.clone()
    ids[2, 3:], probs[2, 3:] = -1, 0.0  # a short (adaptive/budget) row: padding after the real ids
    tail[2] = 1 - probs[2].sum()
    ids[4], probs[4], tail[4] = ids[4].roll(2), probs[4].roll(2), tail[4]  # rows need not be sorted by probability
    prior = torch.rand(vocab) + 0.1
    labels = torch.randint(0, vocab, (n,))
    mask = torch.ones(n, dtype=torch.bool)
    mask[7] = False
    out = losses.distillation_loss(student, labels, ids, probs, tail, mask, alpha=alpha, temperature=temperature,
                                   vocab_size=vocab, tail_prior=prior)
    dense = sparse_to_dense(ids, probs.double(), tail.double(), vocab, prior=prior.double())
    logq = torch.log_softmax(student[:, :vocab].double() / temperature, -1)
    kl = (dense * (dense.clamp_min(1e-300).log() - logq)).sum(-1)
    kd = kl[mask].mean() * temperature**2
    ce = F.cross_entropy(student[:, :vocab].double(), labels)
    want = alpha * kd + (1 - alpha) * ce
    assert out.kd.item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
    (g_out,) = torch.autograd.grad(out.loss, student)
    (g_ref,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(g_out.double(), g_ref.double(), atol=1e-6, rtol=1e-4)


def test_prior_tail_needs_forward_kl() -> None:
    with pytest.raises(ConfigError, match="tail prior works with forward_kl"):
        losses.distillation_loss(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                                 torch.ones(2, 1), torch.zeros(2), torch.ones(2, dtype=torch.bool), alpha=0.5,
                                 kind="reverse_kl", tail_prior=torch.ones(5))


# ---------------------------------------------------------------- hybrid targets (exact top ids + tail draws)


def hybrid_targets(logits: torch.Tensor, seed: int, *, k: int = 12, draws: int = 8, mean_ids: float = 4.0,
                   temperature: float = 1.0, through_shards: bool = False):
    """(ids, probs, tail) as training reads a hybrid capture of ``logits``: the unit's cut, then (optionally)
    the shard codec's encode and decode."""
    import numpy as np

    from raydistill.contracts.shards.codec import Codec
    from raydistill.contracts.shards.format import TargetWindow, decode_table, encode_windows
    from raydistill.contracts.shards.vocab import VocabTable
    from raydistill.stages.capture.sparsify import hybrid_cut

    rng = np.random.default_rng(seed)
    n, vocab = logits.shape
    out = sparsify_topk(logits, k=k, mode="hybrid", temperature=temperature,
                        uniforms=torch.from_numpy(rng.random((n, draws), dtype=np.float32)))
    cut = hybrid_cut(out.ids.numpy(), out.probs.numpy(), out.tail.numpy(), out.drawn.numpy(),
                     rng.random((n, draws), dtype=np.float32), mean_ids)
    if through_shards:
        codec = Codec(mode="hybrid", k=k, vocab_size=vocab, table=VocabTable.uniform(vocab), draws=draws)
        window = TargetWindow("d", 0, np.zeros(n, np.int64), cut.ids, cut.probs, cut.tail, cut.counts)
        shard = decode_table(encode_windows([window], codec), codec)
        return torch.from_numpy(shard.ids), torch.from_numpy(shard.probs), torch.from_numpy(shard.tail)
    probs = cut.probs + cut.tail[:, None] * cut.counts / draws
    tail = np.where(cut.counts.sum(1) > 0, 0.0, cut.tail)
    return (torch.from_numpy(cut.ids), torch.from_numpy(probs.astype(np.float32)),
            torch.from_numpy(tail.astype(np.float32)))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hybrid_loss_value_and_gradient_match_the_dense_kl_of_its_target(temperature: float) -> None:
    """On hybrid targets (decoded from a shard) KD is the full-vocabulary KL(p̂ ‖ q) of the dense p̂ they
    stand for: the ghost bucket is empty, the draws speak for the tail."""
    g = torch.Generator().manual_seed(91)
    n, vocab = 24, 80
    teacher = torch.randn(n, vocab, generator=g) * 2.0
    ids, probs, tail = hybrid_targets(teacher, 0, temperature=temperature, through_shards=True)
    assert (tail == 0).all() and torch.allclose(probs.sum(1), torch.ones(n), atol=1e-5)
    z = (torch.randn(n, vocab, generator=g) * 1.5).requires_grad_(True)
    labels, mask = torch.randint(0, vocab, (n,), generator=g), torch.ones(n, dtype=torch.bool)
    got = distillation_loss(z, labels, ids, probs, tail, mask, alpha=1.0, temperature=temperature).loss
    (grad,) = torch.autograd.grad(got, z)

    dense = sparse_to_dense(ids, probs.double(), tail.double(), vocab)  # p̂ over the whole vocabulary
    z64 = z.detach().double().requires_grad_(True)
    log_q = torch.log_softmax(z64 / temperature, dim=-1)
    terms = torch.where(dense > 0, dense * (dense.clamp_min(1e-300).log() - log_q), torch.zeros_like(dense))
    want = terms.sum(-1).mean() * temperature**2
    (want_grad,) = torch.autograd.grad(want, z64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def tail_ids_of(teacher: torch.Tensor, *, k: int, mean_ids: float) -> torch.Tensor:
    """[n, V] bool: the ids a hybrid cut leaves in the tail (what its draws stand for)."""
    from raydistill.stages.capture.sparsify import budget_cut

    out = sparsify_topk(teacher, k=k)
    kept = torch.from_numpy(budget_cut(out.ids.numpy(), out.probs.numpy(), out.tail.numpy(), mean_ids)[0])
    exact = torch.zeros_like(teacher, dtype=torch.bool)
    rows, cols = torch.nonzero(kept >= 0, as_tuple=True)
    exact[rows, kept[rows, cols]] = True
    return ~exact


def test_hybrid_kd_gradient_is_unbiased_for_online_kd() -> None:
    """Averaged over seeded captures, the hybrid KD gradient is dense online KD's (KL(p ‖ q) over all V)."""
    g = torch.Generator().manual_seed(92)
    n, vocab, seeds = 6, 48, 600
    teacher = torch.randn(n, vocab, generator=g) * 1.5
    z = (torch.randn(n, vocab, generator=g)).requires_grad_(True)
    labels, mask = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
    grads = []
    for seed in range(seeds):
        ids, probs, tail = hybrid_targets(teacher, seed, k=10, draws=4, mean_ids=2.0)
        loss = distillation_loss(z, labels, ids, probs, tail, mask, alpha=1.0).loss
        grads.append(torch.autograd.grad(loss, z)[0].double())
    grads = torch.stack(grads)
    online = losses.dense_distillation_loss(z, teacher, labels, mask, alpha=1.0).loss
    (want,) = torch.autograd.grad(online, z)
    # d loss / d z_j = (q_j − p̂_j) / n, and a tail id's p̂_j = τ · Binomial(d, p_j / τ) / d
    p = torch.softmax(teacher.double(), -1)
    tau = 1 - torch.where(tail_ids_of(teacher, k=10, mean_ids=2.0), 0.0, p).sum(-1, keepdim=True)
    se = (tau * p * (1 - p / tau)).clamp_min(0).div(4 * seeds).sqrt() / n
    bias = (grads.mean(0) - want.double()).abs()
    assert (bias <= 5 * se + 1e-6).all(), float((bias / (se + 1e-12)).max())
    assert float(grads.std(0).max()) > 0  # the draws do vary: this is a test of an estimator
