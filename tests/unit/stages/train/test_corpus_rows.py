"""Corpus mode's rows without Ray: the config rules and the tokenized rows against a slow reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from support import OTHER_VOCAB, config_error, text_corpus

from raydistill.config import CorpusConfig, TrainConfig
from raydistill.errors import ConfigError
from raydistill.models.tokenizers import load_tokenizer


def test_corpus_config_rules():
    corpus = {"source": "refined.jsonl"}
    message = config_error(TrainConfig, corpus=corpus, tokenizer="tok", output="o", loss="forward_kl")
    assert "loss: ce" in message and "MiniPLM mode" in message and "shard set" in message
    assert "either shards or corpus" in config_error(TrainConfig, shards="s", corpus=corpus, tokenizer="tok", output="o",
                                                      loss="ce")
    assert "set a data source" in config_error(TrainConfig, output="o")
    assert "corpus needs a tokenizer" in config_error(TrainConfig, corpus=corpus, output="o", loss="ce")
    assert "online_teacher" in config_error(TrainConfig, corpus=corpus, tokenizer="tok", output="o", loss="forward_kl",
                                             online_teacher="t")
    assert "tokenizer is for corpus mode" in config_error(TrainConfig, shards="s", tokenizer="tok", output="o")
    with_student = TrainConfig(corpus=corpus, student={"model": "m"}, output="o", loss="ce")
    assert with_student.corpus_tokenizer == "m" and TrainConfig(shards="s", output="o").corpus_tokenizer is None

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
