"""``raydistill eval``: held-out loss and perplexity of any HF causal LM directory.

Every model (teacher and students alike) is scored the same way: each held-out document
is tokenized with the model's own tokenizer, cut into windows of ``max_length``, and the
mean next-token cross-entropy is taken over every predicted token.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from raydistill.config import EvalConfig
from raydistill.corpus import Document, read_documents
from raydistill.errors import ConfigError
from raydistill.models import count_parameters, load_causal_lm
from raydistill.teacher import cut_windows, length_batches
from raydistill.tokenization import load_tokenizer


@torch.inference_mode()
def evaluate_model(model_path: str, documents: list[Document], *, max_length: int = 256, batch_size: int = 16,
                   trust_remote_code: bool = False) -> dict:
    """{"loss", "perplexity", "tokens", "params", "seconds"} of ``model_path`` on ``documents``."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(model_path, trust_remote_code=trust_remote_code, dtype=torch.float32).eval()
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    windows = [w for ids in encoded for w in cut_windows(ids, max_length) if len(w) > 1]
    if not windows:
        raise ConfigError("no held-out text to evaluate on (every document is empty)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_loss, total_tokens = 0.0, 0
    for batch in length_batches([len(w) for w in windows], max_length * batch_size):
        width = max(len(windows[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(windows[i])] = torch.tensor(windows[i])
            mask[row, : len(windows[i])] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_loss += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                      reduction="sum").item()
        total_tokens += int((labels != -100).sum())
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens,
            "params": count_parameters(model), "seconds": round(time.perf_counter() - t0, 2)}


def run_eval(cfg: EvalConfig) -> dict:
    corpus = cfg.corpus if cfg.max_documents is None else cfg.corpus.model_copy(
        update={"max_documents": cfg.max_documents})
    documents = read_documents(corpus)
    return evaluate_model(cfg.model, documents, max_length=cfg.max_length, batch_size=cfg.batch_size,
                          trust_remote_code=cfg.trust_remote_code)
