"""Held-out scores of any HF causal LM directory: loss, perplexity, top-1 accuracy, calibration, agreement.

Every model (teacher and students alike) is scored the same way: each held-out document
is tokenized with the model's own tokenizer, cut into windows of ``max_length``, and the
mean next-token cross-entropy is taken over every predicted token.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from raydistill.errors import ConfigError
from raydistill.io.corpus import Document
from raydistill.models.loading import count_parameters, load_causal_lm
from raydistill.models.tokenizers import load_tokenizer
from raydistill.models.windows import cut_windows, length_batches, make_batch

__all__ = ["ECE_BINS", "evaluate_model", "expected_calibration_error"]

ECE_BINS = 15


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over equal-width confidence bins: how far
    the model's top-1 probability is from how often its top-1 guess is right."""
    if confidence.numel() == 0:
        return 0.0
    which = (confidence.double() * bins).long().clamp_(0, bins - 1)
    conf_sum = torch.bincount(which, weights=confidence.double(), minlength=bins)
    hit_sum = torch.bincount(which, weights=correct.double(), minlength=bins)
    return float((conf_sum - hit_sum).abs().sum() / confidence.numel())


@torch.inference_mode()
def evaluate_model(model_path: str, documents: list[Document], *, max_length: int = 256, batch_size: int = 16,
                   trust_remote_code: bool = False, reference_top1: torch.Tensor | None = None) -> dict:
    """Held-out scores of ``model_path`` on ``documents``.

    Returns loss, perplexity, tokens, params, seconds; ``top1_accuracy`` and ``ece`` (of the
    top-1 next-token guess); ``top1`` (the guesses, one per predicted token in document order);
    and, given another model's ``reference_top1`` on the same text and tokenizer,
    ``agreement``: the share of positions where both guess the same token.
    """
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(model_path, trust_remote_code=trust_remote_code, dtype=torch.float32).eval()
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    windows = [w for ids in encoded for w in cut_windows(ids, max_length) if len(w) > 1]
    if not windows:
        raise ConfigError("no held-out text to evaluate on (every document is empty)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_loss, total_tokens = 0.0, 0
    top1: list[torch.Tensor | None] = [None] * len(windows)
    confidence: list[torch.Tensor] = []
    correct: list[torch.Tensor] = []
    for rows in length_batches([len(w) for w in windows], max_length * batch_size):
        batch = make_batch(windows, rows, pad)
        ids, mask = batch.input_ids, batch.attention_mask
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_loss += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                      reduction="sum").item()
        total_tokens += int((labels != -100).sum())
        best_logit, best = logits.max(dim=-1)
        best_p = (best_logit - logits.logsumexp(dim=-1)).exp()  # the top-1 probability, without a [B, T, V] softmax
        for row, i in enumerate(rows):
            n = len(windows[i]) - 1
            top1[i] = best[row, :n]
            confidence.append(best_p[row, :n])
            correct.append(best[row, :n] == labels[row, :n])
    loss = total_loss / total_tokens
    guesses = torch.cat(top1)
    hits = torch.cat(correct)
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens,
              "params": count_parameters(model), "top1_accuracy": float(hits.double().mean()),
              "ece": expected_calibration_error(torch.cat(confidence), hits), "top1": guesses}
    if reference_top1 is not None:
        if reference_top1.shape != guesses.shape:
            raise ConfigError(f"agreement needs the same tokenizer: {model_path} predicts {guesses.numel()} "
                              f"held-out tokens, the reference {reference_top1.numel()}")
        result["agreement"] = float((reference_top1 == guesses).double().mean())
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result
