"""GPU-only checks (``pytest -m gpu``, run by tools/gpu_check.sh on a GPU machine; CI has none and deselects them).

The same comparisons as the CPU tests, on the device and in bf16, where the kernels differ: the fused head
against full logits, and packed attention through position ids (FlexAttention, flash-attention where
installed) against the dense block-causal mask. Tolerances are bf16's (8-bit mantissa): 2e-2 relative.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from raydistill.models.sizes import build_llama
from raydistill.stages.train.fused_head import RowsObjective, fused_linear_loss
from raydistill.stages.train.losses import KINDS, distillation_loss, next_token_cross_entropy
from raydistill.stages.train.packing import model_inputs
from raydistill.stages.train.reader import PackedBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
BF16_TOL = 2e-2


@pytest.mark.parametrize("kind", KINDS)
def test_fused_head_matches_full_logits_in_bf16_at_a_real_vocabulary(kind):
    n, d, vocab, k = 2048, 512, 151_936, 64
    g = torch.Generator(device=CUDA).manual_seed(0)
    hidden = torch.randn(n, d, device=CUDA, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, d, device=CUDA, generator=g) * 0.05).bfloat16().requires_grad_()
    ids = (torch.randint(0, vocab, (n, 1), device=CUDA, generator=g) + torch.arange(k, device=CUDA) * 7919) % vocab
    probs = torch.rand(n, k, device=CUDA, generator=g) ** 4
    probs = probs / probs.sum(-1, keepdim=True) * 0.9
    tail = torch.full((n,), 0.1, device=CUDA)
    labels = torch.randint(0, vocab, (n,), device=CUDA, generator=g)
    mask = torch.ones(n, dtype=torch.bool, device=CUDA)

    def of_rows(logits, rows):
        return distillation_loss(logits, labels[rows], ids[rows], probs[rows], tail[rows], mask[rows], alpha=0.5,
                                 kind=kind, vocab_size=vocab)
    ref = of_rows((hidden @ weight.T).float(), slice(None))
    ref.loss.backward()
    want = hidden.grad.float().clone(), weight.grad.float().clone()
    hidden.grad = weight.grad = None
    torch.cuda.reset_peak_memory_stats(CUDA)
    out = fused_linear_loss(hidden, weight, RowsObjective(of_rows, mask, mask, 0.5, vocab))
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=BF16_TOL, atol=BF16_TOL)
    for got, expected in zip((hidden.grad.float(), weight.grad.float()), want, strict=True):
        assert (got - expected).norm() <= BF16_TOL * expected.norm()


def _packed(rows: int, seq_len: int, vocab: int) -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    segment_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    position_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randint(1, seq_len, (3,), generator=g).tolist())
        for start, end in zip([0, *cuts], [*cuts, seq_len], strict=True):
            segment_ids[r, start:] += 1 if start else 0
            position_ids[r, start:end] = torch.arange(end - start)
    input_ids = torch.randint(0, vocab, (rows, seq_len), generator=g)
    same = torch.cat([segment_ids[:, 1:] == segment_ids[:, :-1], torch.zeros(rows, 1, dtype=torch.bool)], 1)
    labels = torch.where(same, torch.roll(input_ids, -1, 1), -100)
    z = torch.zeros(rows, seq_len)
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, labels=labels,
                       target_ids=input_ids[..., None], target_probs=z[..., None], tail=z, target_mask=labels != -100)


KERNELS = ["sdpa", "flex_attention"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_attention_kernels_give_the_dense_masks_loss(kernel):
    vocab = 4096
    model = build_llama(vocab_size=vocab, hidden=256, layers=2, heads=4, max_positions=2048).to(CUDA, torch.bfloat16)
    batch = _packed(4, 1024, vocab)
    labels = batch.labels.flatten().to(CUDA)
    with torch.no_grad():
        dense = next_token_cross_entropy(model(**model_inputs(batch, CUDA, by_positions=False)).logits.flatten(0, 1),
                                         labels)
        model.set_attn_implementation(kernel)
        packed = next_token_cross_entropy(model(**model_inputs(batch, CUDA, by_positions=True)).logits.flatten(0, 1),
                                          labels)
    torch.testing.assert_close(packed, dense, rtol=BF16_TOL, atol=BF16_TOL)


@pytest.mark.parametrize("mode", ["topk", "budget", "sampled", "hybrid"])
def test_triton_capture_head_matches_torchs_ops_on_bf16_logits(mode, monkeypatch):
    """The capture's Triton kernels against torch's ops on the device: a 1.6B teacher's head shape, bf16."""
    from raydistill.stages.capture import gpu_kernels, sparsify

    assert gpu_kernels.available(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(1)
    hidden = torch.randn(4096, 2048, device=CUDA, generator=g).bfloat16()
    weight = (torch.randn(151_936, 2048, device=CUDA, generator=g) * 0.02).bfloat16()
    kw = {"uniforms": torch.rand(4096, 64, device=CUDA, generator=g)} if mode in ("sampled", "hybrid") else {}
    if mode == "hybrid":
        kw["uniforms"] = kw["uniforms"][:, :16]
    runs = {}
    for path in ("torch", "triton"):
        monkeypatch.setattr(sparsify, "TRITON_DEVICES", {"cuda"} if path == "triton" else set())
        runs[path] = sparsify.sparsify_hidden(hidden, weight, k=96 if mode == "budget" else 64, mode=mode,
                                              vocab_size=151_646, chunk_size=1024, **kw)
    ref, got = runs["torch"], runs["triton"]
    logits = torch.mm(hidden, weight[:151_646].T)  # as the head computes them
    # bf16 logits tie often: the same values at the stored ids (ids may differ among equal values)
    real = ref.ids >= 0
    assert torch.equal(real, got.ids >= 0)
    if mode == "sampled":  # draws: equal except where a target sits within rounding of a boundary
        assert (got.ids == ref.ids).float().mean() > 0.99
    else:
        torch.testing.assert_close(logits.gather(1, got.ids.clamp(min=0))[real],
                                   logits.gather(1, ref.ids.clamp(min=0))[real])
    torch.testing.assert_close(got.probs, ref.probs, atol=1e-3, rtol=BF16_TOL)
    torch.testing.assert_close(got.tail, ref.tail, atol=1e-3, rtol=BF16_TOL)
