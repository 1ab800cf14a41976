"""The capture's and the selection's driver-side checks, called directly: each refuses before anything is written.

Before issue #19 a teacher directory without ``config.json`` was found inside the Ray actors after
``plan.json``, ``tokenizer/`` and ``vocab.parquet`` had been written, and ``max_length`` beyond the
teacher's positions was captured silently (RoPE) or failed with an IndexError (GPT-2).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raydistill.config import CaptureConfig, SelectConfig
from raydistill.errors import ConfigError, ModelLoadError
from raydistill.models.loading import check_model, max_positions_of
from raydistill.stages.capture.checks import check_capture_inputs
from raydistill.stages.select.checks import check_select_inputs


def _capture(teacher, corpus, out, **kw) -> CaptureConfig:
    settings = {"num_actors": 1, "max_length": 64, **kw}
    return CaptureConfig(teacher=str(teacher), output=str(out), corpus={"source": corpus, "split": "all"}, **settings)


def test_a_teacher_without_config_json_is_refused_before_anything_is_written(tmp_path, tiny_teacher, tiny_corpus):
    tok_only = tmp_path / "tokenizer-only"
    tok_only.mkdir()
    for f in Path(tiny_teacher).glob("tokenizer*"):
        shutil.copy(f, tok_only)
    with pytest.raises(ModelLoadError, match=r"teacher '.*tokenizer-only' is not a model directory"):
        check_capture_inputs(_capture(tok_only, tiny_corpus, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (tok_only / "config.json").write_text((Path(tiny_teacher) / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"has a config\.json but no weights"):
        check_capture_inputs(_capture(tok_only, tiny_corpus, tmp_path / "out"))


def test_max_length_beyond_the_teachers_positions_is_refused(tmp_path, tiny_teacher, tiny_corpus):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match=r"max_length 512 is longer than the teacher's 256 positions .*"
                                          r"set max_length <= 256"):
        check_capture_inputs(_capture(tiny_teacher, tiny_corpus, tmp_path / "out", max_length=512))
    check_capture_inputs(_capture(tiny_teacher, tiny_corpus, tmp_path / "out", max_length=256))  # exactly: fine
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=384, n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(gpt2)
    assert max_positions_of(check_model(str(gpt2), what="teacher")) == 16  # n_positions
    with pytest.raises(ConfigError, match="max_length 64 is longer than the reference's 16 positions"):
        check_select_inputs(SelectConfig(teacher=tiny_teacher, reference=str(gpt2), output=str(tmp_path / "sel"),
                                         corpus={"source": tiny_corpus}, max_length=64, num_actors=1))
    assert not (tmp_path / "out").exists() and not (tmp_path / "sel").exists()


def test_an_output_inside_the_corpus_folder_is_refused_by_both(tmp_path, tiny_teacher, tiny_corpus):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_corpus, data / "docs.jsonl")
    with pytest.raises(ConfigError, match="lies inside the corpus folder"):
        check_capture_inputs(_capture(tiny_teacher, str(data), data / "shards"))
    with pytest.raises(ConfigError, match="lies inside the corpus folder"):
        check_select_inputs(SelectConfig(teacher=tiny_teacher, reference=tiny_teacher, output=str(data / "sel"),
                                         corpus={"source": str(data / "*.jsonl")}, num_actors=1))
