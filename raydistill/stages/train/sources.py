"""What a training run learns from: a shard set (sparse KD) or a text corpus (CE), behind one protocol.

The trainer never asks which one it has: it asks the source for its rows (``RowSource``, what
the packed reader needs), its vocabulary, its temperature and tail prior, how to put its
tokenizer beside the exported student, and what to record in ``summary.json``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from raydistill.config.jobs import TrainConfig
from raydistill.contracts.shards.format import DecodedShard
from raydistill.contracts.shards.manifest import Manifest, shard_set_identity
from raydistill.contracts.shards.reader import ShardSet
from raydistill.errors import ConfigError, ContractError, RaydistillError
from raydistill.io import storage
from raydistill.io.corpus import describe
from raydistill.models.tokenizers import load_tokenizer
from raydistill.stages.train.corpus_rows import CorpusTokens
from raydistill.stages.train.reader import RowSource

__all__ = ["CorpusSource", "ShardSource", "TrainingSource", "load_corpus_tokenizer", "open_source"]


class TrainingSource(RowSource, Protocol):
    """A ``RowSource`` plus what training needs around the rows."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def temperature(self) -> float:
        """The temperature the targets were captured at (1 without targets)."""
        ...

    @property
    def teacher(self) -> str | None:
        """The teacher's name_or_path as the capture recorded it (a teacher fraction cuts it), else None."""
        ...

    def tail_prior(self) -> np.ndarray:
        """float64 [V] weights that spread a token's tail over its unstored ids."""
        ...

    def save_tokenizer(self, dest: str) -> None:
        """Put the tokenizer the rows were made with into the local directory ``dest``."""
        ...

    def summary(self) -> dict:
        """summary.json's account of the data; ``data_identity`` tells a finished run on it apart."""
        ...


class ShardSource:
    """A shard set's rows and teacher targets (logit KD); the student uses the teacher's tokenizer."""

    def __init__(self, shards: str):
        self.shard_set = ShardSet(shards)
        self.manifest: Manifest = self.shard_set.manifest

    @property
    def target_width(self) -> int:
        return self.shard_set.target_width

    def __len__(self) -> int:
        return len(self.shard_set)

    def row_lengths(self, index: int) -> np.ndarray:
        return self.shard_set.row_lengths(index)

    def read_shard(self, index: int) -> DecodedShard:
        return self.shard_set.read_shard(index)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def temperature(self) -> float:
        return self.manifest.sparsify.temperature

    @property
    def teacher(self) -> str:
        return self.manifest.teacher.name_or_path

    def tail_prior(self) -> np.ndarray:
        return self.manifest.tail_prior(self.shard_set.vocab_table)

    def save_tokenizer(self, dest: str) -> None:
        fs, path = storage.filesystem(self.shard_set.tokenizer_url())
        if not fs.exists(path):
            raise ContractError(f"shard set {self.shard_set.root} has no tokenizer/ directory; re-run the capture")
        fs.get(path.rstrip("/") + "/", dest, recursive=True)

    def summary(self) -> dict:
        identity = shard_set_identity(self.shard_set.root)
        return {"shards": self.shard_set.root, "shards_identity": identity, "data_identity": identity,
                "teacher": self.manifest.teacher.name_or_path}


class CorpusSource(CorpusTokens):
    """A text corpus tokenized with any tokenizer (CE only, "MiniPLM mode"): targets of width 0."""

    temperature = 1.0  # no teacher targets, so nothing was captured at another temperature
    teacher = None  # nor a teacher that a student could be cut from

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg.corpus, load_corpus_tokenizer(cfg), seq_len=cfg.seq_len)
        self.tokenizer_name = cfg.corpus_tokenizer

    def tail_prior(self) -> np.ndarray:
        return np.full(self.vocab_size, 1.0 / self.vocab_size)

    def save_tokenizer(self, dest: str) -> None:
        self.tokenizer.save_pretrained(dest)

    def summary(self) -> dict:
        return {"corpus": describe(self.corpus), "tokenizer": self.tokenizer_name,
                "tokenizer_sha256": self.tokenizer_sha256, "data_identity": self.identity(),
                "documents": self.num_documents, "skipped_short_documents": self.skipped_short,
                "corpus_tokens": self.num_tokens}


def load_corpus_tokenizer(cfg: TrainConfig):
    """Corpus mode's tokenizer (``tokenizer``, else student.model's), or one ConfigError line naming the field."""
    field = "tokenizer" if cfg.tokenizer else "student.model"
    try:
        return load_tokenizer(cfg.corpus_tokenizer)
    except RaydistillError as err:
        raise ConfigError(f"{field} '{cfg.corpus_tokenizer}' gives no tokenizer for the corpus: {err}"
                          + ("; set tokenizer to the tokenizer to train with" if field == "student.model" else "")
                          ) from None


def open_source(cfg: TrainConfig) -> TrainingSource:
    """The training data of ``cfg``: its shard set, or the corpus tokenized (every rank builds the same one)."""
    return ShardSource(cfg.shards) if cfg.corpus is None else CorpusSource(cfg)
