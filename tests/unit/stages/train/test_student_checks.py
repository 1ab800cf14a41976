"""Students of any shape in ``raydistill train``: refused on the driver before any worker (``check_student``),
built by every worker through ``models/students.py``, recorded so that another shape is another run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from raydistill.config import StudentConfig, TrainConfig
from raydistill.contracts.students import read_summary, write_summary
from raydistill.errors import ConfigError
from raydistill.models.students import build_student
from raydistill.models.tokenizers import train_tokenizer
from raydistill.stages.train import run as train_run
from raydistill.stages.train.checks import check_student
from raydistill.stages.train.trainer import Placement, Trainer

TEXTS = ["The teacher runs once, and many students learn from what it wrote down."] * 8


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TEXTS, vocab_size=300).save_pretrained(path)
    return str(path)


def _corpus_run(tokenizer_dir: str, tmp_path, student, **settings) -> TrainConfig:
    return TrainConfig(corpus={"source": "default"}, tokenizer=tokenizer_dir, loss="ce",
                       output=str(tmp_path / "out"), student=student, **settings)


def _config_dir(path, vocab_size: int = 300, **settings) -> str:
    LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                vocab_size=vocab_size, max_position_embeddings=128, **settings).save_pretrained(path)
    return str(path)


def test_check_student_refuses_bad_students_before_any_worker(tokenizer_dir, tmp_path):
    check_student(_corpus_run(tokenizer_dir, tmp_path, {"family": "qwen2", "hidden": 64, "layers": 2, "heads": 4,
                                                        "kv_heads": 2}))
    cases = [
        ({"family": "llama", "hidden": 500, "layers": 2, "heads": 8}, {},
         r"^student\.hidden 500 is not divisible by student\.heads 8"),
        ({"family": "llama", "hidden": 64, "layers": 2, "heads": 4}, {"seq_len": 1024},
         r"^seq_len 1024 is longer than the student's 512 positions; .*student\.max_positions >= 1024"),
        ({"config": _config_dir(tmp_path / "small-vocab", vocab_size=200)}, {},
         rf"^student\.config '.*small-vocab' has vocab size 200, smaller than the 300 ids of tokenizer "
         rf"'{tokenizer_dir}'; set vocab_size >= 300 in its config\.json"),
        ({"teacher_fraction": {"depth": 0.5}}, {}, r"^student\.teacher_fraction needs the teacher"),
    ]
    for student, settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_student(_corpus_run(tokenizer_dir, tmp_path, student, **settings))


class _Source:
    """What building the student and exporting it ask of a TrainingSource."""

    def __init__(self, tokenizer_dir: str, teacher: str | None = None):
        from raydistill.models.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.vocab_size, self.teacher = len(self.tokenizer), teacher

    def save_tokenizer(self, dest: str) -> None:
        self.tokenizer.save_pretrained(dest)

    def summary(self) -> dict:
        return {"shards": "test", "shards_identity": "the-shards"}


def _trainer(cfg: TrainConfig, source: _Source) -> Trainer:
    """A rank-0 Trainer without an engine: what building and exporting the student need."""
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.source, trainer.tokens_seen = cfg, source, 0
    trainer.fused, trainer.attention, trainer.by_positions = True, "sdpa", True
    trainer.place = Placement(rank=0, world=1, device=torch.device("cpu"), bf16=False)
    trainer.model = trainer._student()
    return trainer


def test_workers_build_the_student_through_the_spec_with_the_sources_teacher(tokenizer_dir, tmp_path):
    teacher = build_student({"family": "llama", "hidden": 32, "layers": 4, "heads": 2}, 300, seed=4)
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = TrainConfig(shards=str(tmp_path / "s"), output=str(tmp_path / "o"), seed=3,
                      student={"teacher_fraction": {"depth": 0.5, "init": "teacher"}})
    model = _trainer(cfg, _Source(tokenizer_dir, teacher=str(tmp_path / "teacher"))).model  # the manifest's
    assert len(model.model.layers) == 2
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[3].self_attn.q_proj.weight)
    mistral = StudentConfig(family="mistral", hidden=32, layers=1, heads=4, kv_heads=2)
    shaped = _trainer(cfg.model_copy(update={"student": mistral}), _Source(tokenizer_dir))
    assert shaped.model.config.model_type == "mistral" and shaped.model.config.vocab_size == 300


def test_student_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(shards="s", output="o", student={"teacher_fraction": {"teacher": "./t#model.gguf"}})
    assert train_run.with_absolute_paths(cfg).student.teacher_fraction.teacher == f"{tmp_path}/t#model.gguf"
    cfg = TrainConfig(shards="s", output="o", student={"config": "./arch"})
    assert train_run.with_absolute_paths(cfg).student.config == f"{tmp_path}/arch"


def test_a_config_directory_edited_after_a_run_is_another_run(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_run, "shard_set_identity", lambda _: "the-shards")
    config_dir = _config_dir(tmp_path / "arch")
    cfg = TrainConfig(shards=str(tmp_path / "s"), output=str(tmp_path / "o"), student={"config": config_dir})
    _trainer(cfg, _Source(tokenizer_dir)).export()
    write_summary(cfg.output, {**read_summary(cfg.output), "wall_seconds": 1.0})  # what the driver adds
    assert train_run.finished_summary(cfg) is not None
    config = json.loads((tmp_path / "arch" / "config.json").read_text())
    (tmp_path / "arch" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert train_run.finished_summary(cfg) is None
    other_shape = cfg.model_copy(update={"student": StudentConfig(family="llama", hidden=32, layers=2, heads=2)})
    assert train_run.finished_summary(other_shape) is None
