"""How packed rows reach the student's attention: document boundaries as position ids that restart at 0.

Why: a dense [B, 1, L, L] block-causal mask costs O(L²) memory per row and rules out flash kernels,
exactly where students train (seq_len 2k–8k). With no 2D mask and no cache, HF's masking utilities read
the boundaries from the position ids and build what the chosen kernel needs: nothing for
flash-attention (its varlen path takes cumulative lengths from the position ids), a sparse BlockMask
for FlexAttention, a boolean block-causal mask for SDPA (what CPU runs). A family whose masking does
not read position ids would let packed documents see each other, so every student is checked once on
a probe batch (each packed document's logits == those of the document run alone, with SDPA, before
DeepSpeed: the truth, sliding windows included); one that fails keeps the dense mask.

FlexAttention on CPU (torch 2.13) gives wrong logits for rows whose length is not a multiple of its
128-token block (measured: tests/unit/stages/train/test_packing.py), so it is refused at such lengths.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from raydistill.errors import ConfigError
from raydistill.stages.train.reader import PackedBatch

__all__ = ["ATTENTION_KERNELS", "attention_kernel", "model_inputs", "packs_by_positions"]

ATTENTION_KERNELS = ("auto", "sdpa", "flex_attention", "flash_attention_2", "eager")


FLEX_BLOCK = 128  # FlexAttention's default block size


def attention_kernel(requested: str, device: torch.device, seq_len: int) -> str:
    """The HF attention implementation to train with. ``auto``: on a GPU, flash-attention where the
    ``flash_attn`` package is installed, else FlexAttention's block masks at lengths of whole blocks
    (both skip the blocks no document spans); else SDPA, the only one of them CPU runs well.
    ``tools/bench_attention.py`` measures them (docs/benchmarks.md)."""
    if requested not in ATTENTION_KERNELS:
        raise ConfigError(f"attention: '{requested}' is not one of {', '.join(ATTENTION_KERNELS)}")
    if requested == "flex_attention" and seq_len % FLEX_BLOCK:
        raise ConfigError(f"attention: flex_attention needs seq_len a multiple of {FLEX_BLOCK} (got {seq_len}); "
                          "set seq_len or attention: sdpa")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not (has_flash and device.type == "cuda"):
        raise ConfigError("attention: flash_attention_2 needs a GPU and the flash-attn package "
                          "(pip install flash-attn); set attention: auto or sdpa")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"
    return "flash_attention_2" if has_flash else "flex_attention" if seq_len % FLEX_BLOCK == 0 else "sdpa"


def model_inputs(batch: PackedBatch, device: torch.device, *, by_positions: bool) -> dict[str, torch.Tensor | bool]:
    """The student's forward arguments for ``batch``: ids and position ids, plus the dense block-causal
    mask only where the family cannot read boundaries from the position ids."""
    inputs: dict[str, torch.Tensor | bool] = {"input_ids": batch.input_ids.to(device),
                                              "position_ids": batch.position_ids.to(device)}
    if by_positions:
        inputs["use_cache"] = False  # with a cache, HF's masking does not look for packed sequences
    else:
        inputs["attention_mask"] = batch.attention_mask().to(device)
    return inputs


def _probe_batch(vocab: int) -> PackedBatch:
    """Two rows of 16 tokens: three documents in the first, one in the second."""
    segment_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    position_ids = torch.tensor([[*range(5), *range(7), *range(4)], [*range(16)]])
    input_ids = (torch.arange(32).view(2, 16) * 7919 + 13) % max(vocab, 1)
    none = torch.zeros(2, 16)
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, labels=input_ids,
                       target_ids=input_ids[..., None], target_probs=none[..., None], tail=none,
                       target_mask=none.bool())


@torch.no_grad()
def packs_by_positions(model: nn.Module, vocab: int) -> bool:
    """True when ``model``, given only position ids, computes every packed document as if it ran alone
    (SDPA, eval mode)."""
    batch = _probe_batch(vocab)
    device = next(model.parameters()).device
    kernel = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    model.eval()
    try:
        if kernel not in ("sdpa", "eager"):
            model.set_attn_implementation("sdpa")
        packed = model(**model_inputs(batch, device, by_positions=True)).logits.float()
        for row in range(batch.input_ids.shape[0]):
            for piece in batch.segment_ids[row].unique():
                where = batch.segment_ids[row] == piece
                alone = model(input_ids=batch.input_ids[row, where][None].to(device), use_cache=False).logits[0]
                if not torch.allclose(packed[row, where.to(device)], alone.float(), rtol=1e-4, atol=1e-5):
                    return False
    except (TypeError, ValueError):  # a family that takes no such arguments keeps the dense mask
        return False
    finally:
        if kernel not in ("sdpa", "eager", None):
            model.set_attn_implementation(kernel)
        model.train(was_training)
    return True
