"""Capture with 2 real Ray actors: contents, alignment contract, resume, refusals."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from support import TINY_DOCS, capture_config

from raydistill.config import CorpusConfig
from raydistill.contracts.shards.manifest import read_manifest
from raydistill.contracts.shards.reader import ShardSet
from raydistill.contracts.shards.verify import verify_shard_set
from raydistill.contracts.units import completion_url
from raydistill.errors import ConfigError, ContractError
from raydistill.io.corpus import read_documents
from raydistill.io.slices import plan_slices, text_bytes_read
from raydistill.stages.capture.run import run_capture
from raydistill.stages.capture.sparsify import sparsify_topk
from raydistill.stages.capture.worker import TeacherSettings, TeacherWorker


def test_capture_writes_every_unit_and_a_manifest(captured, tiny_teacher, tiny_corpus):
    manifest = read_manifest(captured)
    assert manifest.plan.num_units == len(plan_slices(CorpusConfig(source=tiny_corpus, split="all"), 3500)) > 3
    assert [s.unit for s in manifest.shards] == list(range(manifest.plan.num_units))
    assert manifest.sparsify.k == 16 and manifest.vocab_size == 384
    assert manifest.teacher.name_or_path == tiny_teacher
    assert verify_shard_set(captured) == []
    assert os.path.exists(os.path.join(captured, "tokenizer", "tokenizer.json"))
    # every document once, counted by the workers that read them, each record holding its unit's content hash
    assert manifest.stats["documents"] == TINY_DOCS == sum(s.documents for s in manifest.shards)
    assert all(s.content_sha256 and s.skipped is not None for s in manifest.shards)


def test_shards_hold_the_teachers_topk(captured, tiny_teacher, tiny_corpus):
    """Targets in the shards equal a direct, unbatched forward pass of the teacher (fp16 tolerance)."""
    import torch

    from raydistill.config import CorpusConfig

    worker = TeacherWorker(TeacherSettings(teacher=tiny_teacher, mode="topk", k=16, temperature=1.0,
                                           max_length=64, batch_tokens=512))
    docs = read_documents(CorpusConfig(source=tiny_corpus, split="all"))
    windows = worker.tokenize(docs)
    shard_set = ShardSet(captured)
    rows = [shard_set.read_shard(i) for i in range(len(shard_set.manifest.shards))]
    stored = {(r.doc_ids[j], int(r.windows[j])): r.row(j) for r in rows for j in range(len(r.doc_ids))}
    assert len(stored) == len(windows)
    for doc_id, w, ids in windows[:6]:
        row = stored[(doc_id, w)]
        np.testing.assert_array_equal(row.tokens, ids)
        with torch.no_grad():
            logits = worker.model(torch.tensor([ids])).logits[0]
        ref = sparsify_topk(logits, k=16, vocab_size=384)
        # the stored tail is a 1/1024-octave log code: relative error <= 2^(1/2048) - 1
        np.testing.assert_allclose(row.tail, ref.tail.numpy(), rtol=4e-4, atol=1e-6)
        agree = 0
        for t in range(len(ids)):
            want = dict(zip(ref.ids[t].tolist(), ref.probs[t].tolist(), strict=True))
            got = dict(zip(row.ids[t].tolist(), row.probs[t].tolist(), strict=True))
            agree += len(set(want) & set(got))
            for i in set(want) & set(got):  # one-byte √p code: |error| <= √p/256 (+ the rescale to 1 - tail)
                assert abs(got[i] - want[i]) <= want[i] ** 0.5 / 128 + 1e-3
        assert agree / (16 * len(ids)) > 0.95  # ids agree wherever probabilities are not (near-)tied


def test_vocab_table_renumbers_ids_by_corpus_frequency(captured, tiny_teacher, tiny_corpus):
    shard_set = ShardSet(captured)
    table = shard_set.vocab_table
    assert shard_set.manifest.vocab_table.sample_tokens == int(table.counts.sum()) > 0
    shard = shard_set.read_shard(0)
    # the renumbered stored ids are small numbers: frequent tokens are what a teacher predicts
    assert np.median(table.rank_of_id[shard.ids]) < np.median(shard.ids)




def test_rerun_skips_finished_units_and_redoes_missing_ones(captured, tiny_teacher, tiny_corpus, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(captured, out)
    before = {s.unit: s.sha256 for s in read_manifest(out).shards}
    # simulate a driver killed mid-run: unit 2's shard and completion record never landed
    os.remove(completion_url(out, 2))
    os.remove(os.path.join(out, read_manifest(out).shards[2].path))
    untouched = os.path.join(out, read_manifest(out).shards[0].path)
    mtime = os.stat(untouched).st_mtime_ns
    manifest = run_capture(capture_config(tiny_teacher, tiny_corpus, out), progress=False)
    assert manifest.stats["units_this_run"] == 1
    assert os.stat(untouched).st_mtime_ns == mtime
    assert {s.unit: s.sha256 for s in manifest.shards} == before  # same bytes as the uninterrupted run
    assert verify_shard_set(out) == []
    first_total = read_manifest(captured).stats["capture_seconds_total"]
    assert manifest.stats["capture_seconds_total"] == pytest.approx(
        first_total + manifest.stats["capture_seconds_this_run"], abs=0.02)  # seconds add up over runs
    # and a rerun with nothing missing does no work at all, and keeps the total
    again = run_capture(capture_config(tiny_teacher, tiny_corpus, out), progress=False).stats
    assert again["units_this_run"] == 0 and again["capture_seconds_total"] == manifest.stats["capture_seconds_total"]


def test_other_settings_in_the_same_output_are_refused(captured, tiny_teacher, tiny_corpus):
    with pytest.raises(ContractError, match=r"different settings \(k\)"):
        run_capture(capture_config(tiny_teacher, tiny_corpus, captured, k=8), progress=False)


def test_k_larger_than_vocab_is_refused(tiny_teacher, tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="k=1000 is larger than the teacher's vocabulary"):
        run_capture(capture_config(tiny_teacher, tiny_corpus, str(tmp_path / "x"), k=1000), progress=False)


def test_plan_json_records_units(captured):
    plan = json.load(open(os.path.join(captured, "plan.json")))
    assert len(plan["units"]) == read_manifest(captured).plan.num_units
    assert plan["sha256"] == read_manifest(captured).plan.sha256


def test_a_corpus_file_changed_between_two_runs_is_refused_by_name(tiny_teacher, tiny_corpus, tmp_path):
    """The driver reads no document; the plan holds every corpus file's identity: a rerun over a changed file
    names it, and nothing of the finished units is touched or mixed with the changed file's documents."""
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(tiny_corpus, corpus)
    out = str(tmp_path / "out")
    read_before = text_bytes_read()
    run_capture(capture_config(tiny_teacher, str(corpus), out, unit_bytes=1 << 20), progress=False)
    assert text_bytes_read() == read_before  # this driver read no document: the actors and tasks did
    before = {name: os.path.getmtime(os.path.join(out, "shards", name)) for name in os.listdir(os.path.join(out, "shards"))}
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "one more document, appended after the capture"}) + "\n")
    with pytest.raises(ContractError, match=rf"file '{corpus}' changed since that capture was planned \(size="):
        run_capture(capture_config(tiny_teacher, str(corpus), out, unit_bytes=1 << 20), progress=False)
    assert {n: os.path.getmtime(os.path.join(out, "shards", n)) for n in os.listdir(os.path.join(out, "shards"))} == before
