"""Streaming reader: packs captured document windows into fixed-length training sequences.

The order is a pure function of (seed, epoch, global sequence index), never of timing:

- each epoch visits shards in a seeded random order and, inside a shard, rows in a seeded
  random order (a shard-level shuffle keeps reads sequential and the decode cache small);
- rows are concatenated into one token stream and cut into sequences of ``seq_len``; a row
  cut in two continues at position 0 of the next sequence;
- global step ``s`` takes sequences ``[s*G, (s+1)*G)`` with ``G = world × micro × accum``;
  rank ``r`` takes its contiguous slice, so every rank runs exactly the same number of steps.

The rows come from a shard set (token ids + teacher targets) or, in corpus mode, from
``text_data.CorpusTokens`` (token ids only, targets of width 0); both are a ``RowSource``.

The resume cursor is the global sequence index, so a resumed run sees exactly the
batches it would have seen. If the world size changes but ``G`` stays the same, the
batches are identical; if ``G`` changes, training continues from the same point in the
token stream with differently sized batches.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from raydistill.contracts.shards.format import DecodedShard


class RowSource(Protocol):
    """What the reader needs of its data: a ``ShardSet``, or ``text_data.CorpusTokens`` in corpus mode."""

    @property
    def target_width(self) -> int:
        """Stored ids per token (k); 0 when there are no teacher targets."""
        ...

    def __len__(self) -> int: ...

    def row_lengths(self, index: int) -> np.ndarray: ...

    def read_shard(self, index: int) -> DecodedShard: ...


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L] int64
    position_ids: torch.Tensor  # [B, L] restart at 0 for every packed piece
    segment_ids: torch.Tensor  # [B, L] piece index; attention stays inside a piece
    labels: torch.Tensor  # [B, L] next token inside the same row, -100 where there is none
    target_ids: torch.Tensor  # [B, L, k] int64, -1 = padding (adaptive/sampled store fewer than k)
    target_probs: torch.Tensor  # [B, L, k] float32, 0 at padding
    tail: torch.Tensor  # [B, L] float32, the ghost bucket: target_probs + tail sum to 1
    target_mask: torch.Tensor  # [B, L] bool: positions with a teacher target (none in corpus mode)

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, L, L] boolean causal mask that never crosses a piece boundary."""
        same = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        length = self.input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        return (same & causal)[:, None]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


class PackedLayout:
    """Maps a global sequence index to the (shard, row, start, length) pieces that fill it."""

    def __init__(self, row_lengths: list[np.ndarray], seq_len: int, seed: int):
        self.row_lengths = [np.asarray(r, dtype=np.int64) for r in row_lengths]
        self.seq_len = seq_len
        self.seed = seed
        self.total_tokens = int(sum(r.sum() for r in self.row_lengths))
        self.sequences_per_epoch = self.total_tokens // seq_len
        if self.sequences_per_epoch == 0:
            raise ValueError(f"the training data holds {self.total_tokens} tokens, fewer than one sequence of "
                             f"{seq_len}")
        self._epoch_cache: tuple[int, tuple[np.ndarray, ...]] | None = None

    def _epoch_stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(shard, row, length, stream start) of every row in the epoch's order."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        shards, rows, lens = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for s in rng.permutation(len(self.row_lengths)):
            perm = rng.permutation(len(self.row_lengths[s]))
            shards.append(np.full(len(perm), s, dtype=np.int64))
            rows.append(perm)
            lens.append(self.row_lengths[s][perm])
        shard_idx, row_idx, lengths = np.concatenate(shards), np.concatenate(rows), np.concatenate(lens)
        keep = lengths > 0
        shard_idx, row_idx, lengths = shard_idx[keep], row_idx[keep], lengths[keep]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._epoch_cache = (epoch, (shard_idx, row_idx, lengths, starts))
        return self._epoch_cache[1]

    def pieces(self, sequence: int) -> list[tuple[int, int, int, int]]:
        """(shard, row, offset in row, length) pieces of global sequence ``sequence``, in order."""
        epoch, index = divmod(sequence, self.sequences_per_epoch)
        shard_idx, row_idx, lengths, starts = self._epoch_stream(epoch)
        lo, hi = index * self.seq_len, (index + 1) * self.seq_len
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        out = []
        i = first
        while i < len(starts) and starts[i] < hi:
            a = max(lo, int(starts[i]))
            b = min(hi, int(starts[i] + lengths[i]))
            out.append((int(shard_idx[i]), int(row_idx[i]), a - int(starts[i]), b - a))
            i += 1
        return out


class PackedReader:
    """Builds the micro-batches of one data-parallel rank, from a cursor, with prefetch."""

    def __init__(self, source: RowSource, *, seq_len: int, micro_batch_size: int, grad_accum: int,
                 rank: int, world_size: int, seed: int, sequence_offset: int = 0, cache_shards: int = 4):
        self.source = source
        self.k = source.target_width
        self.layout = PackedLayout([source.row_lengths(i) for i in range(len(source))], seq_len, seed)
        self.seq_len = seq_len
        self.micro = micro_batch_size
        self.accum = grad_accum
        self.rank = rank
        self.world = world_size
        self.sequence_offset = sequence_offset  # lets a resume with another global batch size continue in place
        self._cache: OrderedDict[int, DecodedShard] = OrderedDict()
        self._cache_size = cache_shards

    @property
    def global_batch_sequences(self) -> int:
        return self.world * self.micro * self.accum

    def _shard(self, index: int) -> DecodedShard:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        shard = self.source.read_shard(index)
        self._cache[index] = shard
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return shard

    def sequence(self, sequence: int) -> dict[str, np.ndarray]:
        """Arrays for one packed sequence (length exactly ``seq_len``)."""
        length, k = self.seq_len, self.k
        out = {
            "input_ids": np.zeros(length, np.int64), "position_ids": np.zeros(length, np.int64),
            "segment_ids": np.zeros(length, np.int64), "labels": np.full(length, -100, np.int64),
            "target_ids": np.full((length, k), -1, np.int64), "target_probs": np.zeros((length, k), np.float32),
            "tail": np.zeros(length, np.float32), "target_mask": np.zeros(length, bool),
        }
        at = 0
        for piece, (shard_i, row, offset, n) in enumerate(self.layout.pieces(sequence)):
            shard = self._shard(shard_i)
            lo = int(shard.offsets[row]) + offset
            row_end = int(shard.offsets[row + 1])
            dst = slice(at, at + n)
            out["input_ids"][dst] = shard.tokens[lo : lo + n]
            out["position_ids"][dst] = np.arange(n)
            out["segment_ids"][dst] = piece
            nxt = shard.tokens[lo + 1 : min(lo + n + 1, row_end)]  # next token, inside the same row only
            out["labels"][at : at + len(nxt)] = nxt
            out["target_ids"][dst] = shard.ids[lo : lo + n]
            out["target_probs"][dst] = shard.probs[lo : lo + n]
            out["tail"][dst] = shard.tail[lo : lo + n]
            out["target_mask"][dst] = k > 0
            at += n
        return out

    def micro_batch(self, step: int, micro: int) -> PackedBatch:
        """Micro-batch ``micro`` (0..accum-1) of global step ``step`` for this rank."""
        first = (self.sequence_offset + step * self.global_batch_sequences
                 + (self.rank * self.accum + micro) * self.micro)
        seqs = [self.sequence(first + j) for j in range(self.micro)]
        stacked = {key: torch.from_numpy(np.stack([s[key] for s in seqs])) for key in seqs[0]}
        return PackedBatch(**stacked)

    def iterate(self, start_step: int, end_step: int, prefetch: int = 4):
        """Yield (step, micro, batch) from ``start_step``; a background thread builds batches ahead."""
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for step in range(start_step, end_step):
                    for micro in range(self.accum):
                        if stop.is_set():
                            return
                        q.put((step, micro, self.micro_batch(step, micro)))
                q.put(None)
            except BaseException as err:  # surface reader errors in the training loop
                q.put(err)

        thread = threading.Thread(target=produce, name="raydistill-prefetch", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while not q.empty():
                q.get_nowait()
