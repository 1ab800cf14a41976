"""MiniPLM mode: a student trained with CE straight on a text corpus, with a tokenizer other than the teacher's.

The training run is real (2 Ray Train workers, DeepSpeed ZeRO-2 on CPU); the rest checks the config rules, the
logit-KD refusal of a foreign tokenizer, and the corpus rows against a slow reference tokenization.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import write_jsonl_corpus

from raydistill.config import CorpusConfig, TrainConfig, build_config
from raydistill.errors import ConfigError, ContractError
from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256, vocab_size_of
from raydistill.stages.train.run import finished_summary, run_training

OTHER_VOCAB = 512  # the teacher's tokenizer (conftest.tiny_teacher) has 384 ids


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> str:
    """A second byte-level BPE tokenizer with another vocabulary size, trained on the embedded corpus."""
    from raydistill.io.corpus import default_documents
    from raydistill.models.tokenizers import train_tokenizer

    tokenizer = train_tokenizer([d.text for d in default_documents()[:300]], vocab_size=OTHER_VOCAB)
    out = tmp_path_factory.mktemp("other-tokenizer")
    tokenizer.save_pretrained(out)
    return str(out)


def text_corpus(path, num_docs: int = 36) -> str:
    """A small jsonl corpus of real documents of varied lengths (the shape `raydistill select` writes)."""
    return write_jsonl_corpus(path, num_docs, base_chars=300, step_chars=50)


def corpus_settings(corpus: str, tokenizer: str | None, out: str, **overrides) -> dict:
    settings = dict(corpus={"source": corpus, "split": "all"}, tokenizer=tokenizer, output=out,
                    student={"size": "micro"}, loss="ce", seq_len=32, micro_batch_size=2, steps=6, warmup_steps=1,
                    lr=1e-2, log_every=1, checkpoint_every=0, num_workers=2, zero_stage=2)
    settings.update(overrides)
    return settings


def test_ce_on_a_text_corpus_with_another_tokenizer_trains_and_exports(ray_session, other_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from raydistill.stages.train.corpus_rows import corpus_identity

    corpus = text_corpus(tmp_path / "refined.jsonl")
    out = tmp_path / "student"
    cfg = TrainConfig(**corpus_settings(corpus, other_tokenizer, str(out)))
    summary = run_training(cfg)

    tokenizer = load_tokenizer(other_tokenizer)
    assert vocab_size_of(tokenizer) == OTHER_VOCAB
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size == OTHER_VOCAB  # built for the corpus tokenizer, not the teacher's 384
    exported = load_tokenizer(str(out / "model"))
    assert tokenizer_sha256(exported) == tokenizer_sha256(tokenizer) == summary["tokenizer_sha256"]
    ids = torch.tensor([exported("Students learn from text.", add_special_tokens=False)["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(float(r["kd"]) == 0 and float(r["ce"]) == float(r["loss"]) for r in rows)

    written = json.loads((out / "summary.json").read_text())
    assert written["data_identity"] == summary["data_identity"] == corpus_identity(cfg.corpus, tokenizer)
    assert "refined.jsonl" in written["corpus"] and "shards_identity" not in written
    assert written["steps"] == 6 and written["tokens"] == 6 * 2 * 2 * 32
    assert written["config"]["tokenizer"] == other_tokenizer  # absolute already: recorded as given

    assert finished_summary(cfg) == summary  # the same run on the same corpus is reused
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "A document added to the corpus after training."}) + "\n")
    assert finished_summary(cfg) is None  # ... and not once the corpus has changed


def _config_error(**settings) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, settings, "in test")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_corpus_config_rules():
    corpus = {"source": "refined.jsonl"}
    message = _config_error(corpus=corpus, tokenizer="tok", output="o", loss="forward_kl")
    assert "loss: ce" in message and "MiniPLM mode" in message and "shard set" in message
    assert "either shards or corpus" in _config_error(shards="s", corpus=corpus, tokenizer="tok", output="o",
                                                      loss="ce")
    assert "set a data source" in _config_error(output="o")
    assert "corpus needs a tokenizer" in _config_error(corpus=corpus, output="o", loss="ce")
    assert "online_teacher" in _config_error(corpus=corpus, tokenizer="tok", output="o", loss="forward_kl",
                                             online_teacher="t")
    assert "tokenizer is for corpus mode" in _config_error(shards="s", tokenizer="tok", output="o")
    with_student = TrainConfig(corpus=corpus, student={"model": "m"}, output="o", loss="ce")
    assert with_student.corpus_tokenizer == "m" and TrainConfig(shards="s", output="o").corpus_tokenizer is None


def _student_dir(path, vocab_size: int, tokenizer: str | None = None) -> str:
    from raydistill.models.loading import build_llama

    build_llama(vocab_size=vocab_size, hidden=16, layers=1, heads=2, max_positions=128).save_pretrained(path)
    if tokenizer is not None:
        load_tokenizer(tokenizer).save_pretrained(path)
    return str(path)


def test_corpus_mode_checks_the_student_on_the_driver(other_tokenizer, tmp_path):
    from raydistill.stages.train.run import student_config_and_tokenizer_check, with_absolute_paths

    corpus = text_corpus(tmp_path / "c.jsonl", 4)
    small = _student_dir(tmp_path / "small", 300)
    with pytest.raises(ContractError, match=rf"vocab size 300, smaller than the {OTHER_VOCAB} ids of tokenizer"):
        run_training(TrainConfig(**corpus_settings(corpus, other_tokenizer, str(tmp_path / "o"),
                                                   student={"model": small})))
    own = _student_dir(tmp_path / "own", OTHER_VOCAB, other_tokenizer)  # its own tokenizer: no `tokenizer` needed
    student_config_and_tokenizer_check(with_absolute_paths(
        TrainConfig(**corpus_settings(corpus, None, str(tmp_path / "o"), student={"model": own}))))
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "Too short to fill"}) + "\n" + json.dumps({"text": "one sequence."}) + "\n")
    with pytest.raises(ConfigError, match=r"holds \d+ tokens \(2 documents\), fewer than one sequence of seq_len 32"):
        run_training(TrainConfig(**corpus_settings(str(tiny), other_tokenizer, str(tmp_path / "o"))))


def test_logit_kd_refuses_a_student_with_another_tokenizer_and_names_both(captured, other_tokenizer, tmp_path):
    from raydistill.contracts.shards import read_manifest

    manifest = read_manifest(captured)
    student = _student_dir(tmp_path / "student", OTHER_VOCAB, other_tokenizer)  # vocab is large enough
    cfg = TrainConfig(shards=captured, output=str(tmp_path / "o"), student={"model": student}, seq_len=32)
    with pytest.raises(ContractError) as err:
        run_training(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert manifest.teacher.name_or_path in message and manifest.tokenizer.sha256[:12] in message
    assert student in message and tokenizer_sha256(load_tokenizer(other_tokenizer))[:12] in message
    assert "logit KD needs the teacher's tokenizer" in message
    assert "`corpus:`" in message and "`loss: ce`" in message


def test_corpus_tokens_match_a_slow_reference_and_are_deterministic(other_tokenizer, tiny_teacher, tmp_path):
    from raydistill.io.corpus import read_documents
    from raydistill.stages.train.corpus_rows import CorpusTokens, corpus_identity
    from raydistill.stages.train.reader import PackedReader

    path = text_corpus(tmp_path / "c.jsonl", 12)
    with open(path, "a") as f:  # one-token documents: nothing to predict, skipped and counted
        f.write(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    corpus = CorpusConfig(source=path, split="all")
    tokenizer = load_tokenizer(other_tokenizer)
    seq_len, per_shard = 16, 5
    tokens = CorpusTokens(corpus, tokenizer, seq_len=seq_len, docs_per_shard=per_shard)

    reference_rows, reference_docs, short = [], [], 0
    for doc in read_documents(corpus):
        ids = tokenizer.encode(doc.text, add_special_tokens=False)
        if len(ids) < 2:
            short += 1
            continue
        reference_docs.append(doc.id)
        for start in range(0, len(ids), seq_len + 1):
            reference_rows.append((doc.id, ids[start : start + seq_len + 1]))
    assert short == tokens.skipped_short == 2 and tokens.num_documents == len(reference_docs) == 12
    assert len(tokens) == math.ceil(12 / per_shard) and tokens.target_width == 0
    assert tokens.vocab_size == OTHER_VOCAB

    rows = []
    for i in range(len(tokens)):
        shard = tokens.read_shard(i)
        np.testing.assert_array_equal(tokens.row_lengths(i), shard.row_lengths)
        assert shard.ids.shape == (shard.num_tokens, 0) and shard.probs.shape == (shard.num_tokens, 0)
        assert not shard.tail.any() and shard.tokens.dtype == np.int64
        rows += [(shard.doc_ids[r], shard.tokens[shard.offsets[r] : shard.offsets[r + 1]].tolist())
                 for r in range(len(shard))]
    assert rows == reference_rows
    assert tokens.num_tokens == sum(len(r) for _, r in reference_rows)

    again = CorpusTokens(corpus, load_tokenizer(other_tokenizer), seq_len=seq_len, docs_per_shard=per_shard)
    assert again.identity() == tokens.identity() == corpus_identity(corpus, tokenizer)
    for i in range(len(tokens)):
        a, b = tokens.read_shard(i), again.read_shard(i)
        assert a.doc_ids == b.doc_ids and np.array_equal(a.offsets, b.offsets) and np.array_equal(a.tokens, b.tokens)
    teacher_tokens = CorpusTokens(corpus, load_tokenizer(tiny_teacher), seq_len=seq_len)
    assert teacher_tokens.identity() != tokens.identity()  # same documents, other tokenizer

    reader = PackedReader(tokens, seq_len=seq_len, micro_batch_size=3, grad_accum=1, rank=0, world_size=1, seed=0)
    batch = reader.micro_batch(0, 0)
    assert batch.target_ids.shape == (3, seq_len, 0) and not batch.target_mask.any()
    same_piece = batch.segment_ids[:, :-1] == batch.segment_ids[:, 1:]
    assert torch.equal(batch.labels[:, :-1][same_piece], batch.input_ids[:, 1:][same_piece])


def test_corpus_without_usable_documents_is_refused(other_tokenizer, tmp_path):
    from raydistill.stages.train.corpus_rows import CorpusTokens

    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", "b", "c")))
    with pytest.raises(ConfigError, match="no document of 2 or more tokens"):
        CorpusTokens(CorpusConfig(source=str(path), split="all"), load_tokenizer(other_tokenizer), seq_len=8)
