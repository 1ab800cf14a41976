"""Capture with a corpus on S3, and what a capture reports.

A corpus read from S3 (a moto server on 127.0.0.1) with bad, duplicate and oversize records counted
in the manifest. The capture's faults (an actor or the driver killed, writes that fail part-way, a
full disk, records and shards that do not match, the object store under pressure) are in
tests/reliability/test_faults.py.
"""

from __future__ import annotations

import json

import pytest
from support import capture_config, moto_s3

from raydistill.config import CorpusConfig
from raydistill.contracts.shards.verify import verify_shard_set
from raydistill.io import storage
from raydistill.io.corpus import read_documents
from raydistill.stages.capture.run import run_capture


@pytest.fixture
def s3_env():
    with moto_s3():
        yield


def test_capture_reads_a_jsonl_corpus_on_s3_and_counts_what_it_skips(s3_env, tiny_teacher, tiny_corpus,
                                                                     ray_session, tmp_path):
    from raydistill.models.tokenizers import load_tokenizer

    texts = [json.loads(line)["text"] for line in open(tiny_corpus)][:8]
    tokenizer = load_tokenizer(tiny_teacher)
    limit = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    too_long = " ".join(texts)  # more tokens than any single document
    records = [json.dumps({"text": t}) for t in texts[:4]] + [
        json.dumps({"text": ""}), json.dumps({"text": "  \n "}), json.dumps({"text": texts[0]}),
        json.dumps({"text": 42}), '{"text": "broken', json.dumps({"text": too_long}),
    ]
    storage.makedirs("s3://rd-capture")
    storage.atomic_write_text("s3://rd-capture/corpus/part-0.jsonl", "\n".join(records) + "\n")
    storage.atomic_write_text("s3://rd-capture/corpus/part-1.jsonl",
                              "\n".join(json.dumps({"text": t}) for t in texts[4:]) + "\n")
    out = str(tmp_path / "set")
    cfg = capture_config(tiny_teacher, "s3://rd-capture/corpus/*.jsonl", out, unit_bytes=1 << 20,  # a unit per file
                         num_actors=1, max_document_tokens=limit)
    manifest = run_capture(cfg, progress=False)

    assert manifest.plan.corpus.startswith("s3://rd-capture/corpus/")
    assert verify_shard_set(out) == []
    stats = manifest.stats
    assert stats["documents"] == 8 and stats["units"] == 2
    assert {r: stats[f"skipped_documents.{r}"] for r in ("empty", "undecodable", "duplicate", "oversize")} == {
        "empty": 2, "undecodable": 2, "duplicate": 1, "oversize": 1}
    assert stats["skipped_documents"] == 6
    from raydistill.contracts.shards.reader import ShardSet

    shard_set = ShardSet(out)
    stored = {doc_id for i in range(len(manifest.shards)) for doc_id in shard_set.read_shard(i).doc_ids}
    assert stored == {d.id for d in read_documents(CorpusConfig(source=tiny_corpus, split="all", max_documents=8))}


# --- the pure pieces: actor count, busy time, stats, summary, skip counts ------------------------










