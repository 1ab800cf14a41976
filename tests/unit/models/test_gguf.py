"""Teachers from GGUF files: the same tokens and logits as the HF directory, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from support import GGUF_NAME

from raydistill.errors import ModelLoadError
from raydistill.models.loading import load_causal_lm
from raydistill.models.tokenizers import load_tokenizer

pytest.importorskip("gguf")  # a dev dependency; absent only outside the test extras



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




def test_missing_gguf_file_is_one_clear_error(gguf_teacher):
    with pytest.raises(ModelLoadError, match=r"GGUF file 'nope\.gguf' not found"):
        load_causal_lm(gguf_teacher, gguf_file="nope.gguf")
    with pytest.raises(ModelLoadError, match=r"GGUF file 'nope\.gguf' not found"):
        load_tokenizer(gguf_teacher, gguf_file="nope.gguf")


def test_export_gguf_writes_a_model_directory_once(tiny_teacher, gguf_teacher, tmp_path, tiny_corpus):
    """A GGUF teacher exported to an HF directory gives the same logits; a second export reuses it."""
    import json
    import os

    from raydistill.models.gguf_export import EXPORT_MARKER, export_gguf

    out = export_gguf(gguf_teacher, GGUF_NAME, str(tmp_path / "exported"))
    assert os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, EXPORT_MARKER))
    text = json.loads(open(tiny_corpus).readline())["text"]
    batch = torch.tensor([load_tokenizer(out)(text, add_special_tokens=False)["input_ids"][:32]])
    with torch.no_grad():
        want = load_causal_lm(gguf_teacher, gguf_file=GGUF_NAME, dtype=torch.float32).eval()(batch).logits
        torch.testing.assert_close(load_causal_lm(out).eval()(batch).logits, want, rtol=0, atol=1e-6)
    stamp = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    assert export_gguf(gguf_teacher, GGUF_NAME, out) == out
    assert os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == stamp  # reused, not rewritten
