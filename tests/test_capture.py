"""Capture with 2 real Ray actors: contents, alignment contract, resume, refusals."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import TINY_DOCS, capture_config

from raydistill.capture import run_capture
from raydistill.corpus import read_documents
from raydistill.errors import ConfigError, ContractError
from raydistill.shards.manifest import completion_url, read_manifest
from raydistill.shards.reader import ShardSet
from raydistill.shards.verify import verify_shard_set
from raydistill.sparsify import sparsify_topk
from raydistill.teacher import TeacherSettings, TeacherWorker


def test_capture_writes_every_unit_and_a_manifest(captured, tiny_teacher):
    manifest = read_manifest(captured)
    assert manifest.plan.num_units == -(-TINY_DOCS // 5)
    assert [s.unit for s in manifest.shards] == list(range(manifest.plan.num_units))
    assert manifest.sparsify.k == 16 and manifest.vocab_size == 384
    assert manifest.teacher.name_or_path == tiny_teacher
    assert verify_shard_set(captured) == []
    assert os.path.exists(os.path.join(captured, "tokenizer", "tokenizer.json"))


def test_shards_hold_the_teachers_topk(captured, tiny_teacher, tiny_corpus):
    """Targets in the shards equal a direct, unbatched forward pass of the teacher (fp16 tolerance)."""
    import torch

    from raydistill.config import CorpusConfig

    worker = TeacherWorker(TeacherSettings(teacher=tiny_teacher, k=16, temperature=1.0, max_length=64,
                                           batch_tokens=512))
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
        np.testing.assert_allclose(row.topk_probs, ref.probs.numpy(), atol=2e-3)
        np.testing.assert_allclose(row.tail_mass, ref.tail.numpy(), atol=1e-5)
        # ids agree wherever probabilities are not (near-)tied
        same = (row.topk_ids == ref.ids.numpy()).mean()
        assert same > 0.95


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
    # and a rerun with nothing missing does no work at all
    assert run_capture(capture_config(tiny_teacher, tiny_corpus, out), progress=False).stats["units_this_run"] == 0


def test_other_settings_in_the_same_output_are_refused(captured, tiny_teacher, tiny_corpus):
    with pytest.raises(ContractError, match="different corpus or settings"):
        run_capture(capture_config(tiny_teacher, tiny_corpus, captured, k=8), progress=False)


def test_k_larger_than_vocab_is_refused(tiny_teacher, tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="k=1000 is larger than the teacher's vocabulary"):
        run_capture(capture_config(tiny_teacher, tiny_corpus, str(tmp_path / "x"), k=1000), progress=False)


def test_plan_json_records_units(captured):
    plan = json.load(open(os.path.join(captured, "plan.json")))
    assert len(plan["units"]) == read_manifest(captured).plan.num_units
    assert plan["sha256"] == read_manifest(captured).plan.sha256
