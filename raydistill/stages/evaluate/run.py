"""``raydistill evaluate`` (alias ``eval``): held-out loss and perplexity of any HF causal LM directory.

Every model (teacher and students alike) is scored the same way (``scores.evaluate_model``).
"""

from __future__ import annotations

from raydistill.config.jobs import EvalConfig
from raydistill.contracts.selection import selected_documents
from raydistill.stages.evaluate.scores import evaluate_model

__all__ = ["run_eval"]


def run_eval(cfg: EvalConfig) -> dict:
    corpus = cfg.corpus if cfg.max_documents is None else cfg.corpus.model_copy(
        update={"max_documents": cfg.max_documents})
    documents = selected_documents(corpus)
    result = evaluate_model(cfg.model, documents, max_length=cfg.max_length, batch_size=cfg.batch_size,
                            trust_remote_code=cfg.trust_remote_code)
    del result["top1"]  # per-token guesses: for agreement between models, not for a report
    return result
