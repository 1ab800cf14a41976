"""A real 2-worker DeepSpeed ZeRO-2 run under Ray Train, streaming the captured shards."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
from support import capture_config

from raydistill.config import TrainConfig
from raydistill.errors import ConfigError
from raydistill.stages.train.run import run_training


def _config(shards: str, out: str, **overrides) -> TrainConfig:
    settings = dict(shards=shards, output=out, student={"size": "micro"}, seq_len=32, micro_batch_size=2,
                    steps=6, warmup_steps=1, log_every=2, checkpoint_every=3, num_workers=2, zero_stage=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_zero2_two_workers_train_and_export(captured, ray_session, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "student")
    summary = run_training(_config(captured, out))
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 2 * 2 * 32
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(float(r["kd"]) > 0 and float(r["ce"]) > 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "model"))
    ids = torch.tensor([tokenizer("The teacher runs once.")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape[-1] >= 384 and torch.isfinite(logits).all()
    assert json.load(open(os.path.join(out, "summary.json")))["params"] == summary["params"]


def test_seq_len_beyond_student_positions_is_refused(captured, tmp_path):
    with pytest.raises(ConfigError, match="seq_len 100000 is longer than the student's"):
        run_training(_config(captured, str(tmp_path / "s"), seq_len=100000))


def test_unknown_student_size_is_refused(captured, tmp_path):
    with pytest.raises(ConfigError, match="unknown student size 'huge'"):
        run_training(_config(captured, str(tmp_path / "s"), student={"size": "huge"}))


@pytest.fixture(scope="module")
def captures(captured, tiny_teacher, tiny_corpus, ray_session, tmp_path_factory):
    """Shard sets in each sparsification mode (top-k is the session's capture), made on first use."""
    from raydistill.stages.capture.run import run_capture

    made = {"topk": captured}

    def get(mode: str) -> str:
        if mode not in made:
            out = str(tmp_path_factory.mktemp(f"capture-{mode}"))
            extra = {"threshold": 0.05} if mode == "adaptive" else {"draws": 24, "mean_ids": 6} if mode == "hybrid" \
                else {"draws": 24}
            run_capture(capture_config(tiny_teacher, tiny_corpus, out, mode=mode, **extra), progress=False)
            made[mode] = out
        return made[mode]

    return get


@pytest.mark.parametrize(("stage", "offload", "mode"), [
    (1, False, "hybrid"), (3, False, "adaptive"),
    # offload: CI trains with it in test_checkpoint_globals (ZeRO-3); sampled: the demo's own tests
    pytest.param(2, True, "topk", marks=pytest.mark.extended)])
def test_other_zero_stages_offload_and_modes_train_and_export(captures, tmp_path, stage, offload, mode):
    """Each ZeRO stage trains on a shard set of a different sparsification mode (padded targets included)."""
    from transformers import AutoModelForCausalLM

    from raydistill.contracts.shards import read_manifest
    from raydistill.models.loading import count_parameters
    from raydistill.models.students import build_student

    shards = captures(mode)
    assert read_manifest(shards).sparsify.mode == mode
    out = tmp_path / f"zero{stage}"
    summary = run_training(_config(shards, str(out), zero_stage=stage, offload=offload, steps=4,
                                   checkpoint_every=0))
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # ZeRO-3 partitions gathered into whole weights
    assert count_parameters(model) == summary["params"] == count_parameters(build_student("micro", vocab_size=384))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4] and all(float(r["loss"]) > 0 for r in rows)
    assert all(float(r["kd"]) > 0 for r in rows)
    assert summary["loss_path"] == "fused"  # a Llama student's head is a plain linear layer
    assert (summary["attention"], summary["packing"]) == ("sdpa", "positions")  # CPU: no dense mask from us
    if stage == 3:  # the head's weight is gathered outside its module: the fused path must train alike
        logits_run = run_training(_config(shards, str(tmp_path / "logits"), zero_stage=stage, offload=offload, steps=4,
                                          checkpoint_every=0, fused_loss=False))
        assert logits_run["loss_path"] == "logits"
        with open(tmp_path / "logits" / "metrics.csv") as f:
            logits_rows = list(csv.DictReader(f))
        for fused, full in zip(rows, logits_rows, strict=True):
            assert float(fused["loss"]) == pytest.approx(float(full["loss"]), rel=1e-4)


def _student_dir_with_tokenizer(tmp_path, texts: list[str], vocab: int) -> str:
    from raydistill.models.sizes import build_llama
    from raydistill.models.tokenizers import train_tokenizer

    tok = train_tokenizer(texts, vocab_size=vocab)
    model = build_llama(vocab_size=len(tok), hidden=16, layers=1, heads=2, max_positions=128)
    path = tmp_path / f"student-{vocab}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_student_with_another_tokenizer_is_refused(captured, tmp_path):
    from raydistill.config import CorpusConfig
    from raydistill.errors import ContractError
    from raydistill.io.corpus import read_documents

    texts = [d.text for d in read_documents(CorpusConfig(split="heldout"))]
    other = _student_dir_with_tokenizer(tmp_path, texts, 600)  # larger vocab, other merges
    with pytest.raises(ContractError, match=r"tokenizer sha256 .* but the student's tokenizer is"):
        run_training(_config(captured, str(tmp_path / "s"), student={"model": other}))
    small = _student_dir_with_tokenizer(tmp_path, ["tiny"], 260)
    with pytest.raises(ContractError, match=r"student vocab size 2\d\d is smaller than the shard set.s teacher vocab 384"):
        run_training(_config(captured, str(tmp_path / "s2"), student={"model": small}))


def test_tail_prior_in_the_loss_trains(captured, ray_session, tmp_path):
    """tail_target: prior reads the set's tail model inside the loss (forward KL over the vocabulary)."""
    out = str(tmp_path / "prior")
    summary = run_training(_config(captured, out, tail_target="prior", steps=2, log_every=1, checkpoint_every=0))
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert summary["config"]["tail_target"] == "prior" and len(rows) == 2
    assert all(float(r["kd"]) > 0 and math.isfinite(float(r["loss"])) for r in rows)
    with pytest.raises(Exception, match="tail_target: prior works with loss forward_kl"):
        _config(captured, out, tail_target="prior", loss="tvd")
