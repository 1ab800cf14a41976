"""The packing reader: exact coverage, determinism, rank slicing, resume from a cursor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import write_synthetic_set

from raydistill.contracts.shards import Codec, ShardSet, TargetWindow, VocabTable
from raydistill.stages.train.reader import PackedLayout, PackedReader

VOCAB, K = 500, 4


def _window(rng, doc: int, n: int) -> TargetWindow:
    probs = np.sort(rng.dirichlet(np.ones(K + 1)))[::-1][:K].astype(np.float32)
    probs = np.tile(probs, (n, 1))
    ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(n)])
    return TargetWindow(doc_id=f"{doc:016x}", window=0, tokens=rng.integers(0, VOCAB, n),
                        ids=ids, probs=probs, tail=(1 - probs.sum(1)).astype(np.float32))


def make_shard_set(root: str, rows_per_shard: list[list[int]], seed: int = 0) -> ShardSet:
    rng = np.random.default_rng(seed)
    per_unit, doc = [], 0
    for lengths in rows_per_shard:
        per_unit.append([_window(rng, doc + i, n) for i, n in enumerate(lengths)])
        doc += len(lengths)
    codec = Codec("topk", K, VOCAB, VocabTable(rng.integers(0, 50, VOCAB)))
    return write_synthetic_set(root, per_unit, codec)


@pytest.fixture()
def shard_set(tmp_path) -> ShardSet:
    rng = np.random.default_rng(1)
    return make_shard_set(str(tmp_path / "set"), [list(rng.integers(1, 60, 9)) for _ in range(4)])


def test_one_epoch_covers_every_token_once(shard_set):
    lengths = [shard_set.row_lengths(i) for i in range(len(shard_set.manifest.shards))]
    plan = PackedLayout(lengths, seq_len=16, seed=3)
    seen = {}
    for seq in range(plan.sequences_per_epoch):
        pieces = plan.pieces(seq)
        assert sum(p[3] for p in pieces) == 16
        for shard, row, offset, n in pieces:
            for t in range(offset, offset + n):
                key = (shard, row, t)
                assert key not in seen
                seen[key] = seq
    total = sum(int(x.sum()) for x in lengths)
    assert len(seen) == plan.sequences_per_epoch * 16 > total - 16


def test_order_depends_on_seed_and_epoch_only(shard_set):
    lengths = [shard_set.row_lengths(i) for i in range(len(shard_set.manifest.shards))]
    a, b, c = (PackedLayout(lengths, 16, seed) for seed in (0, 0, 1))
    per_epoch = a.sequences_per_epoch
    assert [a.pieces(i) for i in range(5)] == [b.pieces(i) for i in range(5)]
    assert [a.pieces(i) for i in range(5)] != [c.pieces(i) for i in range(5)]
    assert [a.pieces(i) for i in range(5)] != [a.pieces(per_epoch + i) for i in range(5)]


def test_sequence_contents_labels_and_mask(shard_set):
    reader = PackedReader(shard_set, seq_len=24, micro_batch_size=3, grad_accum=1, rank=0, world_size=1, seed=0)
    batch = reader.micro_batch(0, 0)
    assert batch.input_ids.shape == (3, 24) and batch.target_ids.shape == (3, 24, K)
    for b in range(3):
        seg = batch.segment_ids[b]
        for i in range(23):
            label = batch.labels[b, i].item()
            if seg[i] == seg[i + 1]:
                assert label == batch.input_ids[b, i + 1].item()  # next token inside the same piece
        starts = torch.nonzero(torch.diff(seg)).flatten() + 1
        assert (batch.position_ids[b, starts] == 0).all()
    mask = batch.attention_mask()
    assert mask.shape == (3, 1, 24, 24)
    assert not mask[0, 0].triu(1).any()  # causal
    same = batch.segment_ids[0][:, None] == batch.segment_ids[0][None, :]
    assert not (mask[0, 0] & ~same).any()  # never across pieces
    np.testing.assert_allclose(batch.target_probs.sum(-1) + batch.tail, 1.0, atol=2e-3)


def test_ranks_split_the_same_global_batch(shard_set):
    single = PackedReader(shard_set, seq_len=16, micro_batch_size=4, grad_accum=1, rank=0, world_size=1, seed=5)
    ranks = [PackedReader(shard_set, seq_len=16, micro_batch_size=2, grad_accum=1, rank=r, world_size=2, seed=5)
             for r in range(2)]
    for step in range(3):
        whole = single.micro_batch(step, 0).input_ids
        parts = torch.cat([r.micro_batch(step, 0).input_ids for r in ranks])
        assert torch.equal(whole, parts)


def test_iterate_from_a_cursor_gives_the_same_batches(shard_set):
    reader = PackedReader(shard_set, seq_len=16, micro_batch_size=2, grad_accum=2, rank=1, world_size=2, seed=0)
    full = [(s, m, b.input_ids) for s, m, b in reader.iterate(0, 6)]
    resumed = [(s, m, b.input_ids) for s, m, b in reader.iterate(4, 6)]
    assert len(full) == 12 and len(resumed) == 4
    for (s1, m1, x1), (s2, m2, x2) in zip(full[8:], resumed, strict=True):
        assert (s1, m1) == (s2, m2) and torch.equal(x1, x2)
