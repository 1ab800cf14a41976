"""sparsify_topk / sparsify_hidden / sparse_to_dense against a slow dense float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydistill.errors import ConfigError
from raydistill.stages.capture import gpu_kernels, sparsify
from raydistill.stages.capture.cpu_kernels import exp_sums, top_k_rows
from raydistill.stages.capture.sparsify import (
    SparseTargets,
    budget_cut,
    sparse_to_dense,
    sparsify_hidden,
    sparsify_topk,
)


def _use_path(name: str, monkeypatch) -> str:
    monkeypatch.setattr(sparsify, "USE_CPU_KERNELS", name == "cpu_kernels")
    monkeypatch.setattr(sparsify, "TRITON_DEVICES", {"cpu"} if name == "triton" else set())
    monkeypatch.setattr(gpu_kernels, "BLOCK_V", 128)  # small tiles: rows span several of them
    if name == "triton":
        assert gpu_kernels.available(torch.device("cpu")), "triton is a dev dependency; TRITON_INTERPRET=1 here"
    return name


@pytest.fixture(params=["cpu_kernels", "torch"])
def cpu_path(request, monkeypatch) -> str:
    """Run a test through the compiled CPU kernels and through torch's ops."""
    return _use_path(request.param, monkeypatch)


@pytest.fixture(params=["cpu_kernels", "torch", "triton"])
def any_path(request, monkeypatch) -> str:
    """``cpu_path``, and the GPU head's Triton kernels in Triton's interpreter (slow: small inputs only)."""
    return _use_path(request.param, monkeypatch)


def reference_topk(logits: torch.Tensor, k: int, temperature: float, vocab_size: int | None = None):
    """Dense float64 softmax + full argsort: obviously right, and slow."""
    v = logits.shape[1] if vocab_size is None else vocab_size
    p = torch.softmax(logits[:, :v].double() / temperature, dim=-1)
    order = torch.argsort(p, dim=-1, descending=True)
    ids = order[:, :k]
    probs = p.gather(1, ids)
    tail = (1.0 - probs.sum(-1)).clamp(0.0, 1.0)
    return ids, probs, tail, p


def assert_matches_reference(out: SparseTargets, logits, k, temperature, vocab_size=None, atol=3e-6):
    ref_ids, ref_probs, ref_tail, p = reference_topk(logits, k, temperature, vocab_size)
    assert (
        out.ids.dtype == torch.int64 and out.probs.dtype == torch.float32 and out.tail.dtype == torch.float32
    )
    assert out.ids.shape == ref_ids.shape and out.tail.shape == ref_tail.shape
    # Sorted probabilities equal the reference's top-k values (robust to ties between ids) ...
    torch.testing.assert_close(out.probs.double(), ref_probs, atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.tail.double(), ref_tail, atol=atol, rtol=1e-5)
    # ... and each stored probability is the true probability of the id stored with it.
    torch.testing.assert_close(p.gather(1, out.ids), out.probs.double(), atol=atol, rtol=1e-5)
    assert (out.probs[:, :-1] >= out.probs[:, 1:]).all(), "probabilities must be in descending order"
    assert all(len(set(row.tolist())) == k for row in out.ids), "ids must be distinct per row"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("k", [1, 7, 32])
def test_matches_dense_reference(temperature: float, k: int, any_path: str) -> None:
    g = torch.Generator().manual_seed(int(temperature * 100) + k)
    logits = torch.randn(37, 211, generator=g) * 3.0
    out = sparsify_topk(logits, k=k, temperature=temperature)
    assert_matches_reference(out, logits, k, temperature)
    torch.testing.assert_close(out.ids, reference_topk(logits, k, temperature)[0])  # no ties in fp32 randn


@pytest.mark.parametrize("vocab", [4096, 4099, 50_000])
@pytest.mark.parametrize("k", [48, 96])
def test_large_k_matches_dense_reference(vocab: int, k: int, cpu_path: str) -> None:
    """Rows wide enough for the kernel's block-maxima threshold (a partial last block included)."""
    logits = torch.randn(40, vocab, generator=torch.Generator().manual_seed(vocab + k)) * 3
    out = sparsify_topk(logits, k=k, chunk_size=16)
    assert_matches_reference(out, logits, k, 1.0)


def test_triton_head_at_a_large_k_and_the_default_tile(monkeypatch) -> None:
    """k = 96 runs at 128 slots with the extras' mass moved to the tail; 1,024-column tiles, a partial last one."""
    monkeypatch.setattr(sparsify, "TRITON_DEVICES", {"cpu"})
    logits = torch.randn(4, 2051, generator=torch.Generator().manual_seed(9)) * 3
    assert_matches_reference(sparsify_topk(logits, k=96), logits, 96, 1.0)


@pytest.mark.parametrize("columns", [5, 300, 4096, 4101, 40_000])
@pytest.mark.parametrize("k", [1, 5, 48, 96, 128])
def test_top_k_rows_equals_a_stable_sort_even_with_ties(columns: int, k: int) -> None:
    """The kernel's top k is exactly a stable descending sort's first k: equal values by ascending id.
    Logits drawn from a few integers tie at the k-th value in most rows (as bf16 logits do)."""
    if k > columns:
        return
    g = torch.Generator().manual_seed(columns * k)
    for x in (torch.randn(24, columns, generator=g), torch.randint(-6, 3, (24, columns), generator=g).float()):
        x[3, -1] = 100.0  # a winner in the partial last block (when there is one)
        x[4, :] = -torch.inf
        x[4, columns // 2] = 0.0
        x[5, (torch.arange(columns) // 8) % 4 == 0] += 50.0  # every 4th block wins: the sampled guess fails
        vals, ids = top_k_rows(x.numpy(), k)
        order = torch.from_numpy(np.argsort(-x.numpy(), axis=1, kind="stable")[:, :k].astype(np.int64))
        assert torch.equal(torch.from_numpy(ids), order)
        assert torch.equal(torch.from_numpy(vals), torch.topk(x, k, dim=-1).values)
        assert int(ids[3, 0]) == columns - 1
        big = x.repeat(8, 1).numpy()  # 192 rows: three threads of 64
        threaded = top_k_rows(big, k, threads=3)
        assert np.array_equal(threaded[0], np.tile(vals, (8, 1))) and np.array_equal(threaded[1], np.tile(ids, (8, 1)))


def test_top_k_rows_ranks_nan_first_like_torch() -> None:
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(1))
    x[0, 17] = torch.nan
    x[1, 99] = -torch.nan
    vals, ids = top_k_rows(x.numpy(), 96)
    assert ids[0, 0] == 17 and ids[1, 0] == 99 and np.isnan(vals[:2, 0]).all()
    assert np.array_equal(vals[2], torch.topk(x[2], 96).values.numpy())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("columns", [7, 4096, 151_936])
def test_exp_sums_matches_float64_sum_over_the_unstored(temperature: float, columns: int) -> None:
    """The fused pass (polynomial exp, float32 lanes, float64 blocks) against a float64 sum, with the
    k-th value's unstored duplicates and -inf (masked) logits in the rows."""
    g = torch.Generator().manual_seed(columns)
    x = torch.randn(12, columns, generator=g) * 4
    x[1] = torch.randint(-3, 2, (columns,), generator=g).float()  # ties at the k-th value
    x[2, ::3] = -torch.inf
    x[3, 0] = 30.0  # a confident token: a tail down to ~1e-23, still summed to full relative precision
    k = min(5, columns - 1)
    vals, ids = top_k_rows(x.numpy(), k)
    rest = exp_sums(x.numpy(), vals, temperature)
    e = torch.exp((x.double() - torch.from_numpy(vals[:, :1]).double()) / temperature)
    want = e.scatter(1, torch.from_numpy(ids), 0.0).sum(-1)
    # float32 (x - max) / T itself carries |x - max| / T · 6e-8 relative error into exp: up to ~4e-6 at -60
    torch.testing.assert_close(torch.from_numpy(rest), want, rtol=5e-6, atol=0)
    big = x.repeat(16, 1).numpy()  # 192 rows: three threads of 64
    assert np.array_equal(exp_sums(big, np.tile(vals, (16, 1)), temperature, threads=3), np.tile(rest, 16))


@pytest.mark.parametrize("bad", [torch.nan, torch.inf])
def test_nonfinite_logits_are_refused_with_the_fix(bad: float, any_path: str) -> None:
    logits = torch.randn(6, 300)
    logits[2, 5] = bad
    for mode in ("budget", "sampled"):
        with pytest.raises(ValueError, match=r"NaN or \+inf at 1 of 6 positions.*dtype: bfloat16 or float32"):
            sparsify_topk(logits, k=8, mode=mode, uniforms=torch.rand(6, 4) if mode == "sampled" else None)


def test_bf16_and_fp16_input(cpu_path: str) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(50, 300, generator=g) * 4.0
    for dtype in (torch.bfloat16, torch.float16):
        logits = base.to(dtype)  # bf16 has many exact ties; the checks above tolerate them
        out = sparsify_topk(logits, k=16, temperature=0.7)
        assert_matches_reference(out, logits, 16, 0.7)


def test_padded_vocab_is_truncated_before_softmax(any_path: str) -> None:
    g = torch.Generator().manual_seed(2)
    vocab, padded = 100, 128
    logits = torch.randn(20, padded, generator=g)
    logits[:, vocab:] = 50.0  # padding that would win every top-k and take all the mass
    out = sparsify_topk(logits, k=10, vocab_size=vocab)
    assert (out.ids < vocab).all()
    assert_matches_reference(out, logits, 10, 1.0, vocab_size=vocab)
    torch.testing.assert_close(out.probs, sparsify_topk(logits[:, :vocab].clone(), k=10).probs)


def test_chunked_equals_unchunked() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(103, 257, generator=g).to(torch.bfloat16)
    whole = sparsify_topk(logits, k=12, temperature=1.5, vocab_size=250, chunk_size=4096)
    for chunk in (1, 10, 64, 103):
        part = sparsify_topk(logits, k=12, temperature=1.5, vocab_size=250, chunk_size=chunk)
        assert torch.equal(part.ids, whole.ids)
        assert torch.equal(part.probs, whole.probs)
        assert torch.equal(part.tail, whole.tail)


def test_does_not_modify_input() -> None:
    logits = torch.randn(8, 40)
    before = logits.clone()
    sparsify_topk(logits, k=4, temperature=2.0)
    assert torch.equal(logits, before)


def test_sparsify_hidden_equals_topk_of_projection(any_path: str) -> None:
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(45, 16, generator=g)
    weight = torch.randn(72, 16, generator=g)  # 64 true ids + 8 padded rows
    expected = sparsify_topk(hidden @ weight.T, k=9, temperature=0.8, vocab_size=64)
    for chunk in (7, 4096):
        got = sparsify_hidden(hidden, weight, k=9, temperature=0.8, vocab_size=64, chunk_size=chunk)
        assert torch.equal(got.ids, expected.ids)
        # Chunked matmuls may round differently; a float32 log-sum-exp resolves ~1e-6.
        torch.testing.assert_close(got.probs, expected.probs, atol=3e-6, rtol=1e-5)
        torch.testing.assert_close(got.tail, expected.tail, atol=3e-6, rtol=1e-5)


def test_sparsify_hidden_bf16_model() -> None:
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(30, 32, generator=g).to(torch.bfloat16)
    weight = torch.randn(96, 32, generator=g).to(torch.bfloat16)
    got = sparsify_hidden(hidden, weight, k=8, chunk_size=11)
    assert_matches_reference(got, hidden @ weight.T, 8, 1.0, atol=1e-5)


def test_k_equal_vocab_has_no_tail(any_path: str) -> None:
    logits = torch.randn(6, 24)
    out = sparsify_topk(logits, k=24, temperature=1.3)
    assert out.tail.abs().max() < 1e-6
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(6), atol=1e-6, rtol=0)
    assert (out.tail >= 0).all()


def test_tail_is_clipped_to_unit_interval() -> None:
    logits = torch.randn(64, 10) * 20.0  # very peaked rows: rounding can push 1 - sum below 0
    out = sparsify_topk(logits, k=10)
    assert ((out.tail >= 0) & (out.tail <= 1)).all()


def test_empty_batch() -> None:
    out = sparsify_topk(torch.empty(0, 50), k=5)
    assert out.ids.shape == (0, 5) and out.probs.shape == (0, 5) and out.tail.shape == (0,)


def test_sparse_to_dense_spreads_tail_uniformly() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(9, 40, generator=g)
    out = sparsify_topk(logits, k=5, temperature=1.0)
    dense = sparse_to_dense(out.ids, out.probs, out.tail, 40)
    assert dense.shape == (9, 40)
    torch.testing.assert_close(dense.sum(-1), torch.ones(9), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense.gather(1, out.ids), out.probs)
    stored = torch.zeros(9, 40, dtype=torch.bool).scatter_(1, out.ids, True)
    for row in range(9):
        rest = dense[row][~stored[row]]
        torch.testing.assert_close(rest, torch.full_like(rest, float(out.tail[row]) / 35))
    full = sparsify_topk(logits, k=40)
    torch.testing.assert_close(
        sparse_to_dense(full.ids, full.probs, full.tail, 40), torch.softmax(logits, -1), atol=1e-6, rtol=1e-5
    )


def test_errors() -> None:
    logits = torch.randn(4, 4096)
    with pytest.raises(ConfigError, match=r"k=5000 is larger than the teacher's vocabulary \(4096 ids\)"):
        sparsify_topk(logits, k=5000)
    with pytest.raises(ConfigError, match=r"choose k <= 100"):
        sparsify_topk(logits, k=101, vocab_size=100)
    with pytest.raises(ConfigError, match="temperature"):
        sparsify_topk(logits, k=4, temperature=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        sparsify_topk(logits, k=4, temperature=-1.0)
    with pytest.raises(ConfigError, match="vocab_size"):
        sparsify_topk(logits, k=4, vocab_size=5000)
    with pytest.raises(ConfigError, match="k=0"):
        sparsify_topk(logits, k=0)
    with pytest.raises(ConfigError, match="temperature"):
        sparsify_hidden(torch.randn(3, 8), torch.randn(16, 8), k=2, temperature=0.0)
    with pytest.raises(ValueError, match="hidden size"):
        sparsify_hidden(torch.randn(3, 8), torch.randn(16, 9), k=2)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        sparsify_topk(torch.randn(2, 3, 4), k=2)


# ---------------------------------------------------------------- adaptive and sampled modes


def reference_adaptive(logits: torch.Tensor, k: int, threshold: float, temperature: float = 1.0,
                       min_prob: float = 0.0):
    """Per row, slowly: the most-probable prefix until its mass reaches ``threshold`` or the next id
    is below ``min_prob``; at least one id, at most k."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    rows = []
    for row in p:
        order = torch.argsort(row, descending=True)
        kept, mass = [], 0.0
        for i in order.tolist():
            if len(kept) == k or mass >= threshold or (kept and float(row[i]) < min_prob):
                break
            kept.append(i)
            mass += float(row[i])
        rows.append({i: float(row[i]) for i in kept})
    return rows


@pytest.mark.parametrize(("threshold", "min_prob"), [(0.2, 0.0), (0.6, 0.0), (0.95, 0.0), (1.0, 0.0),
                                                     (1.0, 0.01), (0.9, 0.02), (1.0, 0.5)])
def test_adaptive_matches_slow_reference(threshold: float, min_prob: float, any_path: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(40, 90) * torch.linspace(0.5, 6, 40)[:, None]  # flat to peaked rows
    out = sparsify_topk(logits, k=12, mode="adaptive", threshold=threshold, temperature=1.5, min_prob=min_prob)
    ref = reference_adaptive(logits, 12, threshold, temperature=1.5, min_prob=min_prob)
    for t, want in enumerate(ref):
        valid = out.ids[t] >= 0
        got = dict(zip(out.ids[t][valid].tolist(), out.probs[t][valid].tolist(), strict=True))
        assert set(got) == set(want)
        assert (out.probs[t][~valid] == 0).all()
        for i, p in want.items():
            assert got[i] == pytest.approx(p, abs=3e-6)
        assert float(out.tail[t]) == pytest.approx(1 - sum(want.values()), abs=3e-6)


@pytest.mark.parametrize("mode", ["adaptive", "sampled"])
def test_hidden_path_equals_logits_path_in_every_mode(mode: str) -> None:
    torch.manual_seed(3)
    hidden, weight = torch.randn(40, 16), torch.randn(90, 16)
    kw = {"threshold": 0.7} if mode == "adaptive" else {"uniforms": torch.rand(40, 8)}
    a = sparsify_hidden(hidden, weight, k=12, mode=mode, chunk_size=9, **kw)
    b = sparsify_topk(hidden @ weight.t(), k=12, mode=mode, **kw)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.tail, b.tail, atol=1e-5, rtol=1e-4)


def reference_sampled(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0):
    """Per draw, slowly: the first id whose float64 CDF exceeds u; then {id: count}."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    rows = []
    for row, us in zip(p, uniforms.double(), strict=True):
        cdf = torch.cumsum(row, 0)
        counts: dict[int, int] = {}
        for u in us.tolist():
            i = min(int(torch.searchsorted(cdf, torch.tensor(u * float(cdf[-1]), dtype=torch.float64),
                                           right=True)), len(row) - 1)
            counts[i] = counts.get(i, 0) + 1
        rows.append(counts)
    return rows


def test_sampled_matches_slow_reference_and_keeps_the_true_tail(any_path: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(30, 70) * 2
    uniforms = torch.rand(30, 24)
    out = sparsify_topk(logits, k=5, mode="sampled", uniforms=uniforms, temperature=0.8, chunk_size=7)
    assert out.ids.shape == (30, 24)
    p = torch.softmax(logits.double() / 0.8, dim=-1)
    for t, want in enumerate(reference_sampled(logits, uniforms, temperature=0.8)):
        valid = out.ids[t] >= 0
        got = dict(zip(out.ids[t][valid].tolist(), (out.probs[t][valid] * 24).round().int().tolist(), strict=True))
        assert got == want
        assert float(out.tail[t]) == pytest.approx(1 - float(p[t, list(want)].sum()), abs=3e-6)


def test_sampled_estimate_is_unbiased() -> None:
    """Averaged over many seeds, counts / n converges to p: TV(p, mean p̂) shrinks like 1/√seeds."""
    torch.manual_seed(2)
    logits = (torch.randn(1, 50) * 2).expand(4000, 50).contiguous()
    out = sparsify_topk(logits, k=1, mode="sampled", uniforms=torch.rand(4000, 16))
    p = torch.softmax(logits[0].double(), dim=-1)
    mean = torch.zeros(50, dtype=torch.float64)
    mean.scatter_add_(0, out.ids[out.ids >= 0], out.probs[out.ids >= 0].double())
    mean /= 4000
    one_draw = sparse_to_dense(out.ids[:1], out.probs[:1], torch.zeros(1), 50)[0].double()
    assert 0.5 * (mean - p).abs().sum() < 0.02 < 0.5 * (one_draw - p).abs().sum()


def test_sparse_to_dense_with_a_prior_and_padding() -> None:
    prior = torch.tensor([0.5, 0.2, 0.2, 0.1])
    ids = torch.tensor([[1, -1], [0, 3]])
    probs = torch.tensor([[0.3, 0.0], [0.4, 0.2]])
    tail = torch.tensor([0.7, 0.4])
    dense = sparse_to_dense(ids, probs, tail, 4, prior=prior)
    expected = torch.tensor([[0.7 * 0.5 / 0.8, 0.3, 0.7 * 0.2 / 0.8, 0.7 * 0.1 / 0.8],
                             [0.4, 0.4 * 0.5, 0.4 * 0.5, 0.2]])
    torch.testing.assert_close(dense, expected)


def test_mode_errors() -> None:
    logits = torch.randn(3, 10)
    with pytest.raises(ConfigError, match="mode 'nucleus' is unknown"):
        sparsify_topk(logits, k=2, mode="nucleus")
    with pytest.raises(ConfigError, match="threshold"):
        sparsify_topk(logits, k=2, mode="adaptive")
    with pytest.raises(ConfigError, match="min_prob"):
        sparsify_topk(logits, k=2, mode="adaptive", threshold=1.0, min_prob=1.5)
    with pytest.raises(ValueError, match=r"uniforms of shape \[3, draws\]"):
        sparsify_topk(logits, k=2, mode="sampled", uniforms=torch.rand(2, 4))


@pytest.mark.parametrize("mode", ["topk", "adaptive"])
def test_tail_of_a_confident_token_keeps_its_precision(mode: str, any_path: str) -> None:
    """A tail of ~1e-12 is summed over the unstored ids, not left as 1 − (a float32 sum near 1)."""
    logits = torch.zeros(2, 500)
    logits[:, 7] = 30.0
    logits[1, 9] = 25.0
    out = sparsify_topk(logits, k=3, mode=mode, threshold=0.99 if mode == "adaptive" else None)
    e = (logits.double() - 30.0).exp()  # float64 softmax via log-sum-exp would itself lose the tail's digits
    unstored = e.clone()
    for row, ids in enumerate(out.ids.tolist()):
        unstored[row, [i for i in ids if i >= 0]] = 0.0
    assert (out.tail > 0).all()
    torch.testing.assert_close(out.tail.double(), unstored.sum(-1) / e.sum(-1), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- budget mode: one cut over a unit


def reference_budget(probs: np.ndarray, mean_ids: float) -> set[tuple[int, int]]:
    """Slowly: every token's first entry, then the remaining entries from the most probable down
    (ties: the earlier token, then the earlier rank) until round(mean_ids · N) are kept."""
    n, k = probs.shape
    total = min(max(round(mean_ids * n), n), n * k)
    kept = {(t, 0) for t in range(n)}
    rest = sorted((-float(probs[t, r]), t, r) for t in range(n) for r in range(1, k))
    kept.update((t, r) for _, t, r in rest[: total - n])
    return kept


@pytest.mark.parametrize("mean_ids", [1, 1.5, 3, 4.25, 7.9, 8, 20])
@pytest.mark.parametrize("ties", [False, True])
def test_budget_cut_matches_slow_reference(mean_ids: float, ties: bool) -> None:
    torch.manual_seed(5)
    logits = torch.randn(37, 60) * torch.linspace(0.3, 5, 37)[:, None]  # flat to peaked tokens
    if ties:  # whole-number logits: many equal probabilities, within and across tokens
        logits = logits.round()
    t = sparsify_topk(logits, k=8)
    ids, probs, tail = (a.numpy() for a in (t.ids, t.probs, t.tail))
    cut_ids, cut_probs, cut_tail = budget_cut(ids, probs, tail, mean_ids)
    want = reference_budget(probs, mean_ids)
    got = {(int(i), int(r)) for i, r in zip(*np.nonzero(cut_ids >= 0), strict=True)}
    assert got == want
    assert len(got) == min(max(round(mean_ids * 37), 37), 37 * 8)  # exactly the budget
    kept = cut_ids >= 0
    assert (kept[:, 1:] <= kept[:, :-1]).all()  # a prefix of each row, padding after
    np.testing.assert_array_equal(cut_ids[kept], ids[kept])
    np.testing.assert_array_equal(cut_probs[kept], probs[kept])
    assert (cut_probs[~kept] == 0).all()
    np.testing.assert_allclose(cut_probs.sum(1) + cut_tail, probs.sum(1) + tail, atol=2e-6)  # mass moves to the tail
    if 1 < mean_ids < 8:  # one cut for all tokens, not a fixed count per token
        assert kept.sum(1).min() < kept.sum(1).max()


def test_budget_cut_minimizes_dropped_mass() -> None:
    """Among allocations with the same total, the cut leaves the least mass in the tails."""
    rng = np.random.default_rng(0)
    t = sparsify_topk(torch.randn(50, 40) * torch.linspace(0.5, 4, 50)[:, None], k=10)
    ids, probs, tail = (a.numpy() for a in (t.ids, t.probs, t.tail))
    _, _, cut_tail = budget_cut(ids, probs, tail, 4.0)
    for _ in range(20):  # random prefixes with the same total of 200 entries
        lengths = np.ones(50, int) + rng.multinomial(150, np.ones(50) / 50).clip(max=9)
        lengths[0] += 200 - lengths.sum()
        if not 1 <= lengths[0] <= 10:
            continue
        dropped = sum(probs[t, lengths[t]:].sum() for t in range(50))
        assert cut_tail.sum() - tail.sum() <= dropped + 1e-6


def test_budget_cut_of_nothing() -> None:
    ids, probs, tail = budget_cut(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 2)
    assert ids.shape == (0, 4) and probs.shape == (0, 4) and tail.shape == (0,)


@pytest.mark.parametrize("mode", ["topk", "adaptive", "budget", "sampled", "hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_head_gives_torch_targets_in_every_mode(mode: str, dtype: torch.dtype, monkeypatch) -> None:
    """The GPU head's Triton kernels (interpreted here) against torch's ops on the same logits, model dtype in:
    the same ids and draws, probabilities and tails to float32 rounding, over rows spanning several tiles."""
    monkeypatch.setattr(gpu_kernels, "BLOCK_V", 128)
    g = torch.Generator().manual_seed(5)
    # distinct values in both dtypes (multiples of 1/64 below 4 are exact in bf16): ties would let the paths differ
    logits = torch.stack([torch.randperm(300, generator=g) - 150.0 for _ in range(10)]).div_(64).to(dtype)
    kw = {"threshold": 0.8} if mode == "adaptive" else {}
    if mode in ("sampled", "hybrid"):
        kw["uniforms"] = torch.rand(10, 6, generator=g)
    runs = {}
    for path in ("torch", "triton"):
        monkeypatch.setattr(sparsify, "USE_CPU_KERNELS", False)
        monkeypatch.setattr(sparsify, "TRITON_DEVICES", {"cpu"} if path == "triton" else set())
        runs[path] = sparsify_topk(logits, k=12, mode=mode, temperature=0.9, chunk_size=6, **kw)
    ref, got = runs["torch"], runs["triton"]
    assert torch.equal(got.ids, ref.ids)
    torch.testing.assert_close(got.probs, ref.probs, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.tail, ref.tail, atol=2e-6, rtol=1e-5)
    if mode == "hybrid":
        assert torch.equal(got.drawn, ref.drawn) and (got.drawn >= 0).all()


@pytest.mark.parametrize("descending", [True, False])
def test_triton_top_k_when_the_best_ids_come_first_or_last(descending: bool, monkeypatch) -> None:
    """Sorted rows: best first, every later tile is skipped unsorted (its whole mass goes to the rest);
    best last, every tile replaces the running top k. Both against torch.topk and a float64 sum."""
    monkeypatch.setattr(gpu_kernels, "BLOCK_V", 128)
    x = torch.sort(torch.randn(6, 600, generator=torch.Generator().manual_seed(11)) * 3, descending=descending)[0]
    vals, ids, rest = gpu_kernels.top_k_stats(x, 16, temperature=0.7)
    ref_vals, ref_ids = torch.topk(x, 16)
    assert torch.equal(vals, ref_vals) and torch.equal(ids, ref_ids)
    expected = ((x.double() - x.double().amax(1, keepdim=True)) / 0.7).exp().scatter(1, ref_ids, 0.0).sum(1)
    torch.testing.assert_close(rest[:, 0], expected, rtol=1e-6, atol=0)
