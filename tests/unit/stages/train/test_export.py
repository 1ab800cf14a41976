"""``Trainer.export`` without DeepSpeed: ``model/`` appears whole or not at all, and a run whose export
crashed halfway is never taken for a finished one."""

from __future__ import annotations

import os

import pytest
import torch
from support import die_after_first_upload

from raydistill.config import TrainConfig
from raydistill.contracts.students import MODEL_DIR, read_summary, write_summary
from raydistill.io import storage
from raydistill.models.loading import load_causal_lm
from raydistill.models.students import build_student
from raydistill.models.tokenizers import train_tokenizer
from raydistill.stages.train import run as train_run
from raydistill.stages.train.trainer import Placement, Trainer

TEXTS = ["The teacher runs once, and many students learn from what it wrote down."] * 8


class Crash(Exception):
    """Stands in for a process dying mid-export."""


class _Source:
    """What export asks of a TrainingSource."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def save_tokenizer(self, dest: str) -> None:
        self.tokenizer.save_pretrained(dest)

    def summary(self) -> dict:
        return {"shards": "test", "shards_identity": "the-shards"}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def _trainer(tokenizer, shards: str, output: str, seed: int = 0) -> Trainer:
    """A rank-0 Trainer with a tiny student and no engine (export needs neither DeepSpeed nor Ray)."""
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = TrainConfig(shards=shards, output=output, student={"size": "micro"}, steps=2, zero_stage=2)
    trainer.place = Placement(rank=0, world=1, device=torch.device("cpu"), bf16=False)
    trainer.model = build_student("micro", vocab_size=len(tokenizer), seed=seed)
    trainer.source = _Source(tokenizer)
    trainer.tokens_seen = 0
    trainer.fused, trainer.attention, trainer.by_positions = True, "sdpa", True
    return trainer


def _model_files(model_dir: str) -> dict[str, bytes]:
    fs, root = storage.filesystem(model_dir)
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def _crash_after_first_file(monkeypatch, model) -> None:
    def save_pretrained(directory, **kwargs):  # the config lands, then the writer dies before the weights
        model.config.save_pretrained(directory)
        raise Crash

    monkeypatch.setattr(model, "save_pretrained", save_pretrained)


def test_local_export_crash_keeps_the_earlier_model(tokenizer, tmp_path, monkeypatch):
    out = str(tmp_path / "student")
    _trainer(tokenizer, str(tmp_path / "shards"), out).export()
    model_dir = os.path.join(out, MODEL_DIR)
    first, summary = _model_files(model_dir), read_summary(out)
    assert storage.dir_complete(model_dir) and "model.safetensors" in first
    assert load_causal_lm(model_dir).config.vocab_size == len(tokenizer)

    again = _trainer(tokenizer, str(tmp_path / "shards"), out, seed=1)
    _crash_after_first_file(monkeypatch, again.model)
    with pytest.raises(Crash):
        again.export()
    assert _model_files(model_dir) == first and storage.dir_complete(model_dir)
    assert sorted(os.listdir(out)) == ["model", "summary.json"]  # no model.tmp-* beside it
    assert read_summary(out) == summary


def test_object_store_export_crash_is_not_a_finished_run(tokenizer, tmp_path, monkeypatch):
    out = "memory://export-test/student"
    shards = str(tmp_path / "shards")
    monkeypatch.setattr(train_run, "shard_set_identity", lambda _: "the-shards")
    trainer = _trainer(tokenizer, shards, out)
    trainer.export()
    write_summary(out, {**read_summary(out), "wall_seconds": 1.0})  # what the driver adds once the run is done
    assert train_run.finished_summary(trainer.cfg) is not None

    fs, _ = storage.filesystem(out)
    uploads = die_after_first_upload(monkeypatch, fs, Crash)
    with pytest.raises(Crash):
        _trainer(tokenizer, shards, out, seed=1).export()
    model_dir = storage.join(out, MODEL_DIR)
    assert len(uploads) == 1 and not storage.dir_complete(model_dir)
    assert train_run.finished_summary(trainer.cfg) is None  # the old summary.json no longer vouches for model/
    fs.rm("/export-test", recursive=True)
