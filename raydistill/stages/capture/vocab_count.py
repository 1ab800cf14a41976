"""The shard set's vocabulary table, counted once on the driver before any actor starts.

Every shard of a set must renumber ids by the same table (format.md §2.4), so it is counted
over an evenly spaced sample of the corpus and written to ``vocab.parquet`` first; a resumed
run counts it again and keeps the file only if it is that table.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from raydistill.contracts.shards.vocab import (
    VOCAB_TABLE_NAME,
    VocabTable,
    load_vocab_table,
    write_vocab_table,
)
from raydistill.errors import RaydistillError
from raydistill.io import storage
from raydistill.io.corpus import Document
from raydistill.models.windows import TOKENIZE_BATCH

__all__ = ["count_vocab_table", "ensure_vocab_table", "sample_documents"]

log = logging.getLogger(__name__)


def sample_documents(documents: list[Document], max_chars: int) -> list[Document]:
    """An evenly spaced, deterministic subset of about ``max_chars`` characters."""
    total = sum(len(d.text) for d in documents)
    stride = max(1, math.ceil(total / max(max_chars, 1)))
    return documents[::stride]


def count_vocab_table(tokenizer, documents: list[Document], vocab_size: int, sample_tokens: int) -> VocabTable:
    """Token counts over about ``sample_tokens`` tokens of evenly spaced documents (0: all counts
    equal). Benchmarks call it too, so they renumber ids exactly as a capture would."""
    if sample_tokens == 0:
        return VocabTable.uniform(vocab_size)
    sample = sample_documents(documents, sample_tokens * 4)  # ≈ 4 characters per token
    lists = []
    for start in range(0, len(sample), TOKENIZE_BATCH):
        texts = [d.text for d in sample[start : start + TOKENIZE_BATCH]]
        lists.extend(tokenizer(texts, add_special_tokens=False)["input_ids"])
    return VocabTable.count(lists, vocab_size)


def ensure_vocab_table(root: str, tokenizer, documents: list[Document], vocab_size: int, sample_tokens: int
                       ) -> tuple[VocabTable, str]:
    """The set's vocabulary table and its sha256, counted now and written unless ``root`` already holds it.

    The table is a pure function of the corpus, the tokenizer and ``sample_tokens``, so every unit of a
    plan is encoded with the same one; a resumed run counts it again rather than trusting the file it
    finds, so a table replaced since (which would renumber every id of the units still to do) is put
    back, never used.
    """
    table = count_vocab_table(tokenizer, documents, vocab_size, sample_tokens)
    url = storage.join(root, VOCAB_TABLE_NAME)
    if storage.exists(url):
        try:
            found, sha = load_vocab_table(url, vocab_size)
            if np.array_equal(found.counts, table.counts):
                return found, sha
        except RaydistillError:
            pass
        log.warning("%s is not the table this corpus and tokenizer give (replaced or damaged); writing it again", url)
    _, sha = write_vocab_table(root, table)
    return table, sha
