"""The study tools' own logic: the noisy mixture is what it says, and the capture-default study scores
retention and picks its winner by the rule its docstring states."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    sys.path.insert(0, str(ROOT / "tools"))  # the tools import each other, as `python tools/x.py` lets them
    try:
        spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "tools"))


@pytest.fixture(scope="module")
def noisy():
    return load_tool("noisy_corpus")


CLEAN = [f"Document {i}: the quick brown fox jumps over the lazy dog, line {i}.\nSecond line {i} of text." * 3
         for i in range(70)]


def test_mixture_is_deterministic_with_the_asked_share_of_noise(noisy):
    rows = noisy.noisy_mixture(CLEAN, 0.3, seed=0)
    assert rows == noisy.noisy_mixture(CLEAN, 0.3, seed=0)
    assert rows != noisy.noisy_mixture(CLEAN, 0.3, seed=1)
    kinds = Counter(r["noise"] for r in rows)
    assert kinds[None] == len(CLEAN) and len(rows) == 100  # 30 noise documents: 30% of the mixture
    assert {kinds[k] for k in noisy.NOISE_KINDS} == {10}
    assert {r["text"] for r in rows if r["noise"] is None} == set(CLEAN)
    assert len({r["id"] for r in rows}) == len(rows)  # content hashes, all distinct
    from raydistill.io.documents import document_id

    assert all(r["id"] == document_id(r["text"]) for r in rows)


def test_noise_kinds_look_like_their_names(noisy):
    rows = noisy.noisy_mixture(CLEAN, 0.3, seed=0)
    clean_words = Counter(w for t in CLEAN for w in t.split())
    for r in rows:
        if r["noise"] == "shuffled":  # the words of one clean document, reordered
            assert any(Counter(r["text"].split()) == Counter(t.split()) for t in CLEAN)
            assert r["text"] not in CLEAN
        elif r["noise"] == "boilerplate":
            lines = [line for line in r["text"].splitlines() if not line.startswith("Page ") and not line.isdigit()]
            assert set(lines) <= set(noisy.BOILERPLATE) and len(set(lines)) == 3
            assert Counter(lines).most_common(1)[0][1] >= 2  # the same lines over and over
        elif r["noise"] == "random":
            assert sum(w in clean_words for w in r["text"].split()) < 0.1 * len(r["text"].split())
        if r["noise"]:  # lengths taken from clean documents
            assert 0.5 * min(map(len, CLEAN)) <= len(r["text"]) <= 2 * max(map(len, CLEAN))


def test_mixture_rejects_a_fraction_outside_0_1(noisy):
    with pytest.raises(ValueError, match="noise_fraction"):
        noisy.noisy_mixture(CLEAN, 1.0)


def test_mixture_file_reads_back_as_a_corpus(noisy, tmp_path):
    from raydistill.config import CorpusConfig
    from raydistill.io.corpus import read_documents

    rows = noisy.noisy_mixture(CLEAN[:20], 0.3, seed=0)
    path = tmp_path / "mix.jsonl"
    noisy.write_mixture(str(path), rows)
    docs = read_documents(CorpusConfig(source=str(path), split="all"))
    assert sorted(d.id for d in docs) == sorted(r["id"] for r in rows)  # the ids the study keys noise by


@pytest.fixture(scope="module")
def defaults():
    return load_tool("bench_defaults")


def candidate_run(kd: list[float], total_bytes: int = 5000, tokens: int = 100):
    class Manifest:
        total_bytes, total_tokens = 0, 0

    m = Manifest()
    m.total_bytes, m.total_tokens = total_bytes, tokens
    rows = [{"kind": "kd", "seed": s, "loss": loss, "agreement": 0.2 + s / 10, "ece": 0.01, "tokens": 100}
            for s, loss in enumerate(kd)]
    return {"manifest": m, "rows": rows, "capture_seconds": 1.0}


def test_retention_against_shared_baselines(defaults):
    baseline = {"ce": [7.0, 7.1], "online_kd": [6.0, 6.2]}
    row = defaults.score("sampled64", candidate_run([6.1, 6.3]), baseline, tv=0.5)
    assert row["retention_per_seed"] == [0.9, round(0.8 / 0.9, 3)]
    assert row["retention"] == round((7.05 - 6.2) / (7.05 - 6.1), 3)  # of the two seeds' means
    assert row["seed_spread"] == 0.2 and row["gain_over_3x_spread"] is True  # 0.95 >= 3 * 0.2
    noisy_seeds = defaults.score("sampled64", candidate_run([6.1, 6.5]), baseline, tv=0.5)
    assert noisy_seeds["seed_spread"] == 0.4 and noisy_seeds["gain_over_3x_spread"] is False
    assert row["bytes_per_token"] == 50.0 and row["agreement"] == 0.25


def test_winner_is_the_cheapest_that_retains_enough(defaults):
    rows = [{"candidate": "a", "retention": 0.95, "gain_over_3x_spread": True, "bytes_per_token": 60},
            {"candidate": "b", "retention": 0.91, "gain_over_3x_spread": True, "bytes_per_token": 40},
            {"candidate": "c", "retention": 0.50, "gain_over_3x_spread": True, "bytes_per_token": 10},
            {"candidate": "d", "retention": 0.99, "gain_over_3x_spread": False, "bytes_per_token": 5}]
    assert defaults.winner(rows) == "d"  # the 3x test is the shared baselines': reported, not gated on
    assert defaults.winner(rows[:3]) == "b"
    assert defaults.winner([r | {"retention": 0.5 + i / 10} for i, r in enumerate(rows[:3])]) == "c"  # none: best


def test_every_candidate_is_a_valid_capture(defaults):
    from raydistill.config import CaptureConfig

    for name, settings in defaults.CANDIDATES.items():
        cfg = CaptureConfig(teacher="t", output="o", **settings)
        assert cfg.targets.mode == settings["mode"], name
    assert {s["mode"] for s in defaults.CANDIDATES.values()} == {"budget", "topk", "sampled", "hybrid"}
    assert json.dumps(defaults.CANDIDATES)  # the JSON line carries them


def test_epochs_become_steps_that_read_the_capture_that_many_times():
    quality = load_tool("bench_quality")
    train = {"num_workers": 2, "micro_batch_size": 4, "seq_len": 128}
    assert quality.steps_for_epochs(1, 136_432, train) == 133  # SmolLM2's 80 documents, 1,024 tokens a step
    assert quality.steps_for_epochs(2, 136_432, train) == 266
    assert quality.steps_for_epochs(1, 136_432, {**train, "grad_accum": 2}) == 67
    assert quality.steps_for_epochs(1, 10, train) == 1  # never 0 steps


def test_select_students_are_named_sizes_or_json_shapes():
    select = load_tool("bench_select")
    assert select.student_spec("tiny") == ({"size": "tiny"}, "tiny")
    spec, name = select.student_spec('{"name": "h32", "family": "llama", "hidden": 32, "layers": 1, "heads": 2}')
    assert name == "h32" and spec == {"family": "llama", "hidden": 32, "layers": 1, "heads": 2}
    assert select.student_spec('{"family": "qwen2", "hidden": 64, "layers": 2}')[1] == "qwen2-h64-l2"


def test_select_counts_the_students_tokens_as_the_corpus_reader_does(tmp_path):
    from raydistill.io import storage
    from raydistill.models.tokenizers import load_tokenizer, train_tokenizer

    select = load_tool("bench_select")
    texts = [f"the {w} fox jumps over the lazy dog {i} times" for i, w in enumerate(["quick", "slow", "red"] * 20)]
    train_tokenizer(texts, vocab_size=300).save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "c.jsonl"
    storage.atomic_write_text(str(corpus), "".join(json.dumps({"id": str(i), "text": t}) + "\n"
                                                  for i, t in enumerate(texts)))
    tok = load_tokenizer(str(tmp_path / "tok"))
    expected = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert select.corpus_tokens(str(corpus), str(tmp_path / "tok")) == expected > len(texts)


@pytest.fixture(scope="module")
def bench_train():
    return load_tool("bench_train")


def test_random_batches_are_packed_like_the_readers(bench_train):
    """bench_train's random mode: documents that restart their positions, labels that stay inside a document,
    distinct target ids per token, targets only where a label is."""
    import torch

    args = bench_train.parse_args(["--vocab", "151936", "--tokens", "1024", "--k", "64"])
    assert args.micro_batch == 8 and args.seq_len == 128
    p = bench_train.random_batch(args, 151_936, torch.Generator().manual_seed(0))
    b = p.batch
    starts = b.position_ids == 0
    assert torch.equal(starts[:, 1:], b.segment_ids[:, 1:] != b.segment_ids[:, :-1]) and starts[:, 0].all()
    inside = b.segment_ids[:, 1:] == b.segment_ids[:, :-1]
    assert torch.equal(b.labels[:, :-1][inside], b.input_ids[:, 1:][inside]) and (b.labels[:, :-1][~inside] == -100).all()
    ids = b.target_ids.flatten(0, 1)
    assert all(len(set(row.tolist())) == 64 for row in ids[:50]) and int(ids.max()) < 151_936
    assert torch.equal(b.target_mask, b.labels != -100)
    torch.testing.assert_close(b.target_probs.sum(-1) + b.tail, torch.ones_like(b.tail))


def test_tokens_must_fill_whole_rows(bench_train):
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--vocab", "100", "--tokens", "1000"])
