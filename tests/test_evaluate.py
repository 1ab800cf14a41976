"""`raydistill eval`: held-out loss equals a plain per-window cross-entropy computed by hand."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from raydistill.corpus import Document
from raydistill.evaluate import evaluate_model
from raydistill.models import load_causal_lm
from raydistill.tokenization import load_tokenizer


def test_eval_matches_a_manual_cross_entropy(tiny_teacher, tiny_corpus):
    docs = [Document.from_text(json.loads(line)["text"]) for line in open(tiny_corpus)][:5]
    result = evaluate_model(tiny_teacher, docs, max_length=64, batch_size=2)
    tok, model = load_tokenizer(tiny_teacher), load_causal_lm(tiny_teacher).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = tok(d.text, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids), 64):
                w = torch.tensor([ids[i : i + 64]])
                if w.shape[1] < 2:
                    continue
                logits = model(w).logits[0, :-1]
                total += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
                count += w.shape[1] - 1
    assert result["tokens"] == count
    assert math.isclose(result["loss"], total / count, rel_tol=1e-4)
    assert math.isclose(result["perplexity"], math.exp(total / count), rel_tol=1e-3)
