"""The student's loss from its final hidden states and lm_head weight, a chunk of tokens at a time.

Why: the logits path holds [tokens, V] logits, a float32 copy and their gradient at once. At
V = 151,936 and 16k tokens per GPU one float32 buffer is 9.3 GiB, the largest tensor of the step.
Here each chunk of rows goes hidden → logits → loss → gradient of the logits → gradients of the
hidden states and of the weight, inside the forward pass (Liger-Kernel's fused-linear idea, for
sparse targets), so the only [rows, V] tensors alive are one chunk's. The backward pass only
scales the stored gradients by the incoming one.

The loss of a chunk is any of ``losses.py``'s functions applied to the chunk's logits and the
chunk's target rows: the same code, so every kind, temperature, padding, tail bucket, tail prior,
TAID and sampled target is the logits path's by construction. Both parts of the loss are means
over rows (KD over rows with a target, CE over rows with a label) and linear in their per-row
terms, so a chunk contributes its means weighted by its share of those rows, and the chunks' sum
is the whole batch's value.

``LossHeadModel`` wraps a causal LM so that a DeepSpeed engine's forward returns the loss: the
weight is read inside the engine's forward, where ZeRO-3 gathers it. ``has_plain_linear_head``
decides whether a student qualifies: its logits must equal its head applied to its decoder's
output on a probe batch (final-logit soft-capping, logit scales or biases fail that, and keep the
logits path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from raydistill.stages.train.losses import LossOutput

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "LossHeadModel", "RowsObjective", "chunk_rows_for", "fused_linear_loss",
           "has_plain_linear_head"]

# Logit elements per chunk: 2^25 float32 is 128 MiB per [rows, V] buffer (about four are alive at
# once), 220 rows at V = 151,936. Large enough that each chunk's matmuls run at full speed.
DEFAULT_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class RowsObjective:
    """One micro-batch's loss, evaluable on any slice of its flattened rows.

    ``of_rows(logits, rows)`` gives the LossOutput (means over ``rows``) of float32 ``logits``
    [len(rows), vocab]; ``kd_rows`` / ``ce_rows`` [N] mark the rows each mean is over; loss =
    alpha · kd + (1 − alpha) · ce.
    """

    of_rows: Callable[[torch.Tensor, slice], LossOutput]
    kd_rows: torch.Tensor
    ce_rows: torch.Tensor
    alpha: float
    vocab: int


def chunk_rows_for(vocab: int, elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk's logits hold about ``elements`` values."""
    return max(1, elements // max(vocab, 1))


class _FusedLinearLoss(torch.autograd.Function):
    """(loss, kd, ce) of ``hidden @ weight[:vocab].T``, chunk by chunk; gradients made in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, objective: RowsObjective,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vocab, alpha = objective.vocab, objective.alpha
        head = weight[:vocab]
        n_kd = objective.kd_rows.sum().clamp(min=1).to(torch.float32)
        n_ce = objective.ce_rows.sum().clamp(min=1).to(torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        totals = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, min(start + chunk_rows, hidden.shape[0]))
            h = hidden[rows]
            logits = (h @ head.T).float().requires_grad_()  # the logits path's upcast, per chunk
            with torch.enable_grad():
                out = objective.of_rows(logits, rows)
                kd = out.kd * (objective.kd_rows[rows].sum() / n_kd)
                ce = out.ce * (objective.ce_rows[rows].sum() / n_ce)
                part = alpha * kd + (1.0 - alpha) * ce
                (grad_logits,) = torch.autograd.grad(part, logits, allow_unused=True)
            totals += torch.stack([part.detach(), kd.detach(), ce.detach()]).float()
            if grad_logits is None:  # a chunk whose rows carry no loss at all
                grad_hidden[rows] = 0
                continue
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[rows] = grad_logits @ head
            if grad_weight.dtype == h.dtype:
                grad_weight[:vocab].addmm_(grad_logits.T, h)
            else:  # bf16 on a GPU: bf16 matmul, float32 accumulation over chunks
                grad_weight[:vocab] += (grad_logits.T @ h).float()
        ctx.grads = (grad_hidden, grad_weight.to(weight.dtype))
        loss, kd, ce = (t.clone() for t in totals.unbind())  # three tensors, not views of one
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, _kd: torch.Tensor, _ce: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads  # once: the stored gradients are the step's largest tensors after the weights
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None, None


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, objective: RowsObjective, *,
                      chunk_rows: int | None = None) -> LossOutput:
    """The LossOutput of the logits ``hidden @ weight[:vocab].T`` without ever holding them whole.

    hidden [N, d] (any leading dims are flattened) and weight [V_padded, d] get gradients (rows of
    the weight past ``objective.vocab`` get 0); ``chunk_rows`` defaults to ``chunk_rows_for(vocab)``.
    """
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_rows or chunk_rows_for(objective.vocab)
    loss, kd, ce = _FusedLinearLoss.apply(hidden2d, weight, objective, rows)
    return LossOutput(loss=loss, kd=kd, ce=ce)


def _decoder(lm: nn.Module) -> nn.Module | None:
    get = getattr(lm, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not lm else None


@torch.no_grad()
def has_plain_linear_head(lm: nn.Module, vocab: int, probe_tokens: int = 8) -> bool:
    """True when ``lm``'s logits are exactly its bias-free linear head applied to its decoder's last
    hidden state (checked on a probe batch): the condition for ``LossHeadModel``."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    decoder = _decoder(lm)
    if not isinstance(head, nn.Linear) or head.bias is not None or decoder is None:
        return False
    was_training = lm.training
    lm.eval()
    try:
        device = head.weight.device
        ids = (torch.arange(probe_tokens, device=device) * 7919 % max(vocab, 1)).unsqueeze(0)
        logits = lm(input_ids=ids).logits
        again = head(decoder(input_ids=ids)[0])
    finally:
        lm.train(was_training)
    return logits.shape == again.shape and torch.allclose(logits.float(), again.float(), rtol=1e-4, atol=1e-5)


class LossHeadModel(nn.Module):
    """A causal LM whose forward returns (loss, kd, ce) from its hidden states: what DeepSpeed wraps
    when the loss is fused. Its state dict is the LM's own, so checkpoints do not depend on the path."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def head_weight(self) -> torch.nn.Parameter:
        return self.lm.get_output_embeddings().weight

    def forward(self, inputs: dict[str, torch.Tensor], objective: RowsObjective,
                chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = _decoder(self.lm)(**inputs)[0]
        out = fused_linear_loss(hidden, self.head_weight, objective, chunk_rows=chunk_rows)
        return out.loss, out.kd, out.ce  # a tuple: what DeepSpeed's hooks look into for tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return self.lm.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.lm.load_state_dict(state_dict, strict=strict, assign=assign)
