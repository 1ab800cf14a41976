"""Sparse KD losses against slow float64 references written with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raydistill import losses
from raydistill.errors import ConfigError
from raydistill.losses import (
    distillation_loss,
    next_token_cross_entropy,
    sparse_forward_kl,
    stored_log_probs,
)
from raydistill.sparsify import sparsify_topk


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
        monkeypatch.setattr(losses, "sparse_forward_kl", must_not_run)
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
