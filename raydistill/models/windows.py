"""Documents to model inputs: token windows, length-sorted batches, padded tensors.

Shared by every stage that runs a model over documents (capture, select, evaluate, corpus-mode
training), so all of them cut a document the same way: tokenized without special tokens, then
consecutive windows of at most ``max_length`` tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from raydistill.io.corpus import Document

__all__ = ["PaddedBatch", "cut_windows", "document_windows", "drop_oversize", "length_batches", "make_batch"]

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 1024  # documents per tokenizer call on whole corpora


def cut_windows(token_ids: list[int], max_length: int) -> list[list[int]]:
    """Split one document's tokens into consecutive windows of at most ``max_length``."""
    return [token_ids[i : i + max_length] for i in range(0, len(token_ids), max_length)]


def document_windows(tokenizer, documents: list[Document], max_length: int) -> list[tuple[int, int, list[int]]]:
    """(document index, window index, token ids) for every window of every document, tokenized
    without special tokens and cut by ``cut_windows``; empty documents give none."""
    if not documents:  # a unit whose slice held no usable document (HF tokenizers fail on an empty batch)
        return []
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    return [(i, w, chunk) for i, ids in enumerate(encoded) for w, chunk in enumerate(cut_windows(ids, max_length))]


def drop_oversize(documents: list[Document], tokenizer, max_tokens: int | None) -> tuple[list[Document], int]:
    """Documents of at most ``max_tokens`` tokens (as the workers tokenize them), and the number dropped.

    Done by each unit's worker on its own documents (``runtime.unit_input``); the cost, one extra
    tokenizer pass over the unit, is paid only when a limit is set.
    """
    if max_tokens is None:
        return documents, 0
    kept: list[Document] = []
    for start in range(0, len(documents), TOKENIZE_BATCH):
        batch = documents[start : start + TOKENIZE_BATCH]
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        kept += [doc for doc, ids in zip(batch, encoded, strict=True) if len(ids) <= max_tokens]
    if len(kept) < len(documents):
        log.warning("skipped %d documents longer than max_document_tokens=%d",
                    len(documents) - len(kept), max_tokens)
    return kept, len(documents) - len(kept)


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group window indices by length so each padded batch stays under ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class PaddedBatch:
    """One padded forward batch: ``rows[r]`` is the window in row r, left-aligned."""

    rows: list[int]
    lengths: np.ndarray  # [B] valid tokens per row
    input_ids: torch.Tensor  # [B, width] int64, pad_id after each row's length
    attention_mask: torch.Tensor  # [B, width] int64

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded(self) -> bool:
        return bool((self.lengths < self.input_ids.shape[1]).any())


def make_batch(windows: list[list[int]], rows: list[int], pad_id: int) -> PaddedBatch:
    """Pad ``windows[rows]`` into one batch without a per-token loop."""
    lengths = np.array([len(windows[i]) for i in rows], dtype=np.int64)
    mask = np.arange(int(lengths.max())) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.concatenate([np.asarray(windows[i], dtype=np.int64) for i in rows])
    return PaddedBatch(rows, lengths, torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64)))
