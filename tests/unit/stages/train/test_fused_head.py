"""The fused head against the logits path: same values and gradients for every loss the project has.

The reference is today's loss on whole logits ``hidden @ weight[:vocab].T`` (float32), differentiated by
autograd; the fused head must match it chunk by chunk, whatever the chunk size (one row, a ragged last
chunk, chunks with no target at all), with a padded vocabulary and padded targets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from raydistill.config import TrainConfig
from raydistill.stages.train.fused_head import (
    LossHeadModel,
    RowsObjective,
    chunk_rows_for,
    fused_linear_loss,
    has_plain_linear_head,
)
from raydistill.stages.train.losses import KINDS, distillation_loss, sampled_distillation_loss
from raydistill.stages.train.objective import build_loss
from raydistill.stages.train.reader import PackedBatch

N, D, V, V_PADDED, K = 13, 6, 17, 20, 4


def _targets(seed: int, *, pad: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    probs = torch.rand(N, K, generator=g)
    probs = probs / probs.sum(-1, keepdim=True) * 0.8
    tail = torch.full((N,), 0.2)
    if pad:  # adaptive/sampled sets store fewer ids for some tokens
        ids[::3, -1] = -1
        probs[::3, -1] = 0.0
        tail[::3] = 1.0 - probs[::3].sum(-1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[4:8] = -100  # document ends: no CE target; rows 4..7 also have no KD target below
    mask = torch.ones(N, dtype=torch.bool)
    mask[3:8] = False
    return {"ids": ids, "probs": probs, "tail": tail, "labels": labels, "target_mask": mask}


def _leaves(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V_PADDED, D, generator=g) * 0.7).to(dtype).requires_grad_()
    return hidden, weight


def _compare(loss_of_logits, t: dict, alpha: float, chunk_rows: int, dtype=torch.float32, tol=1e-5):
    """Fused vs whole-logits: the three values and both gradients."""
    hidden, weight = _leaves(dtype=dtype)
    ref = loss_of_logits((hidden @ weight.T).float(), slice(None))
    ref.loss.backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    objective = RowsObjective(of_rows=loss_of_logits, kd_rows=t["target_mask"], ce_rows=t["labels"] != -100,
                              alpha=alpha, vocab=V)
    out = fused_linear_loss(hidden, weight, objective, chunk_rows=chunk_rows)
    out.loss.backward()
    for got, want in ((out.loss, ref.loss), (out.kd, ref.kd), (out.ce, ref.ce)):
        torch.testing.assert_close(got.float(), want.float().detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad.float(), ref_grads[0].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad.float(), ref_grads[1].float(), rtol=tol, atol=tol)
    assert not weight.grad[V:].any(), "padded vocabulary rows get no gradient"
    return out


def _stored(t: dict, **kw):
    def of_rows(logits, rows):
        return distillation_loss(logits, t["labels"][rows], t["ids"][rows], t["probs"][rows], t["tail"][rows],
                                 t["target_mask"][rows], vocab_size=V, **kw)
    return of_rows


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_every_kind_temperature_and_weight_matches_the_logits_path(kind, temperature, alpha):
    t = _targets(1, pad=True)
    _compare(_stored(t, alpha=alpha, temperature=temperature, kind=kind), t, alpha, chunk_rows=4)


@pytest.mark.parametrize("chunk_rows", [1, 3, 5, N, 64])
def test_any_chunk_size_gives_the_same_loss_and_gradients(chunk_rows):
    t = _targets(2, pad=False)
    _compare(_stored(t, alpha=0.5, temperature=1.0, kind="forward_kl"), t, 0.5, chunk_rows=chunk_rows)


def test_taid_skew_and_tail_prior_match():
    t = _targets(3, pad=True)
    _compare(_stored(t, alpha=0.7, kind="skew_reverse_kl", skew=0.3, taid_lambda=0.4), t, 0.7, chunk_rows=2)
    prior = torch.arange(1, V + 1, dtype=torch.float32)
    _compare(_stored(t, alpha=0.5, temperature=1.5, tail_prior=prior), t, 0.5, chunk_rows=5)


def test_sampled_targets_match():
    t = _targets(4, pad=False)
    counts = torch.randint(0, 5, (N, K))
    draws = counts.sum(-1).clamp(min=1)

    def of_rows(logits, rows):
        return sampled_distillation_loss(logits, t["labels"][rows], t["ids"][rows], counts[rows], draws[rows],
                                         t["target_mask"][rows], alpha=0.5, temperature=1.0, vocab_size=V)
    _compare(of_rows, t, 0.5, chunk_rows=3)


def test_bf16_hidden_and_weight_stay_within_bf16_tolerance():
    """What a GPU run feeds it: bf16 matmuls, float32 loss; stated tolerance 2e-2 (bf16 has 8 bits)."""
    t = _targets(5, pad=True)
    out = _compare(_stored(t, alpha=0.5, temperature=1.0, kind="forward_kl"), t, 0.5, chunk_rows=4,
                   dtype=torch.bfloat16, tol=2e-2)
    assert out.loss.dtype == torch.float32


def test_chunks_follow_the_vocabulary():
    assert chunk_rows_for(151_936) == 220 and chunk_rows_for(49_152) == 682 and chunk_rows_for(10, 5) == 1


def _llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


class _Source:
    target_width, vocab_size, temperature = K, V, 1.0

    def tail_prior(self) -> np.ndarray:
        return np.ones(V)


@pytest.mark.parametrize("tied", [False, True])
def test_the_wrapped_student_gets_the_logits_paths_gradients(tied):
    t = _targets(6, pad=True)
    b, length = 1, N
    batch = PackedBatch(input_ids=torch.randint(0, V, (b, length)), position_ids=torch.arange(length)[None],
                        segment_ids=torch.zeros(b, length, dtype=torch.long), labels=t["labels"][None],
                        target_ids=t["ids"][None], target_probs=t["probs"][None], tail=t["tail"][None],
                        target_mask=t["target_mask"][None])
    loss = build_loss(TrainConfig(shards="s", output="o", loss="jsd", alpha=0.6), _Source(),
                      device=torch.device("cpu"), dtype=torch.float32)
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    lm = _llama(tied)
    assert has_plain_linear_head(lm, V)
    ref = loss(lm(**inputs).logits, batch, inputs, step=0)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)
    wrapped = LossHeadModel(lm)
    got_loss, got_kd, got_ce = wrapped(inputs, loss.rows_objective(batch, 0, torch.device("cpu")), chunk_rows=3)
    got_loss.backward()
    torch.testing.assert_close(got_loss, ref.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_kd, ref.kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_ce, ref.ce.detach(), rtol=1e-5, atol=1e-6)
    for name, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert set(wrapped.state_dict()) == set(lm.state_dict()), "checkpoints do not depend on the path"


def test_heads_that_are_not_plain_linear_keep_the_logits_path():
    assert not has_plain_linear_head(torch.nn.Linear(4, 4), V)  # no decoder
    lm = _llama(False)
    lm.lm_head = torch.nn.Linear(16, V, bias=True)
    assert not has_plain_linear_head(lm, V)  # a bias the fused loss does not add
    cfg = Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, max_position_embeddings=32, final_logit_softcapping=2.0)
    assert not has_plain_linear_head(Gemma2ForCausalLM(cfg), V)  # logits soft-capped after the head
    cfg.final_logit_softcapping = None
    assert has_plain_linear_head(Gemma2ForCausalLM(cfg), V)


def test_online_kd_is_never_fused():
    cfg = TrainConfig(shards="s", output="o", online_teacher="t")
    assert cfg.fused_loss
    from raydistill.stages.train.objective import OnlineKD
    assert OnlineKD.fusable is False
