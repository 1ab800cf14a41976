"""Hybrid targets: exact top ids plus draws from the rest, checked against slow references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydistill.stages.capture.sparsify import budget_cut, hybrid_cut, sparsify_hidden, sparsify_topk


def capture(logits: torch.Tensor, k: int, draws: int, mean_ids: float, seed: int):
    """Hybrid targets of ``logits`` as a capture makes them: per chunk, then the unit's cut."""
    rng = np.random.default_rng(seed)
    n = logits.shape[0]
    out = sparsify_topk(logits, k=k, mode="hybrid", chunk_size=7,
                        uniforms=torch.from_numpy(rng.random((n, draws), dtype=np.float32)))
    return out, hybrid_cut(out.ids.numpy(), out.probs.numpy(), out.tail.numpy(), out.drawn.numpy(),
                           rng.random((n, draws), dtype=np.float32), mean_ids)


def estimate(cut, n: int, vocab: int, draws: int) -> np.ndarray:
    """The dense distribution [n, V] the loss reads: exact probs, then τ · count / draws."""
    dense = np.zeros((n, vocab))
    rows = np.broadcast_to(np.arange(n)[:, None], cut.ids.shape)
    real = cut.ids >= 0
    weight = cut.probs + cut.tail[:, None] * cut.counts / draws
    np.add.at(dense, (rows[real], cut.ids[real]), weight[real])
    return dense


def test_deep_draws_avoid_the_top_k_and_follow_the_rest() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 40, generator=g).expand(20000, 40) * 1.5
    out = sparsify_topk(logits, k=6, mode="hybrid", uniforms=torch.rand(20000, 4, generator=g))
    top = set(out.ids[0].tolist())
    drawn = out.drawn.flatten().numpy()
    assert not top & set(drawn.tolist()) and (drawn >= 0).all()
    rest = torch.softmax(logits[0].double(), 0).numpy()
    rest[list(top)] = 0
    rest /= rest.sum()
    freq = np.bincount(drawn, minlength=40) / drawn.size
    se = np.sqrt(rest * (1 - rest) / drawn.size)
    assert (np.abs(freq - rest) <= 5 * se + 1e-12).all()


def test_hidden_path_gives_the_same_targets_and_draws() -> None:
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(30, 8, generator=g), torch.randn(50, 8, generator=g)
    u = torch.rand(30, 5, generator=g)
    a = sparsify_hidden(hidden, weight, k=7, mode="hybrid", uniforms=u, chunk_size=4)
    b = sparsify_topk(hidden @ weight.T, k=7, mode="hybrid", uniforms=u, chunk_size=9)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.drawn, b.drawn)
    torch.testing.assert_close(a.probs, b.probs)


def test_cut_keeps_budget_exactly_and_draws_from_everything_else() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(60, 200, generator=g) * 2.5
    out, cut = capture(logits, k=24, draws=16, mean_ids=6.0, seed=0)
    want_ids, _, want_tail = budget_cut(out.ids.numpy(), out.probs.numpy(), out.tail.numpy(), 6.0)
    exact = (cut.ids >= 0) & (cut.counts == 0)
    assert exact.sum() == (want_ids >= 0).sum() == round(6.0 * 60)
    np.testing.assert_array_equal(np.where(exact, cut.ids, -1)[:, :24], want_ids)
    np.testing.assert_array_equal(cut.tail, want_tail)
    assert (cut.counts.sum(1) == 16).all()
    for t in range(60):  # drawn ids: distinct, never an exact one, right after the exact prefix
        e, d = int(exact[t].sum()), int((cut.counts[t] > 0).sum())
        assert (cut.ids[t, :e] >= 0).all() and (cut.counts[t, e:e + d] > 0).all() and (cut.ids[t, e + d:] == -1).all()
        assert len(set(cut.ids[t, e:e + d])) == d and not set(cut.ids[t, :e]) & set(cut.ids[t, e:e + d])
    again = capture(logits, k=24, draws=16, mean_ids=6.0, seed=0)[1]
    assert np.array_equal(again.ids, cut.ids) and np.array_equal(again.counts, cut.counts)


def test_hybrid_estimate_is_unbiased_over_seeds() -> None:
    """Exact where the mass is, and the mean over seeded draws is the teacher's distribution."""
    g = torch.Generator().manual_seed(6)
    n, vocab, draws, seeds = 12, 64, 8, 1500
    logits = torch.randn(n, vocab, generator=g) * 2.0
    p = torch.softmax(logits.double(), -1).numpy()
    cuts = [capture(logits, k=16, draws=draws, mean_ids=4.0, seed=s)[1] for s in range(seeds)]
    runs = np.stack([estimate(cut, n, vocab, draws) for cut in cuts])
    # a tail id's estimate is τ · Binomial(d, p/τ) / d: variance τ · p · (1 − p/τ) / d per seed
    tau = cuts[0].tail.astype(np.float64)[:, None]
    se = np.sqrt(np.clip(tau * p * (1 - p / tau), 0, None) / draws / seeds)
    assert (np.abs(runs.mean(0) - p) <= 5 * se + 1e-6).all()
    assert np.abs(runs.sum(-1) - 1).max() < 1e-5  # every draw's estimate is a distribution
    exact = np.zeros((n, vocab), dtype=bool)
    rows, cols = np.nonzero((cuts[0].ids >= 0) & (cuts[0].counts == 0))
    exact[rows, cuts[0].ids[rows, cols]] = True
    assert exact.sum() == round(4.0 * n) and (runs.std(0)[exact] == 0).all()  # budget's exact ids never vary
    np.testing.assert_allclose(runs[0][exact], p[exact], rtol=1e-5)


@pytest.mark.parametrize("vocab", [10, 12])
def test_no_deep_tail_draws_from_the_cut_ids_only(vocab: int) -> None:
    """k ≥ V: the top-k rows hold the whole vocabulary, so the tail is only what the cut dropped."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(40, vocab, generator=g)
    out, cut = capture(logits, k=vocab, draws=6, mean_ids=3.0, seed=1)
    assert (out.drawn == -1).all()
    assert (cut.counts.sum(1) == 6).all()
    dense = np.stack([estimate(capture(logits, k=vocab, draws=6, mean_ids=3.0, seed=s)[1], 40, vocab, 6)
                      for s in range(400)])
    p = torch.softmax(logits.double(), -1).numpy()
    tau = cut.tail.astype(np.float64)[:, None]
    se = np.sqrt(np.clip(tau * p * (1 - p / tau), 0, None) / 6 / 400)
    assert (np.abs(dense.mean(0) - p) <= 5 * se + 1e-6).all()


def test_everything_exact_means_no_draws() -> None:
    logits = torch.randn(5, 6)
    _, cut = capture(logits, k=6, draws=4, mean_ids=6.0, seed=2)
    assert (cut.counts == 0).all() and ((cut.ids >= 0).sum(1) == 6).all()
    assert np.abs(cut.tail).max() < 1e-6
