"""MiniPLM mode: a student trained with CE straight on a text corpus, with a tokenizer other than the teacher's.

The training run is real (2 Ray Train workers, DeepSpeed ZeRO-2 on CPU); the rest checks the config rules, the
logit-KD refusal of a foreign tokenizer, and the corpus rows against a slow reference tokenization.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from support import OTHER_VOCAB, text_corpus

from raydistill.config import TrainConfig
from raydistill.errors import ConfigError, ContractError
from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256, vocab_size_of
from raydistill.stages.train.run import finished_summary, run_training


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




def _student_dir(path, vocab_size: int, tokenizer: str | None = None) -> str:
    from raydistill.models.sizes import build_llama

    build_llama(vocab_size=vocab_size, hidden=16, layers=1, heads=2, max_positions=128).save_pretrained(path)
    if tokenizer is not None:
        load_tokenizer(tokenizer).save_pretrained(path)
    return str(path)


def test_corpus_mode_checks_the_student_on_the_driver(other_tokenizer, tmp_path):
    from raydistill.stages.train.checks import check_student
    from raydistill.stages.train.run import with_absolute_paths

    corpus = text_corpus(tmp_path / "c.jsonl", 4)
    small = _student_dir(tmp_path / "small", 300)
    with pytest.raises(ContractError, match=rf"vocab size 300, smaller than the {OTHER_VOCAB} ids of tokenizer"):
        run_training(TrainConfig(**corpus_settings(corpus, other_tokenizer, str(tmp_path / "o"),
                                                   student={"model": small})))
    own = _student_dir(tmp_path / "own", OTHER_VOCAB, other_tokenizer)  # its own tokenizer: no `tokenizer` needed
    check_student(with_absolute_paths(
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




