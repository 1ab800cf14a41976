"""Packed rows without a dense mask: the same logits and loss as the block-causal mask, for every kernel CPU runs,
and a family that cannot read boundaries from position ids keeps the mask."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from raydistill.errors import ConfigError
from raydistill.stages.train.losses import next_token_cross_entropy
from raydistill.stages.train.packing import attention_kernel, model_inputs, packs_by_positions
from raydistill.stages.train.reader import PackedBatch

V = 61
SMALL = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL))
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16, sliding_window=8))
    return LlamaForCausalLM(LlamaConfig(**SMALL))


def _packed(seed: int = 0, lengths: list[list[int]] | None = None) -> PackedBatch:
    """Rows holding 1–4 documents each (default 24 tokens), some longer than Gemma's window."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [[24], [3, 12, 9], [1, 1, 10, 12]]
    segment_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    b, length = segment_ids.shape
    input_ids = torch.randint(0, V, (b, length), generator=g)
    labels = torch.where(torch.cat([segment_ids[:, 1:] == segment_ids[:, :-1], torch.zeros(b, 1, dtype=torch.bool)], 1),
                         torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1), -100)
    zeros = torch.zeros(b, length)
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, labels=labels,
                       target_ids=input_ids[..., None], target_probs=zeros[..., None], tail=zeros,
                       target_mask=labels != -100)


def _loss(model: torch.nn.Module, batch: PackedBatch, *, by_positions: bool) -> torch.Tensor:
    logits = model(**model_inputs(batch, torch.device("cpu"), by_positions=by_positions)).logits
    return next_token_cross_entropy(logits.flatten(0, 1), batch.labels.flatten())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_position_ids_alone_compute_each_document_as_if_alone(family):
    model = _model(family).eval()
    assert packs_by_positions(model, V)
    batch = _packed()
    with torch.no_grad():
        packed = model(**model_inputs(batch, torch.device("cpu"), by_positions=True)).logits
        for row in range(3):
            for piece in batch.segment_ids[row].unique():
                where = batch.segment_ids[row] == piece
                alone = model(input_ids=batch.input_ids[row, where][None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, where], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_without_a_window_the_dense_mask_gives_the_same_loss(family):
    model, batch = _model(family).eval(), _packed()
    with torch.no_grad():
        torch.testing.assert_close(_loss(model, batch, by_positions=True), _loss(model, batch, by_positions=False))


def test_gradients_match_too():
    model, batch = _model("llama"), _packed(1)
    grads = []
    for by_positions in (False, True):
        model.zero_grad(set_to_none=True)
        _loss(model, batch, by_positions=by_positions).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_cache_would_merge_documents_so_it_is_off():
    """Why model_inputs sets use_cache=False: with a cache HF's masking stops looking for packed sequences."""
    model, batch = _model("llama").eval(), _packed()
    inputs = model_inputs(batch, torch.device("cpu"), by_positions=True)
    assert inputs["use_cache"] is False and "attention_mask" not in inputs
    with torch.no_grad():
        merged = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        apart = model(**inputs).logits
    assert not torch.allclose(merged, apart, atol=1e-3)


@pytest.mark.slow  # FlexAttention compiles its kernel on first use: about half a minute on 2 cores
def test_flex_attention_block_masks_give_the_dense_masks_loss():
    """At rows of whole 128-token blocks (what attention_kernel allows); shorter rows gave wrong logits on CPU."""
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "max_position_embeddings": 256})).eval()
    batch = _packed(2, [[3, 60, 65], [128], [1, 1, 100, 26]])
    with torch.no_grad():
        dense = _loss(model, batch, by_positions=False)
        model.set_attn_implementation("flex_attention")
        flex = _loss(model, batch, by_positions=True)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)


class _IgnoresPositions(torch.nn.Module):
    """A 'family' that attends causally over the whole row whatever the position ids say."""

    def __init__(self):
        super().__init__()
        self.inner = _model("llama")
        self.config = self.inner.config

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def test_a_family_that_ignores_position_ids_keeps_the_dense_mask():
    assert not packs_by_positions(_IgnoresPositions(), V)


def test_kernel_choice():
    cpu = torch.device("cpu")
    assert attention_kernel("auto", cpu, 128) == "sdpa"
    assert attention_kernel("flex_attention", cpu, 256) == "flex_attention"
    with pytest.raises(ConfigError, match="flex_attention needs seq_len a multiple of 128"):
        attention_kernel("flex_attention", cpu, 200)
    with pytest.raises(ConfigError, match="flash_attention_2 needs a GPU"):
        attention_kernel("flash_attention_2", cpu, 128)
