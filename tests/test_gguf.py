"""Teachers from GGUF files: the same weights as the HF directory, and a capture from one end to end."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from conftest import capture_config
from gguf_writer import write_llama_gguf

from raydistill.contracts.shards import ShardSet, read_manifest, verify_shard_set
from raydistill.errors import ModelLoadError
from raydistill.models.loading import load_causal_lm
from raydistill.models.tokenizers import load_tokenizer
from raydistill.stages.capture.run import run_capture

pytest.importorskip("gguf")  # a dev dependency; absent only outside the test extras

GGUF_NAME = "teacher-f32.gguf"


@pytest.fixture(scope="module")
def gguf_teacher(tiny_teacher, tmp_path_factory) -> str:
    """A directory holding nothing but a GGUF file of the tiny teacher (weights, config, tokenizer)."""
    directory = tmp_path_factory.mktemp("gguf-teacher")
    model = load_causal_lm(tiny_teacher, dtype=torch.float32)
    write_llama_gguf(model, load_tokenizer(tiny_teacher), str(directory / GGUF_NAME))
    return str(directory)


def test_gguf_teacher_has_the_same_tokens_and_logits(tiny_teacher, gguf_teacher, tiny_corpus):
    import json

    texts = [json.loads(line)["text"] for line in open(tiny_corpus)][:4]
    reference_tok, gguf_tok = load_tokenizer(tiny_teacher), load_tokenizer(gguf_teacher, gguf_file=GGUF_NAME)
    ids = [reference_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert ids == [gguf_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    reference = load_causal_lm(tiny_teacher, dtype=torch.float32).eval()
    from_gguf = load_causal_lm(gguf_teacher, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    batch = torch.tensor([ids[0][:64]])
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(batch).logits, reference(batch).logits, rtol=0, atol=1e-5)


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


def test_missing_gguf_file_is_one_clear_error(gguf_teacher):
    with pytest.raises(ModelLoadError, match=r"GGUF file 'nope\.gguf' not found"):
        load_causal_lm(gguf_teacher, gguf_file="nope.gguf")
    with pytest.raises(ModelLoadError, match=r"GGUF file 'nope\.gguf' not found"):
        load_tokenizer(gguf_teacher, gguf_file="nope.gguf")
