"""Corpus: the embedded default corpus, the deterministic split, and the file readers."""

from __future__ import annotations

import gzip
import json
import logging

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import CorpusConfig
from raydistill.errors import ConfigError
from raydistill.io import documents
from raydistill.io.corpus import (
    Document,
    SkippedDocuments,
    default_documents,
    describe,
    document_id,
    read_documents,
    read_documents_counted,
    split_of,
)


def _texts(docs: list[Document]) -> list[str]:
    return [d.text for d in docs]


# --- default corpus ---------------------------------------------------------------------------


def test_default_corpus_is_deterministic_and_sized_for_a_demo():
    first = default_documents()
    documents._default_documents.cache_clear()
    again = default_documents()
    assert first == again
    chars = sum(len(d.text) for d in first)
    assert 1_200_000 <= chars <= 2_600_000, chars
    assert len(first) > 200
    assert all(d.text.strip() and d.id == document_id(d.text) for d in first)
    assert len({d.id for d in first}) == len(first)


def test_default_corpus_holds_topics_and_docstrings():
    from pydoc_data.topics import topics

    texts = set(_texts(default_documents()))
    assert topics["for"].strip() in texts
    # a module docstring read with ast from the stdlib sources, cleaned like inspect.cleandoc
    assert any(t.startswith("Heap queue algorithm") for t in texts)
    assert not any("test_support" in t[:200] for t in texts)


def test_default_split_is_disjoint_and_both_sides_are_usable():
    train = read_documents(CorpusConfig(split="train"))
    heldout = read_documents(CorpusConfig(split="heldout"))
    everything = read_documents(CorpusConfig(split="all"))
    assert {d.id for d in train}.isdisjoint(d.id for d in heldout)
    assert len(train) + len(heldout) == len(everything)
    assert 0.01 < len(heldout) / len(everything) < 0.12
    assert sum(len(d.text) for d in heldout) > 30_000
    # order is kept: each split is the full list filtered
    assert train == [d for d in everything if split_of(d.id, 0.05) == "train"]


def test_max_documents_caps_after_splitting():
    train = read_documents(CorpusConfig(split="train"))
    assert read_documents(CorpusConfig(split="train", max_documents=5)) == train[:5]


def test_split_of_reads_the_id_as_a_fraction():
    assert split_of("0" * 16, 0.05) == "heldout"
    assert split_of("f" * 16, 0.05) == "train"
    assert split_of("0cc0000000000000", 0.05) == "heldout"  # 0.05 = 0x0ccc.../16**16
    assert split_of("0cd0000000000000", 0.05) == "train"
    ids = [document_id(str(i)) for i in range(2000)]
    share = sum(split_of(i, 0.3) == "heldout" for i in ids) / len(ids)
    assert 0.26 < share < 0.34


def test_describe():
    assert describe(CorpusConfig()).startswith("default(py3.")
    assert describe(CorpusConfig()).endswith("/train")
    cfg = CorpusConfig(source="s3://b/x/*.jsonl", split="heldout", max_documents=7)
    assert describe(cfg) == "s3://b/x/*.jsonl:text/heldout[:7]"


# --- files ------------------------------------------------------------------------------------


def _all(source: str, **kw) -> list[str]:
    return _texts(read_documents(CorpusConfig(source=source, split="all", **kw)))


def test_jsonl_skips_bad_records_dedups_and_warns(tmp_path, caplog):
    lines = [
        json.dumps({"text": "alpha", "n": 1}),
        "{not json",
        json.dumps({"text": 5}),
        json.dumps({"text": None}),
        json.dumps(["a list"]),
        "",
        json.dumps({"text": "   "}),
        json.dumps({"text": "beta"}),
        json.dumps({"text": "alpha"}),
    ]
    path = tmp_path / "a.jsonl"
    path.write_bytes(("\n".join(lines)).encode() + b"\n\xff\xfe\n")
    with caplog.at_level(logging.WARNING, logger="raydistill.io.corpus"):
        assert _all(str(path)) == ["alpha", "beta"]
    assert "skipped 5 records" in caplog.text
    assert str(path) in caplog.text


def test_jsonl_missing_field_names_file_field_and_existing_fields(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x", "id": 3}) + "\n")
    with pytest.raises(ConfigError, match=r"b\.jsonl' line 2 has no field 'text' \(fields: content, id\)"):
        _all(str(path))
    with pytest.raises(ConfigError, match="no field 'content'"):
        _all(str(path), text_field="content")


def test_json_array_and_gzip_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"body": "one"}, {"body": "two"}]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "three"}) + "\n")
    assert _all(str(tmp_path), text_field="body") == ["one", "two", "three"]


def test_parquet_reader_and_missing_column(tmp_path):
    table = pa.table({"content": ["p1", None, "p2", "p1"], "id": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "x.parquet")
    assert _all(str(tmp_path / "x.parquet"), text_field="content") == ["p1", "p2"]
    with pytest.raises(ConfigError, match=r"x\.parquet' has no column 'text' \(columns: content, id\)"):
        _all(str(tmp_path / "x.parquet"))


def test_txt_files_glob_in_sorted_order(tmp_path):
    for name, text in [("b.txt", "second file"), ("a.txt", "first file"), ("c.txt", "\n\n")]:
        (tmp_path / name).write_text(text)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    assert _all(str(tmp_path / "*.txt")) == ["first file", "second file"]


def test_memory_urls_and_split_over_files():
    fs = fsspec.filesystem("memory")
    for i in range(3):
        with fs.open(f"/rd-corpus/part-{i}.jsonl", "w") as f:
            f.write("\n".join(json.dumps({"text": f"doc {i}-{j}"}) for j in range(50)))
    try:
        docs = read_documents(CorpusConfig(source="memory://rd-corpus/*.jsonl", split="all"))
        assert _texts(docs)[:2] == ["doc 0-0", "doc 0-1"] and len(docs) == 150
        train = read_documents(CorpusConfig(source="memory://rd-corpus", heldout_fraction=0.2))
        held = read_documents(
            CorpusConfig(source="memory://rd-corpus", split="heldout", heldout_fraction=0.2)
        )
        assert len(train) + len(held) == 150 and held and train
        assert {d.id for d in held} == {d.id for d in docs if split_of(d.id, 0.2) == "heldout"}
    finally:
        fs.rm("/rd-corpus", recursive=True)


def test_no_match_and_unsupported_extension(tmp_path):
    with pytest.raises(ConfigError, match=r"^corpus source '.*nothing/\*\.jsonl' matches no files$"):
        _all(str(tmp_path / "nothing" / "*.jsonl"))
    with pytest.raises(ConfigError, match="matches no files"):
        _all("memory://rd-missing/file.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"data\.csv' has an unsupported extension"):
        _all(str(tmp_path / "*.csv"))


def test_reader_counts_skipped_records_by_reason(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join([
        json.dumps({"text": "one"}), json.dumps({"text": " "}), json.dumps({"text": None}), "not json",
        json.dumps({"text": "one"}), json.dumps({"text": "two"}), json.dumps(["not", "an", "object"]),
    ]) + "\n")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "c.txt").write_text("two")
    docs, skipped = read_documents_counted(CorpusConfig(source=str(tmp_path), split="all"))
    # de-duplication is within a slice (here: a file): "two" of c.txt repeats a.jsonl's and is kept
    assert [d.text for d in docs] == ["one", "two", "two"]
    assert skipped == SkippedDocuments(empty=1, undecodable=4, duplicate=1)
    assert read_documents(CorpusConfig(source=str(tmp_path), split="all")) == docs
