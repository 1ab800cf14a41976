"""The training objective, chosen once per run: ``build_loss(cfg, source)`` gives one callable per kind.

- no teacher targets (a corpus, or a CE-only baseline's ``loss: ce`` on shards): next-token CE;
- ``online_teacher``: the teacher runs on the same batch and KD is over its full distribution;
- stored targets: sparse KD over the stored ids plus the ghost bucket (or the tail prior), mixed
  with CE by α, optionally with the TAID schedule.

Every loss returns a ``LossOutput`` (loss, kd, ce), so the trainer logs them the same way. The
CE and sparse-KD losses can also be evaluated on any slice of a micro-batch's rows
(``rows_objective``), which is what the fused head (``fused_head.py``) needs to compute them a chunk
of tokens at a time; online KD cannot (its teacher's logits are whole anyway) and keeps full logits.
"""

from __future__ import annotations

from typing import Protocol

import torch

from raydistill.config.jobs import TrainConfig
from raydistill.models.loading import load_causal_lm
from raydistill.stages.train.fused_head import RowsObjective
from raydistill.stages.train.losses import (
    LossOutput,
    dense_distillation_loss,
    distillation_loss,
    next_token_cross_entropy,
    taid_lambda,
)
from raydistill.stages.train.packing import model_inputs
from raydistill.stages.train.reader import PackedBatch
from raydistill.stages.train.sources import TrainingSource

__all__ = ["Loss", "build_loss"]


class Loss(Protocol):
    fusable: bool  # has ``rows_objective``: the fused head can compute it a chunk of rows at a time

    def __call__(self, logits: torch.Tensor, batch: PackedBatch, inputs: dict[str, torch.Tensor], step: int
                 ) -> LossOutput:
        """The loss of one micro-batch: the student's ``logits`` [B, L, V] for ``batch`` (``inputs`` are its
        tensors on the device), at optimizer step ``step``."""
        ...


class _RowsLoss:
    """A loss defined on any slice of the micro-batch's flattened rows (``of_rows``): called on whole
    logits, or handed to the fused head as a ``RowsObjective``."""

    alpha: float
    vocab_size: int
    fusable = True

    def of_rows(self, logits: torch.Tensor, rows: slice, batch: PackedBatch, step: int) -> LossOutput:
        raise NotImplementedError

    def __call__(self, logits, batch, inputs, step) -> LossOutput:
        return self.of_rows(logits.flatten(0, 1).float(), slice(None), batch, step)

    def rows_objective(self, batch: PackedBatch, step: int, device: torch.device) -> RowsObjective:
        """This micro-batch's loss for the fused head, its tensors moved to ``device`` once."""
        batch = PackedBatch(**{name: getattr(batch, name).to(device) for name in batch.__dataclass_fields__})
        return RowsObjective(of_rows=lambda logits, rows: self.of_rows(logits, rows, batch, step),
                             kd_rows=batch.target_mask.flatten().bool(), ce_rows=batch.labels.flatten() != -100,
                             alpha=self.alpha, vocab=self.vocab_size)


class CrossEntropyOnly(_RowsLoss):
    """Next-token CE over the vocabulary; reported as a LossOutput with kd 0."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.alpha = vocab_size, 0.0

    def of_rows(self, logits, rows, batch, step) -> LossOutput:
        labels = batch.labels.flatten()[rows].to(logits.device)
        ce = next_token_cross_entropy(logits, labels, vocab_size=self.vocab_size)
        return LossOutput(loss=ce, kd=ce.new_zeros(()), ce=ce)


class OnlineKD:
    """The online-KD baseline: a frozen teacher in the loop, forward KL over its whole distribution."""

    fusable = False  # the teacher's logits are whole: nothing to save by chunking the student's

    def __init__(self, cfg: TrainConfig, source: TrainingSource, device: torch.device, dtype: torch.dtype):
        self.teacher = load_causal_lm(cfg.online_teacher, dtype=dtype).to(device).eval().requires_grad_(False)
        self.alpha, self.temperature, self.vocab_size = cfg.kd_weight, source.temperature, source.vocab_size

    def __call__(self, logits, batch, inputs, step) -> LossOutput:
        with torch.no_grad():  # the dense mask: the teacher's family may not read packing from position ids
            teacher_logits = self.teacher(**model_inputs(batch, logits.device, by_positions=False)).logits
        device = logits.device
        return dense_distillation_loss(
            logits.flatten(0, 1).float(), teacher_logits.flatten(0, 1), batch.labels.flatten().to(device),
            batch.target_mask.flatten().to(device), alpha=self.alpha, temperature=self.temperature,
            vocab_size=self.vocab_size)


class SparseKD(_RowsLoss):
    """Sparse KD against the stored targets (ghost bucket or tail prior), mixed with CE by α."""

    def __init__(self, cfg: TrainConfig, source: TrainingSource, device: torch.device):
        self.cfg = cfg
        self.alpha, self.temperature, self.vocab_size = cfg.kd_weight, source.temperature, source.vocab_size
        self.tail_prior = None
        if cfg.tail_target == "prior" and self.alpha > 0:  # the set's tail model, inside the loss
            self.tail_prior = torch.from_numpy(source.tail_prior()).float().to(device)

    def of_rows(self, logits, rows, batch, step) -> LossOutput:
        cfg, device = self.cfg, logits.device
        return distillation_loss(
            logits, batch.labels.flatten()[rows].to(device),
            batch.target_ids.flatten(0, 1)[rows].to(device), batch.target_probs.flatten(0, 1)[rows].to(device),
            batch.tail.flatten()[rows].to(device), batch.target_mask.flatten()[rows].to(device),
            alpha=self.alpha, temperature=self.temperature, vocab_size=self.vocab_size,
            kind="forward_kl" if cfg.loss == "ce" else cfg.loss, skew=cfg.skew,
            taid_lambda=taid_lambda(step, cfg.steps, cfg.taid_start, cfg.taid_fraction) if cfg.taid else None,
            tail_prior=self.tail_prior,
        )


def build_loss(cfg: TrainConfig, source: TrainingSource, *, device: torch.device, dtype: torch.dtype) -> Loss:
    """The run's loss: CE where there are no teacher targets, online KD with an online teacher, else sparse KD.

    ``dtype`` is the online teacher's (bf16 on a GPU run, fp32 on CPU)."""
    if source.target_width == 0:
        return CrossEntropyOnly(source.vocab_size)
    if cfg.online_teacher:
        return OnlineKD(cfg, source, device, dtype)
    return SparseKD(cfg, source, device)
