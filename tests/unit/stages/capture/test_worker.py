"""TeacherWorker's fast path against a slow dense reference; windows, batches and concurrency."""

from __future__ import annotations

import json
import os
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from support import unit_key

from raydistill.config import CorpusConfig
from raydistill.contracts.shards.reader import parse_shard_bytes
from raydistill.contracts.units import completion_url, read_completions
from raydistill.errors import ConfigError
from raydistill.io.corpus import Document, read_documents
from raydistill.models.windows import cut_windows, length_batches, make_batch
from raydistill.stages.capture.sparsify import sparsify_hidden
from raydistill.stages.capture.worker import TeacherSettings, TeacherWorker, choose_head

K = 16
MAX_LEN = 64


@pytest.fixture(scope="module")
def sharp_teacher(tiny_teacher, tmp_path_factory) -> str:
    """A random 2-layer Llama with an untied, scaled-up head: peaked rows, so ids are rarely near-tied."""
    from transformers import AutoTokenizer

    from raydistill.models.sizes import build_llama

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    model = build_llama(vocab_size=len(tokenizer), hidden=32, layers=2, heads=2, max_positions=256,
                        tie_embeddings=False, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits with a std of a few nats instead of ~0.1
    out = tmp_path_factory.mktemp("sharp_teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def documents(tiny_corpus) -> list[Document]:
    texts = [json.loads(line)["text"] for line in open(tiny_corpus)]
    return [Document.from_text(t) for t in texts]


def make_worker(teacher: str, **overrides) -> TeacherWorker:
    settings = dict(teacher=teacher, mode="topk", k=K, temperature=1.0, max_length=MAX_LEN, batch_tokens=200)
    settings.update(overrides)
    return TeacherWorker(TeacherSettings(**settings))


def dense_reference(worker: TeacherWorker, ids: list[int], temperature: float):
    """float64 softmax of one window run alone (no padding, no batching), fully sorted."""
    with torch.no_grad():
        logits = worker.model(torch.tensor([ids])).logits[0, :, : worker.vocab_size].double()
    p = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = torch.sort(p, dim=-1, descending=True)
    return p, sorted_p, order


@pytest.mark.parametrize(("head", "temperature"), [("chunked", 1.0), ("chunked", 0.7), ("full", 1.0),
                                                    ("full", 2.0)])
def test_targets_equal_dense_reference(sharp_teacher, documents, head, temperature) -> None:
    worker = make_worker(sharp_teacher, head=head, temperature=temperature, sparsify_chunk=37)
    assert worker.head == head
    windows = [w[2] for w in worker.tokenize(documents[:10])]
    assert len({len(w) for w in windows}) > 3, "want padded batches of mixed lengths"
    targets = worker.targets_for(windows)
    compared = 0
    for ids, (top_ids, probs, tail) in zip(windows, targets, strict=True):
        p, sorted_p, order = dense_reference(worker, ids, temperature)
        assert top_ids.shape == (len(ids), K) and probs.dtype == np.float32 and tail.shape == (len(ids),)
        top_ids_t, probs_t = torch.from_numpy(top_ids), torch.from_numpy(probs).double()
        # each stored probability is the true probability of the id stored with it ...
        torch.testing.assert_close(p.gather(1, top_ids_t), probs_t, atol=2e-6, rtol=1e-5)
        # ... they are the k largest, in order, and the tail is the rest of the mass
        torch.testing.assert_close(probs_t, sorted_p[:, :K], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(tail).double(), 1 - sorted_p[:, :K].sum(-1), atol=2e-6,
                                   rtol=1e-5)
        # ids equal the reference's wherever a probability is not within rounding of its neighbours
        gaps = sorted_p[:, : K + 1].diff(dim=-1).abs()
        clear = torch.ones(len(ids), K, dtype=torch.bool)
        clear[:, 1:] &= gaps[:, : K - 1] > 1e-5
        clear &= gaps[:, :K] > 1e-5
        assert torch.equal(top_ids_t[clear], order[:, :K][clear])
        compared += int(clear.sum())
    assert compared > 0.75 * sum(len(w) for w in windows) * K  # the check above was not vacuous


def test_full_and_chunked_heads_give_the_same_targets(sharp_teacher, documents) -> None:
    windows = [w[2] for w in make_worker(sharp_teacher).tokenize(documents[:6])]
    a = make_worker(sharp_teacher, head="full").targets_for(windows)
    b = make_worker(sharp_teacher, head="chunked", batch_tokens=MAX_LEN).targets_for(windows)  # unpadded
    for (ia, pa, ta), (ib, pb, tb) in zip(a, b, strict=True):
        np.testing.assert_allclose(pa, pb, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(ta, tb, atol=2e-6, rtol=1e-5)
        assert (ia == ib).mean() > 0.99


@pytest.mark.parametrize("seed", range(8))
def test_length_batches_cover_every_window_once(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 80, size=int(rng.integers(1, 60))).tolist()
    budget = int(rng.integers(60, 400))
    batches = length_batches(lengths, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= budget
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first: little padding
    windows = [list(rng.integers(1, 100, size=n)) for n in lengths]
    for rows in batches:
        batch = make_batch(windows, rows, pad_id=0)
        mask = batch.attention_mask.bool()
        assert batch.input_ids.shape[1] == max(lengths[i] for i in rows)
        assert batch.input_ids[mask].tolist() == [t for i in rows for t in windows[i]]
        assert (batch.input_ids[~mask] == 0).all() and batch.tokens == sum(lengths[i] for i in rows)


def test_every_token_gets_exactly_one_target(tiny_teacher, documents, tmp_path) -> None:
    worker = make_worker(tiny_teacher, batch_tokens=150)
    windows = worker.tokenize(documents)
    targets = worker.targets_for([w[2] for w in windows])
    assert [len(t[0]) for t in targets] == [len(w[2]) for w in windows]
    result = worker.capture_windows(str(tmp_path), unit_key(3), windows)
    assert result["tokens"] == result["shard"]["tokens"] == sum(len(w[2]) for w in windows)
    assert result["shard"]["rows"] == len(windows)
    assert os.path.exists(completion_url(str(tmp_path), 3))
    assert set(result["timings"]) == {"device_s", "write_s"}
    assert worker.bare_forward([w[2] for w in windows]) == result["tokens"]  # the benchmark's baseline


def test_long_document_is_split_into_windows(tiny_teacher) -> None:
    assert cut_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    worker = make_worker(tiny_teacher)
    doc = Document.from_text("The quick brown fox jumps over the lazy dog. " * 40)
    full = worker.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    assert len(full) > 3 * MAX_LEN
    windows = worker.tokenize([doc])
    assert [w[1] for w in windows] == list(range(-(-len(full) // MAX_LEN)))
    assert all(w[0] == doc.id for w in windows)
    assert all(len(w[2]) == MAX_LEN for w in windows[:-1]) and 0 < len(windows[-1][2]) <= MAX_LEN
    assert [t for w in windows for t in w[2]] == full


def test_empty_documents_produce_no_windows(tiny_teacher) -> None:
    assert cut_windows([], 8) == []
    worker = make_worker(tiny_teacher)
    empty, text = Document.from_text(""), Document.from_text("Some text for one window.")
    assert worker.tokenize([empty]) == []
    assert [w[0] for w in worker.tokenize([empty, text, empty])] == [text.id]


def test_two_calls_in_flight_write_what_serial_calls_write(tiny_teacher, documents, tmp_path) -> None:
    worker = make_worker(tiny_teacher, batch_tokens=256)
    units = [documents[i : i + 4] for i in range(0, 16, 4)]
    for u, docs in enumerate(units):
        worker.capture_documents(str(tmp_path / "serial"), unit_key(u), docs)
    seen = set()

    def call(u: int) -> None:
        seen.add(threading.get_ident())
        worker.capture_documents(str(tmp_path / "parallel"), unit_key(u), units[u])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(call, range(len(units))))
    serial, parallel = read_completions(str(tmp_path / "serial")), read_completions(str(tmp_path / "parallel"))
    assert len(seen) == 2 and sorted(parallel) == list(range(len(units)))
    assert {u: s.sha256 for u, s in serial.items()} == {u: s.sha256 for u, s in parallel.items()}


def test_head_choice(tiny_teacher, monkeypatch) -> None:
    worker = make_worker(tiny_teacher)
    model, vocab = worker.model, worker.vocab_size
    assert worker.head == "chunked" and choose_head(model, "full", vocab) == "full"
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    assert choose_head(model, "auto", vocab) == "full"
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        choose_head(model, "chunked", vocab)
    monkeypatch.undo()
    forward = model.forward  # a model whose logits are not lm_head(decoder output)
    monkeypatch.setattr(model, "forward", lambda **kw: types.SimpleNamespace(logits=forward(**kw).logits * 2))
    assert choose_head(model, "auto", vocab) == "full"
    with pytest.raises(ConfigError, match="differs from its logits"):
        choose_head(model, "chunked", vocab)


def test_settings_are_validated(tiny_teacher) -> None:
    with pytest.raises(ConfigError, match="'head': Input should be 'auto', 'chunked' or 'full'"):
        TeacherSettings(teacher=tiny_teacher, k=4, temperature=1.0, max_length=8, batch_tokens=64, head="fast")
    with pytest.raises(ConfigError, match="threads_per_actor"):
        TeacherSettings(teacher=tiny_teacher, k=4, temperature=1.0, max_length=8, batch_tokens=64, threads_per_actor=0)


def test_device_map_without_accelerate_is_one_clear_error(tiny_teacher) -> None:
    pytest.importorskip("transformers")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"device_map='auto' needs the 'accelerate' package"):
            make_worker(tiny_teacher, device_map="auto")
    else:
        assert make_worker(tiny_teacher, device_map="auto").head == "chunked"


def test_sparsify_hidden_leaves_its_inputs_alone() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g)
    before = hidden.clone(), weight.clone()
    sparsify_hidden(hidden, weight, k=5, temperature=0.5, chunk_size=7)
    assert torch.equal(hidden, before[0]) and torch.equal(weight, before[1])


@pytest.mark.parametrize(("mode", "extra"), [("adaptive", {"threshold": 0.03}), ("sampled", {"draws": 32}),
                                             ("budget", {"mean_ids": 5.5}), ("hybrid", {"mean_ids": 5.5, "draws": 8})])
def test_adaptive_sampled_and_budget_shards_are_independent_of_batching(tiny_teacher, tiny_corpus, tmp_path, mode, extra):
    """Two workers that batch differently write identical shards (sampled draws are keyed per token)."""

    docs = read_documents(CorpusConfig(source=tiny_corpus, split="all"))[:4]
    shards = []
    for batch_tokens in (512, 96):
        worker = TeacherWorker(TeacherSettings(teacher=tiny_teacher, k=16, temperature=1.0, max_length=64,
                                               batch_tokens=batch_tokens, mode=mode, **extra))
        root = str(tmp_path / f"b{batch_tokens}")
        worker.capture_documents(root, unit_key(0), docs)
        with open(os.path.join(root, "shards", "unit-000000.parquet"), "rb") as f:
            shards.append(f.read())
    assert shards[0] == shards[1]
    decoded = parse_shard_bytes(shards[0], worker.codec, "unit 0")
    counts = decoded.num_ids
    if mode == "adaptive":  # the fewest ids reaching the threshold (the tiny teacher is flat: often k)
        reached = 1 - decoded.stored_tail >= 0.03 * (1 - 1e-3)
        assert (reached | (counts == 16)).all() and 1 < counts.mean() < 16
        smallest = np.where(decoded.ids >= 0, decoded.probs, np.inf).min(1)
        without_smallest = 1 - decoded.stored_tail - smallest
        assert (without_smallest[counts > 1] < 0.03 * 1.02).all()  # no shorter prefix would do
    elif mode == "budget":  # 5.5 ids per token over the unit, spread by one probability cut
        assert counts.sum() == round(5.5 * decoded.num_tokens) and counts.min() >= 1 and counts.max() <= 16
        assert counts.min() < counts.max()
    elif mode == "hybrid":  # budget's exact ids, then 8 draws from the rest of every token
        assert counts.sum() == round(5.5 * decoded.num_tokens) and counts.min() >= 1
        assert (decoded.counts.sum(1) == 8).all() and (decoded.tail == 0).all()
        np.testing.assert_allclose(decoded.probs.sum(1), 1, atol=1e-5)
        drawn_mass = np.where(decoded.counts > 0, decoded.probs, 0).sum(1)
        np.testing.assert_allclose(drawn_mass, decoded.stored_tail, rtol=1e-5)
    else:  # unique draws with counts / 32, summing to 1; the ghost bucket is empty
        np.testing.assert_allclose(decoded.probs.sum(1), 1, atol=1e-6)
        assert (decoded.tail == 0).all() and 1 < counts.mean() <= 32
