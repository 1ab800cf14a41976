"""Bad input gets one clear `error:` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import shutil

import pytest
from support import assert_one_error_line, run_cli, write_config


def test_missing_corpus_path(capsys, tmp_path, tiny_teacher):
    cfg = write_config(tmp_path, teacher=tiny_teacher, output=str(tmp_path / "out"),
                       corpus={"source": str(tmp_path / "nope" / "*.jsonl")})
    code, _, err = run_cli(capsys, "capture", cfg)
    assert_one_error_line(code, err, "matches no files", "nope")


def test_missing_model_directory(capsys, tmp_path, tiny_corpus):
    missing = str(tmp_path / "no-such-model")
    cfg = write_config(tmp_path, teacher=missing, output=str(tmp_path / "out"), corpus={"source": tiny_corpus})
    code, _, err = run_cli(capsys, "capture", cfg)
    assert_one_error_line(code, err, "no-such-model")


def test_invalid_model_directory(capsys, tmp_path, tiny_corpus):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "README.txt").write_text("hello")
    cfg = write_config(tmp_path, teacher=str(bad), output=str(tmp_path / "out"), corpus={"source": tiny_corpus})
    code, _, err = run_cli(capsys, "capture", cfg)
    assert_one_error_line(code, err, "not-a-model")


def test_broken_model_weights(capsys, tmp_path, tiny_teacher):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_teacher, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    code, _, err = run_cli(capsys, "eval", str(broken), "--max-documents", "2")
    assert_one_error_line(code, err, "broken")


def test_k_larger_than_vocab(capsys, tmp_path, tiny_teacher, tiny_corpus):
    cfg = write_config(tmp_path, teacher=tiny_teacher, output=str(tmp_path / "out"), corpus={"source": tiny_corpus},
                       k=1000)
    code, _, err = run_cli(capsys, "capture", cfg)
    assert_one_error_line(code, err, "k=1000", "384")


def test_unknown_config_key(capsys, tmp_path):
    cfg = write_config(tmp_path, teacher="x", output="y", top_k=5)
    code, _, err = run_cli(capsys, "capture", cfg)
    assert_one_error_line(code, err, "unknown key 'top_k'", "config.yaml")


def test_bad_override_and_missing_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", str(tmp_path / "missing.yaml"))
    assert_one_error_line(code, err, "config file not found")
    cfg = write_config(tmp_path, shards="s", output="o")
    code, _, err = run_cli(capsys, "train", cfg, "--set", "zero_stage=7")
    assert_one_error_line(code, err, "zero_stage", "0, 1, 2 or 3")


def test_missing_shard_set(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nothing"))
    assert_one_error_line(code, err, "nothing")








def test_select_with_a_missing_reference(capsys, tmp_path, tiny_teacher, tiny_corpus):
    missing = str(tmp_path / "no-such-reference")
    cfg = write_config(tmp_path, teacher=tiny_teacher, reference=missing, output=str(tmp_path / "out"),
                       corpus={"source": tiny_corpus})
    code, _, err = run_cli(capsys, "select", cfg)
    assert_one_error_line(code, err, "no-such-reference")


def test_select_config_key_typo(capsys, tmp_path, tiny_teacher):
    cfg = write_config(tmp_path, teacher=tiny_teacher, reference=tiny_teacher, output=str(tmp_path / "out"),
                       fractoin=0.3)
    code, _, err = run_cli(capsys, "select", cfg)
    assert code == 2 and "fractoin" in err and "Traceback" not in err


def test_train_on_a_corpus_with_a_kd_loss(capsys, tmp_path, tiny_teacher, tiny_corpus):
    cfg = write_config(tmp_path, corpus={"source": tiny_corpus}, tokenizer=tiny_teacher, loss="forward_kl",
                       output=str(tmp_path / "out"))
    code, _, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "loss: ce" in err and "Traceback" not in err


def test_old_command_names_are_aliases():
    from raydistill.cli import ALIASES, build_parser

    assert ALIASES == {"precompute": "capture", "eval": "evaluate"}
    parser = build_parser()
    for old, new in ALIASES.items():
        args = parser.parse_args([old, "x.yaml"] if new == "capture" else [old, "model-dir"])
        assert args.command == old  # cli.run maps it to the stage's name
        assert parser.parse_args([new, "x.yaml"] if new == "capture" else [new, "model-dir"]).command == new


@pytest.mark.parametrize(("override", "needles"), [
    ("k=[1,", ("'k'", "valid integer")),  # YAML cannot read it: taken as a string, refused by type
    ("corpus.source=a: b: c", ("corpus source 'a: b: c' matches no files",)),
    ("corpus.source=*.jsonl", ("corpus source '*.jsonl' matches no files",)),
    ("=3", ("override '=3' needs a key",)),
    ("corpus.=3", ("override 'corpus.=3' needs a key",)),
])
def test_overrides_yaml_cannot_read_are_one_line(capsys, monkeypatch, tmp_path, tiny_teacher, override, needles):
    cfg = write_config(tmp_path, teacher=tiny_teacher, output=str(tmp_path / "out"), corpus={"source": "default"})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a relative glob matches nothing here
    code, _, err = run_cli(capsys, "capture", cfg, "--set", override)
    assert_one_error_line(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_a_config_file_that_is_not_utf8_is_one_line(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"teacher: caf\xe9\n")
    code, _, err = run_cli(capsys, "capture", str(path))
    assert_one_error_line(code, err, "is not UTF-8 text", str(path))


@pytest.mark.parametrize(("output", "needles"), [
    ("{tmp}/a-file", ("is a file, not a directory",)),
    ("{tmp}/a-file/shards", ("lies under", "which is a file")),
    ("gs://bucket/shards", ("the gs:// filesystem needs a package that is not installed",)),
    ("nosuchfs://bucket/shards", ("use a local path or an fsspec URL",)),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(capsys, tmp_path, tiny_teacher, tiny_corpus,
                                                                      output, needles):
    (tmp_path / "a-file").write_text("not a directory")
    out = output.format(tmp=tmp_path)
    cfg = write_config(tmp_path, teacher=tiny_teacher, output=out, corpus={"source": tiny_corpus, "split": "all"})
    code, _, err = run_cli(capsys, "capture", cfg)
    assert_one_error_line(code, err, *needles)
    assert (tmp_path / "a-file").read_text() == "not a directory"
