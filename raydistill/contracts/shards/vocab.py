"""The vocabulary table of a shard set: corpus token counts, the id renumbering, the tail prior.

Counted on a sample of the corpus before capture starts, so every shard of a set uses the
same table. Two things derive from it, both written into the spec (docs/format.md):

* ``rank``: ids renumbered by descending count (ties by id). The teacher's likely next
  tokens are mostly frequent ones, so after renumbering a token's stored ids are small
  numbers with small gaps, which is what the delta codec compresses.
* ``tail prior``: how the tail mass is spread over the ids a token did not store,
  proportional to ``(count + 1/2) ** exponent``. The flat unigram (exponent 1) over-weights
  the frequent ids the teacher already stored; exponent 3/4 measured best on both a small
  demo teacher and a real LM (docs/format.md, section 7).

Stored as ``vocab.parquet`` with one ``uint64`` column ``count`` (row i = token id i); its
sha256 is in the manifest and checked on load.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.errors import ShardError
from raydistill.io import storage

VOCAB_TABLE_NAME = "vocab.parquet"
COUNT_SMOOTHING = 0.5


class VocabTable:
    """Token counts over a corpus sample, with the renumbering and tail prior derived from them."""

    def __init__(self, counts: np.ndarray):
        counts = np.asarray(counts)
        if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
            raise ValueError("vocabulary counts must be a non-empty 1-D array of non-negative integers")
        self.counts = counts.astype(np.uint64)
        order = np.lexsort((np.arange(counts.size), -counts.astype(np.float64)))  # count desc, id asc
        self.id_of_rank = order.astype(np.int64)
        self.rank_of_id = np.empty_like(self.id_of_rank)
        self.rank_of_id[order] = np.arange(counts.size, dtype=np.int64)

    @classmethod
    def count(cls, token_lists: Iterable[Iterable[int]], vocab_size: int) -> VocabTable:
        counts = np.zeros(vocab_size, dtype=np.int64)
        for ids in token_lists:
            arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
            if arr.size:
                counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
        return cls(counts)

    @classmethod
    def uniform(cls, vocab_size: int) -> VocabTable:
        """All counts equal: identity renumbering, uniform prior."""
        return cls(np.zeros(vocab_size, dtype=np.int64))

    @property
    def vocab_size(self) -> int:
        return int(self.counts.size)

    @property
    def sample_tokens(self) -> int:
        return int(self.counts.sum())

    def prior(self, exponent: float) -> np.ndarray:
        """float64 [V] tail prior ∝ (count + 1/2) ** exponent, summing to 1 (exponent 0: uniform)."""
        weights = (self.counts.astype(np.float64) + COUNT_SMOOTHING) ** float(exponent)
        return weights / weights.sum()

    def to_bytes(self) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"count": pa.array(self.counts, pa.uint64())}), sink, compression="zstd")
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> VocabTable:
        try:
            table = pq.ParquetFile(pa.BufferReader(data)).read()
        except (pa.ArrowException, OSError) as err:
            raise ShardError(f"{where} is not a readable Parquet file ({err})") from None
        if table.column_names != ["count"] or not pa.types.is_uint64(table.schema.field("count").type):
            raise ShardError(f"{where} must have exactly one uint64 column 'count', has {table.schema}")
        return cls(table.column("count").to_numpy())


def write_vocab_table(root: str, table: VocabTable) -> tuple[str, str]:
    """Write ``root/vocab.parquet`` atomically; returns (relative path, sha256)."""
    data = table.to_bytes()
    storage.atomic_write_bytes(storage.join(root, VOCAB_TABLE_NAME), data)
    return VOCAB_TABLE_NAME, storage.sha256_bytes(data)


def load_vocab_table(url: str, vocab_size: int, sha256: str | None = None) -> tuple[VocabTable, str]:
    """Load the table at ``url`` (one read) and check it: its sha256 against ``sha256`` when given,
    its length against ``vocab_size``. Returns the table and the sha256 of its bytes."""
    if not storage.exists(url):
        raise ShardError(f"{url} is missing; the shard set cannot be decoded without it (re-run capture)")
    data = storage.read_bytes(url)
    actual = storage.sha256_bytes(data)
    if sha256 is not None and actual != sha256:
        raise ShardError(f"{url} does not match the manifest's sha256 (corrupted); re-run capture")
    table = VocabTable.from_bytes(data, url)
    if table.vocab_size != vocab_size:
        raise ShardError(f"{url} has {table.vocab_size} counts but the manifest's vocab_size is {vocab_size}")
    return table, actual


def read_vocab_table(root: str, relpath: str, sha256: str, vocab_size: int) -> VocabTable:
    """Load and check the table the manifest names (size, checksum and length)."""
    return load_vocab_table(storage.join(root, relpath), vocab_size, sha256)[0]
