"""Training rows straight from a text corpus: "MiniPLM mode", CE only, with any tokenizer.

A shard set ties the student to the teacher's tokenizer, because its targets are teacher
token ids. Training on text instead (for example a corpus the teacher helped select) has no
teacher targets at all, so the student may use any tokenizer. ``CorpusTokens`` tokenizes the
corpus and serves it to :class:`raydistill.stages.train.reader.PackedReader` in the shape of a shard set:
pseudo-shards of consecutive documents whose rows are document windows, with target arrays
of width 0 and a tail of 0. Packing, rank slicing and the resume cursor are therefore exactly
those of shard mode.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from raydistill.config.sections import CorpusConfig
from raydistill.contracts.selection import selected_documents
from raydistill.contracts.shards.format import DecodedShard
from raydistill.errors import ConfigError
from raydistill.io.corpus import Document
from raydistill.models.tokenizers import tokenizer_sha256, vocab_size_of
from raydistill.models.windows import cut_windows

__all__ = ["DOCS_PER_SHARD", "CorpusTokens", "corpus_identity", "documents_identity"]

DOCS_PER_SHARD = 64  # documents per pseudo-shard: the unit of PackedReader's shuffle and cache
MIN_DOCUMENT_TOKENS = 2  # a document needs one next token to give a CE label


def documents_identity(tokenizer_sha: str, doc_ids: list[str]) -> str:
    """sha256 over the tokenizer's hash and the document ids in order: same value, same rows."""
    digest = hashlib.sha256(tokenizer_sha.encode())
    for doc_id in doc_ids:
        digest.update(b"\n" + doc_id.encode())
    return digest.hexdigest()


def corpus_identity(corpus: CorpusConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """:meth:`CorpusTokens.identity` without tokenizing (finished runs are recognised cheaply)."""
    return documents_identity(tokenizer_sha256(tokenizer), [d.id for d in selected_documents(corpus)])


@dataclass
class _PseudoShard:
    """The rows of a few consecutive documents, flat: row i is ``tokens[offsets[i]:offsets[i+1]]``."""

    doc_ids: list[str]  # per row
    windows: np.ndarray  # [rows] int32, the row's window index inside its document
    offsets: np.ndarray  # [rows+1] int64
    tokens: np.ndarray  # [T] int32 (int64 on decode)


class CorpusTokens:
    """A tokenized text corpus that :class:`raydistill.stages.train.reader.PackedReader` reads like a shard set.

    Every document is tokenized without special tokens and cut into rows of at most
    ``seq_len + 1`` tokens (``models.windows.cut_windows``), so a row fills one packed sequence and
    still labels its last position; documents with fewer than 2 tokens are skipped and
    counted (``skipped_short``). Kept documents are grouped, in corpus order, into
    pseudo-shards of ``docs_per_shard`` documents.

    Every training worker builds its own copy from the same corpus and tokenizer; the order is
    the corpus reader's, so the copies are identical and ranks need not exchange anything.
    That costs one tokenization of the whole corpus per worker and keeps its tokens in
    memory: right for corpora of up to some hundred million tokens. Larger corpora should be
    captured (``raydistill precompute``) or pre-tokenized once instead.
    """

    target_width = 0  # no teacher targets: PackedReader's ids/probs arrays have width 0

    def __init__(self, corpus: CorpusConfig, tokenizer: PreTrainedTokenizerBase, *, seq_len: int,
                 docs_per_shard: int = DOCS_PER_SHARD):
        if docs_per_shard < 1:
            raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.tokenizer_sha256 = tokenizer_sha256(tokenizer)
        self.vocab_size = vocab_size_of(tokenizer)
        self.row_tokens = seq_len + 1
        documents = selected_documents(corpus)
        self._identity = documents_identity(self.tokenizer_sha256, [d.id for d in documents])
        kept = self._tokenize(documents, batch=docs_per_shard)
        self.skipped_short = len(documents) - len(kept)
        self.num_documents = len(kept)
        if not kept:
            raise ConfigError(f"corpus {corpus.source!r} holds no document of {MIN_DOCUMENT_TOKENS} or more tokens "
                              f"({len(documents)} read); check corpus.source, corpus.split and corpus.text_field")
        self._shards = [self._pseudo_shard(kept[i : i + docs_per_shard]) for i in range(0, len(kept), docs_per_shard)]
        self.num_tokens = int(sum(s.offsets[-1] for s in self._shards))

    def _tokenize(self, documents: list[Document], batch: int) -> list[tuple[str, np.ndarray]]:
        """(doc id, token ids) of every document long enough to train on, in corpus order."""
        kept = []
        for start in range(0, len(documents), batch):
            chunk = documents[start : start + batch]
            encoded = self.tokenizer([d.text for d in chunk], add_special_tokens=False, verbose=False)["input_ids"]
            kept += [(d.id, np.asarray(ids, dtype=np.int32)) for d, ids in zip(chunk, encoded, strict=True)
                     if len(ids) >= MIN_DOCUMENT_TOKENS]
        return kept

    def _pseudo_shard(self, documents: list[tuple[str, np.ndarray]]) -> _PseudoShard:
        doc_ids, windows, rows = [], [], []
        for doc_id, ids in documents:
            for w, row in enumerate(cut_windows(ids, self.row_tokens)):
                doc_ids.append(doc_id)
                windows.append(w)
                rows.append(row)
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        return _PseudoShard(doc_ids=doc_ids, windows=np.asarray(windows, dtype=np.int32),
                            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                            tokens=np.concatenate(rows).astype(np.int32))

    def __len__(self) -> int:
        return len(self._shards)

    def identity(self) -> str:
        """Stable identity of the training data: the tokenizer's hash and the corpus's document ids in order."""
        return self._identity

    def row_lengths(self, index: int) -> np.ndarray:
        """Tokens per row of pseudo-shard ``index`` (for packing plans)."""
        return np.diff(self._shards[index].offsets)

    def read_shard(self, index: int) -> DecodedShard:
        """Pseudo-shard ``index`` as a DecodedShard: the tokens, targets of width 0, a tail of 0."""
        shard = self._shards[index]
        total = int(shard.offsets[-1])
        return DecodedShard(
            doc_ids=list(shard.doc_ids), windows=shard.windows.copy(), offsets=shard.offsets.copy(),
            tokens=shard.tokens.astype(np.int64), num_ids=np.zeros(total, np.int64),
            ids=np.zeros((total, 0), np.int64), probs=np.zeros((total, 0), np.float32),
            tail=np.zeros(total, np.float32), stored_tail=np.zeros(total, np.float32),
        )
