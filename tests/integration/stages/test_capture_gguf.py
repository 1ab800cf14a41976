"""A capture from a GGUF teacher, end to end on Ray: the same shards as from the HF directory."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from support import GGUF_NAME, capture_config

from raydistill.contracts.shards import ShardSet, read_manifest, verify_shard_set
from raydistill.stages.capture.run import run_capture

pytest.importorskip("gguf")  # a dev dependency; absent only outside the test extras


def test_capture_from_a_gguf_teacher_matches_the_hf_directory(gguf_teacher, captured, tiny_corpus, ray_session,
                                                              tmp_path):
    out = str(tmp_path / "gguf-shards")
    manifest = run_capture(capture_config(gguf_teacher, tiny_corpus, out, gguf_file=GGUF_NAME), progress=False)
    assert verify_shard_set(out) == []
    file_sha = hashlib.sha256(open(os.path.join(gguf_teacher, GGUF_NAME), "rb").read()).hexdigest()
    assert manifest.teacher.weights_sha256 == file_sha  # the alignment contract names the GGUF file
    assert manifest.teacher.name_or_path.endswith(f"#{GGUF_NAME}")
    ours, theirs = ShardSet(out), ShardSet(captured)
    assert len(ours) == len(theirs) and read_manifest(out).total_tokens == read_manifest(captured).total_tokens
    for i in range(len(ours)):
        a, b = ours.read_shard(i), theirs.read_shard(i)
        assert a.doc_ids == b.doc_ids
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(np.sort(a.ids, axis=1), np.sort(b.ids, axis=1))
        np.testing.assert_allclose(a.probs.sum(1), b.probs.sum(1), atol=1e-6)
