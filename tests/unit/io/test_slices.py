"""Planning a corpus from metadata (io.slices) and reading it back slice by slice, against whole-file readers."""

from __future__ import annotations

import itertools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import CorpusConfig
from raydistill.errors import ConfigError
from raydistill.io import slices
from raydistill.io.corpus import read_documents
from raydistill.io.slices import plan_slices, read_slice


def _texts_of(cfg: CorpusConfig, unit_bytes: int) -> list[str]:
    return [d.text for piece in plan_slices(cfg, unit_bytes) for d in read_slice(piece, cfg)[0]]


def _jsonl(path, texts: list[str], *, crlf: bool = False, trailing_newline: bool = True) -> list[str]:
    end = "\r\n" if crlf else "\n"
    body = end.join(json.dumps({"text": t}) for t in texts)
    path.write_bytes((body + (end if trailing_newline else "")).encode())
    return texts


@pytest.mark.parametrize("unit_bytes", [256, 257, 300, 999, 4096, 1 << 30])
@pytest.mark.parametrize(("crlf", "trailing"), [(False, True), (True, True), (False, False)])
def test_byte_ranges_read_every_line_exactly_once(tmp_path, unit_bytes, crlf, trailing):
    """Whatever the cut, consecutive ranges give the file's lines once each, in order (the dense reference:
    every line parsed from the whole file)."""
    texts = [f"document {i} " + "word " * (i % 37) + "é" * (i % 3) for i in range(300)]
    path = tmp_path / "c.jsonl"
    _jsonl(path, texts, crlf=crlf, trailing_newline=trailing)
    reference = [json.loads(line)["text"] for line in path.read_bytes().splitlines() if line.strip()]
    cfg = CorpusConfig(source=str(path), split="all")
    pieces = plan_slices(cfg, unit_bytes)
    assert [p.span for p in pieces] == ["bytes"] * len(pieces) and pieces[-1].stop == os.path.getsize(path)
    assert all(a.stop == b.start for a, b in itertools.pairwise(pieces))
    assert _texts_of(cfg, unit_bytes) == reference == texts


@pytest.mark.parametrize("unit_bytes", [256, 1000, 5000, 1 << 30])
def test_parquet_row_ranges_cover_every_row_once(tmp_path, unit_bytes):
    """Row groups of several sizes (one big one, cut by rows) give every row once, in order."""
    texts = [f"row {i} " + "x" * (i % 50) for i in range(700)]
    path = tmp_path / "c.parquet"
    with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("n", pa.int64())])) as writer:
        for lo, hi in [(0, 10), (10, 400), (400, 401), (401, 700)]:
            writer.write_table(pa.table({"text": texts[lo:hi], "n": list(range(lo, hi))}))
    cfg = CorpusConfig(source=str(path), split="all")
    pieces = plan_slices(cfg, unit_bytes)
    assert all(p.span == "rows" for p in pieces) and pieces[0].start == 0 and pieces[-1].stop == 700
    assert all(a.stop == b.start for a, b in itertools.pairwise(pieces))
    if unit_bytes == 256:
        assert len(pieces) > 4  # the 390-row group is cut by rows
    assert _texts_of(cfg, unit_bytes) == texts


def test_planning_reads_no_document_text(tmp_path, monkeypatch):
    """Planning lists files and reads Parquet footers only: every reader of document bytes fails if called."""
    _jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(200)])
    pq.write_table(pa.table({"text": [f"b{i}" for i in range(200)]}), tmp_path / "b.parquet", row_group_size=50)
    before = slices.text_bytes_read()
    for name in ("_range_bytes", "_jsonl_texts", "_parquet_texts", "_txt_texts", "_arrow_texts"):
        monkeypatch.setattr(slices, name, lambda *a, _name=name, **k: pytest.fail(f"planning called {_name}"))
    pieces = plan_slices(CorpusConfig(source=str(tmp_path), split="all"), 512)
    assert len(pieces) > 4 and slices.text_bytes_read() == before
    monkeypatch.undo()
    assert len(read_documents(CorpusConfig(source=str(tmp_path), split="all"))) == 400
    assert slices.text_bytes_read() > before  # reading does count


def test_a_file_changed_after_planning_is_refused_by_name(tmp_path):
    path = tmp_path / "c.jsonl"
    _jsonl(path, [f"doc {i}" for i in range(50)])
    cfg = CorpusConfig(source=str(path), split="all")
    piece = plan_slices(cfg, 1 << 20)[0]
    assert len(read_slice(piece, cfg)[0]) == 50
    _jsonl(path, [f"doc {i}" for i in range(51)])
    with pytest.raises(ConfigError, match=r"corpus file '.*c\.jsonl' changed since the plan was made \(size=\d+"):
        read_slice(piece, cfg)
    path.unlink()
    with pytest.raises(ConfigError, match=r"c\.jsonl' changed since the plan was made .* missing now"):
        read_slice(piece, cfg)


def test_compressed_json_and_txt_files_are_whole_slices(tmp_path):
    import gzip

    import zstandard

    rows = [json.dumps({"text": f"z{i}"}) for i in range(30)]
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(rows) + "\n").encode()))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gz"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "arr"}]))
    (tmp_path / "d.txt").write_text("a whole text file")
    cfg = CorpusConfig(source=str(tmp_path), split="all")
    pieces = plan_slices(cfg, 256)
    assert [p.span for p in pieces] == ["file"] * 4
    assert _texts_of(cfg, 256) == [f"z{i}" for i in range(30)] + ["gz", "arr", "a whole text file"]


def test_a_datasets_save_to_disk_folder_reads_its_arrow_files(tmp_path):
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow IPC stream files named by state.json."""
    folder = tmp_path / "ds"
    folder.mkdir()
    names = []
    for i, texts in enumerate([["first", "second"], ["third"]]):
        name = f"data-{i:05d}-of-00002.arrow"
        table = pa.table({"text": texts, "label": list(range(len(texts)))})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "x"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    cfg = CorpusConfig(source=str(folder), split="all")
    assert [p.format for p in plan_slices(cfg)] == ["arrow", "arrow"]
    assert [d.text for d in read_documents(cfg)] == ["first", "second", "third"]
    with pytest.raises(ConfigError, match="has no column 'body'"):
        read_documents(cfg.model_copy(update={"text_field": "body"}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../escape.arrow"}]}))
    with pytest.raises(ConfigError, match="outside its folder"):
        plan_slices(cfg)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"saved DatasetDict; point corpus\.source at one split's folder"):
        plan_slices(CorpusConfig(source=str(tmp_path / "dd"), split="all"))


def test_a_parquet_file_without_the_text_column_is_refused_at_planning(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match=r"a\.parquet' has no column 'text' \(columns: body\)"):
        plan_slices(CorpusConfig(source=str(tmp_path), split="all"))


def test_duplicates_are_dropped_within_a_slice_and_kept_across_slices(tmp_path):
    """The documented choice: exact de-duplication per slice; a repeat in another slice stays, and lands in
    the same split as its twin (the split is a function of the content hash)."""
    texts = ["same text"] * 3 + [f"filler {i} " + "y" * 80 for i in range(20)] + ["same text"]
    _jsonl(tmp_path / "c.jsonl", texts)
    cfg = CorpusConfig(source=str(tmp_path / "c.jsonl"), split="all")
    one = plan_slices(cfg, 1 << 20)
    docs, skipped = read_slice(one[0], cfg)
    assert [d.text for d in docs].count("same text") == 1 and skipped.duplicate == 3
    many = plan_slices(cfg, 512)
    assert len(many) > 1 and _texts_of(cfg, 512).count("same text") == 2
    for split in ("train", "heldout"):
        part = CorpusConfig(source=str(tmp_path / "c.jsonl"), split=split, heldout_fraction=0.5)
        assert _texts_of(part, 512).count("same text") in (0, 2)


def test_max_documents_caps_a_file_corpus_in_order(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(40)])
    _jsonl(tmp_path / "b.jsonl", [f"b{i}" for i in range(40)])
    cfg = CorpusConfig(source=str(tmp_path), split="all", max_documents=55)
    pieces = plan_slices(cfg, 256)
    assert pieces[-1].limit is not None and all(p.limit is None for p in pieces[:-1])
    assert _texts_of(cfg, 256) == [f"a{i}" for i in range(40)] + [f"b{i}" for i in range(15)]


def test_the_default_corpus_is_cut_by_bytes_and_reads_back_whole():
    cfg = CorpusConfig(split="train")
    pieces = plan_slices(cfg, 200 << 10)
    assert len(pieces) > 5 and all(p.format == "default" for p in pieces)
    whole = [d.text for d in read_documents(cfg)]
    assert _texts_of(cfg, 200 << 10) == whole == [d.text for d in read_documents(cfg)]
    capped = CorpusConfig(split="train", max_documents=7)
    assert [d.text for d in read_documents(capped)] == whole[:7]
