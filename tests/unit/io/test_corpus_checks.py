"""Corpus inputs that used to surprise: an output inside the corpus folder, and files that cannot be read.

Before issue #19, an output inside a directory (or glob) corpus was accepted and the rerun read its
completion records as documents; a corrupt ``.parquet`` or ``.jsonl.gz`` was a pyarrow / gzip traceback.
"""

from __future__ import annotations

import gzip
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import CorpusConfig
from raydistill.errors import ConfigError
from raydistill.io.corpus import check_output_outside, read_documents


@pytest.mark.parametrize(("source", "output", "refused"), [
    ("{t}/data", "{t}/data/shards", True),  # a directory is read recursively: the records would be documents
    ("{t}/data/", "{t}/data", True),
    ("{t}/data/*.jsonl", "{t}/data/shards", True),  # the glob's folder
    ("{t}/data/**/*.json*", "{t}/data/x/y", True),
    ("{t}/data", "{t}/database", False),  # a sibling that shares a prefix
    ("{t}/data/*.jsonl", "{t}/shards", False),
    ("{t}/data/docs.jsonl", "{t}/data/shards", False),  # one file: no folder is read
    ("default", "{t}/shards", False),
    ("s3://bucket/corpus/*.jsonl", "s3://bucket/corpus/shards", True),
    ("s3://bucket/corpus/*.jsonl", "s3://bucket/shards", False),
    ("s3://bucket/corpus/*.jsonl", "{t}/corpus/shards", False),  # another filesystem
])
def test_an_output_inside_the_corpus_folder_is_refused(tmp_path, source, output, refused):
    pytest.importorskip("s3fs") if source.startswith("s3://") else None
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "docs.jsonl").write_text('{"text": "a"}\n')
    corpus = CorpusConfig(source=source.format(t=tmp_path))
    out = output.format(t=tmp_path)
    if refused:
        with pytest.raises(ConfigError, match="lies inside the corpus folder") as err:
            check_output_outside(out, corpus)
        assert out in str(err.value) and corpus.source in str(err.value)
    else:
        check_output_outside(out, corpus)


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("random.parquet", os.urandom(300), "cannot be read as Parquet"),
    ("short.parquet", b"PAR1garbagePAR1", "cannot be read as Parquet"),
    ("random.jsonl.gz", os.urandom(100), "cannot be read as compressed JSON lines"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "hello"}\n' * 300)[:40], "cannot be read as compressed JSON lines"),
    ("cut.txt.gz", gzip.compress(b"hello world " * 300)[:40], "cannot be read as compressed text"),
])
def test_a_corrupt_corpus_file_is_one_config_error_naming_it(tmp_path, name, content, needle):
    path = _write(tmp_path / name, content)
    with pytest.raises(ConfigError) as err:
        read_documents(CorpusConfig(source=path, split="all"))
    message = str(err.value)
    assert "\n" not in message and f"corpus file '{path}'" in message and needle in message


def test_a_parquet_with_a_damaged_row_group_is_named_too(tmp_path):
    """A readable footer over damaged pages fails while iterating, not while opening."""
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 50 for i in range(200)]}), path, compression="snappy")
    data = bytearray(path.read_bytes())
    for i in range(200, len(data) - 400):  # the data pages; the footer (metadata) at the end stays
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"damaged\.parquet' cannot be read as Parquet"):
        read_documents(CorpusConfig(source=str(path), split="all"))
