"""`raydistill eval`: held-out loss equals a plain per-window cross-entropy computed by hand."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from raydistill.io.corpus import Document
from raydistill.models.loading import load_causal_lm
from raydistill.models.tokenizers import load_tokenizer
from raydistill.stages.evaluate.scores import evaluate_model


def test_eval_matches_a_manual_cross_entropy(tiny_teacher, tiny_corpus):
    docs = [Document.from_text(json.loads(line)["text"]) for line in open(tiny_corpus)][:5]
    result = evaluate_model(tiny_teacher, docs, max_length=64, batch_size=2)
    tok, model = load_tokenizer(tiny_teacher), load_causal_lm(tiny_teacher).eval()
    total, count = 0.0, 0
    confidence, correct, guesses = [], [], []
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
                p, guess = torch.softmax(logits, -1).max(-1)
                confidence += p.tolist()
                correct += (guess == w[0, 1:]).tolist()
                guesses += guess.tolist()
    assert result["tokens"] == count
    assert result["top1_accuracy"] == sum(correct) / count
    assert sorted(result["top1"].tolist()) == sorted(guesses)  # the same guesses (batched in another order)
    # ECE by hand: 15 equal-width bins, |accuracy - mean confidence| weighted by the bin's share
    bins: dict[int, list] = {}
    for c, ok in zip(confidence, correct, strict=True):
        bins.setdefault(min(int(c * 15), 14), []).append((c, ok))
    ece = sum(abs(sum(ok for _, ok in b) - sum(c for c, _ in b)) for b in bins.values()) / count
    assert math.isclose(result["ece"], ece, rel_tol=1e-4, abs_tol=1e-6)
    assert evaluate_model(tiny_teacher, docs, max_length=64, reference_top1=result["top1"])["agreement"] == 1.0
    assert math.isclose(result["loss"], total / count, rel_tol=1e-4)
    assert math.isclose(result["perplexity"], math.exp(total / count), rel_tol=1e-3)


def test_agreement_needs_the_same_tokenization(tiny_teacher, tiny_corpus):
    import pytest

    from raydistill.errors import ConfigError

    docs = [Document.from_text(json.loads(line)["text"]) for line in open(tiny_corpus)][:3]
    with pytest.raises(ConfigError, match="same tokenizer"):
        evaluate_model(tiny_teacher, docs, max_length=64, reference_top1=torch.zeros(3, dtype=torch.long))
