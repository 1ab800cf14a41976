"""``build_loss`` picks the objective from what the source holds and the config asks, never from its class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydistill.config import TrainConfig
from raydistill.stages.train.losses import next_token_cross_entropy
from raydistill.stages.train.objective import CrossEntropyOnly, OnlineKD, SparseKD, build_loss
from raydistill.stages.train.reader import PackedBatch

V, K = 11, 3


class FakeSource:
    """Any object with the TrainingSource attributes will do."""

    def __init__(self, width: int):
        self.target_width, self.vocab_size, self.temperature = width, V, 1.0

    def tail_prior(self) -> np.ndarray:
        return np.arange(1, V + 1, dtype=np.float64)


def _batch(width: int) -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    b, length = 2, 5
    probs = torch.rand(b, length, width, generator=g)
    probs = probs / probs.sum(-1, keepdim=True) * 0.9
    return PackedBatch(input_ids=torch.randint(0, V, (b, length), generator=g),
                       position_ids=torch.arange(length).repeat(b, 1), segment_ids=torch.zeros(b, length, dtype=torch.long),
                       labels=torch.randint(0, V, (b, length), generator=g),
                       target_ids=torch.stack([torch.randperm(V, generator=g)[:width] for _ in range(b * length)]).view(
                           b, length, width),
                       target_probs=probs, tail=torch.full((b, length), 0.1), target_mask=torch.ones(b, length, dtype=torch.bool))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(shards="s", output="o", **kw)


def test_no_targets_means_cross_entropy_whatever_the_loss_says():
    loss = build_loss(_cfg(loss="ce"), FakeSource(0), device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(loss, CrossEntropyOnly)
    batch = _batch(0)
    logits = torch.randn(2, 5, V)
    out = loss(logits, batch, {}, step=0)
    assert torch.equal(out.ce, next_token_cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), vocab_size=V))
    assert float(out.kd) == 0.0 and torch.equal(out.loss, out.ce)


@pytest.mark.parametrize(("kw", "alpha"), [({"loss": "forward_kl", "alpha": 0.3}, 0.3), ({"loss": "ce"}, 0.0),
                                           ({"loss": "tvd", "taid": True}, 0.5)])
def test_stored_targets_mean_sparse_kd_at_the_configs_weight(kw, alpha):
    loss = build_loss(_cfg(**kw), FakeSource(K), device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(loss, SparseKD) and loss.alpha == alpha
    out = loss(torch.randn(2, 5, V, requires_grad=True), _batch(K), {}, step=1)
    assert torch.isfinite(out.loss) and (float(out.kd.detach()) > 0) == (alpha > 0)


def test_tail_prior_comes_from_the_source_only_when_asked():
    plain = build_loss(_cfg(), FakeSource(K), device=torch.device("cpu"), dtype=torch.float32)
    prior = build_loss(_cfg(tail_target="prior"), FakeSource(K), device=torch.device("cpu"), dtype=torch.float32)
    assert plain.tail_prior is None and torch.equal(prior.tail_prior, torch.arange(1, V + 1, dtype=torch.float32))


def test_an_online_teacher_means_online_kd(tiny_teacher):
    loss = build_loss(_cfg(online_teacher=tiny_teacher), FakeSource(K), device=torch.device("cpu"),
                      dtype=torch.float32)
    assert isinstance(loss, OnlineKD) and not any(p.requires_grad for p in loss.teacher.parameters())
