"""One training worker's job as a ``Trainer``: set up, step through the packed batches, checkpoint, export.

``train_loop`` is what Ray Train runs in every worker; it builds a :class:`Trainer` from the
worker's context and calls :meth:`Trainer.fit`. Every rank takes exactly the same number of
steps (the reader guarantees it), which ZeRO-3's collectives require. The teacher is never
loaded, except by the online-KD baseline's loss (``objective.OnlineKD``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raydistill.config.jobs import TrainConfig
from raydistill.config.sections import EngineConfig, OptimizerConfig, ScheduleConfig
from raydistill.contracts.students import MODEL_DIR, write_summary
from raydistill.io import storage
from raydistill.models.loading import align_special_tokens, count_parameters
from raydistill.models.students import build_student, student_config_sha256
from raydistill.models.tokenizers import load_tokenizer
from raydistill.stages.train.checkpoints import TRAIN_CONFIG_FILE, load_deepspeed_checkpoint
from raydistill.stages.train.engine import deepspeed_config, import_deepspeed
from raydistill.stages.train.fused_head import LossHeadModel, has_plain_linear_head
from raydistill.stages.train.losses import LossOutput
from raydistill.stages.train.metrics import MetricsLog
from raydistill.stages.train.objective import build_loss
from raydistill.stages.train.packing import attention_kernel, model_inputs, packs_by_positions
from raydistill.stages.train.reader import PackedBatch, PackedReader
from raydistill.stages.train.sources import TrainingSource, open_source

__all__ = ["CHECKPOINT_TAG", "CURSOR_FILE", "Trainer", "train_loop"]

CHECKPOINT_TAG = "step"  # DeepSpeed tag inside every Ray Train checkpoint directory
CURSOR_FILE = "raydistill_cursor.json"


@dataclass(frozen=True)
class Placement:
    """Where this worker is: its rank among ``world`` and its device."""

    rank: int
    world: int
    device: torch.device
    bf16: bool


class _Window:
    """Loss sums and token counts since the last log line."""

    def __init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)
        self.micro_steps = 0
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, loss: float, kd: float, ce: float, tokens: int) -> None:
        self.sums += torch.tensor([loss, kd, ce], dtype=torch.float64)
        self.micro_steps += 1
        self.tokens += tokens


class Trainer:
    """A student, its DeepSpeed engine, its loss and its reader, on one worker."""

    def __init__(self, cfg: TrainConfig, place: Placement, source: TrainingSource | None = None):
        self.cfg, self.place = cfg, place
        self.source = source if source is not None else open_source(cfg)  # every rank builds the same one
        self.deepspeed = import_deepspeed(place.device.type == "cuda")
        self.model = self._student()
        # packed documents as restarting position ids, no dense mask, where the family reads them (packing.py)
        self.by_positions = packs_by_positions(self.model, self.source.vocab_size)
        self.attention = attention_kernel(cfg.attention, place.device, cfg.seq_len)
        if self.attention != getattr(self.model.config, "_attn_implementation", None):
            self.model.set_attn_implementation(self.attention)
        self.loss = build_loss(cfg, self.source, device=place.device,
                               dtype=torch.bfloat16 if place.bf16 else torch.float32)
        # the fused head: the loss from hidden states a chunk of tokens at a time (fused_head.py)
        self.fused = cfg.fused_loss and self.loss.fusable and has_plain_linear_head(self.model, self.source.vocab_size)
        module = LossHeadModel(self.model) if self.fused else self.model
        ds_config = deepspeed_config(cfg.section(OptimizerConfig), cfg.section(ScheduleConfig),
                                     cfg.section(EngineConfig), place.bf16)
        self.engine, _, _, _ = self.deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                                         config=ds_config)
        if self.fused and cfg.zero_stage == 3:  # the head's weight is read outside lm_head's own forward
            self.deepspeed.zero.register_external_parameter(self.engine.module, module.head_weight)
        self.start_step, self.sequences_done, self.tokens_seen = 0, 0, 0
        self.reader: PackedReader | None = None
        self.metrics: MetricsLog | None = None
        self.last_row: dict = {}

    def _student(self) -> torch.nn.Module:
        """Every rank builds the same student: same spec, vocabulary, seed (and teacher, for a fraction)."""
        return build_student(self.cfg.student, self.source.vocab_size, seed=self.cfg.seed, teacher=self.source.teacher)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.place.world * self.cfg.micro_batch_size * self.cfg.grad_accum

    # --- setup --------------------------------------------------------------------------------

    def resume_from(self, checkpoint_dir: str | None) -> None:
        """Load the engine and the reader's cursor from a checkpoint directory (or start fresh), then
        open the reader where that cursor points."""
        if checkpoint_dir is not None:
            load_deepspeed_checkpoint(self.engine, checkpoint_dir, CHECKPOINT_TAG)  # weights-only: runs no code
            cursor = json.loads((Path(checkpoint_dir) / CURSOR_FILE).read_text())
            self.start_step, self.sequences_done = cursor["step"], cursor["sequences"]
        cfg = self.cfg
        self.tokens_seen = self.sequences_done * cfg.seq_len
        self.reader = PackedReader(self.source, seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size,
                                   grad_accum=cfg.grad_accum, rank=self.place.rank, world_size=self.place.world,
                                   seed=cfg.seed, sequence_offset=self.sequences_done - self.start_step * self.global_batch)
        self.metrics = MetricsLog(cfg.output, self.start_step) if self.place.rank == 0 else None

    # --- steps --------------------------------------------------------------------------------

    def micro_step(self, step: int, batch: PackedBatch) -> tuple[float, float, float]:
        """Forward, loss, backward and (at the last micro-step of a step) the optimizer step."""
        device = self.place.device
        inputs = model_inputs(batch, device, by_positions=self.by_positions)
        if self.fused:
            out = LossOutput(*self.engine(inputs, self.loss.rows_objective(batch, step, device)))
        else:
            out = self.loss(self.engine(**inputs).logits, batch, inputs, step)
        self.engine.backward(out.loss)
        self.engine.step()
        return out.loss.item(), out.kd.item(), out.ce.item()

    def fit(self, report) -> None:
        """Every step from the cursor to ``steps``; ``report(metrics, step, sequences)`` checkpoints."""
        import torch.distributed as dist

        cfg, world = self.cfg, self.place.world
        window = _Window()
        tokens_seen = self.tokens_seen
        t_start = time.perf_counter()
        for step, micro, batch in self.reader.iterate(self.start_step, cfg.steps):
            window.add(*self.micro_step(step, batch), tokens=batch.num_tokens * world)
            if micro < cfg.grad_accum - 1:
                continue
            done = step + 1
            tokens_seen += self.global_batch * cfg.seq_len
            if done % cfg.log_every == 0 or done == cfg.steps:
                dist.all_reduce(window.sums)  # mean over ranks and micro-steps since the last log line
                self._log(done, window, tokens_seen, time.perf_counter() - t_start)
                window = _Window()
            # ray.train.report is a synchronization point with the controller (≈1 s each here), so metrics
            # reach Ray Train with each checkpoint, and metrics.csv gets every log line.
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                report({**self.last_row, "step": done}, done, tokens_seen // cfg.seq_len)
        self.tokens_seen = tokens_seen

    def _log(self, step: int, window: _Window, tokens_seen: int, seconds: float) -> None:
        mean = window.sums / (self.place.world * window.micro_steps)
        elapsed = time.perf_counter() - window.started
        row = {"step": step, "loss": round(mean[0].item(), 5), "kd": round(mean[1].item(), 5),
               "ce": round(mean[2].item(), 5), "lr": self.engine.get_lr()[0], "tokens": tokens_seen,
               "tokens_per_s": round(window.tokens / max(elapsed, 1e-9), 1), "seconds": round(seconds, 2)}
        if self.metrics:
            self.metrics.add(row)
        self.last_row = row

    # --- checkpoints and export -----------------------------------------------------------------

    def save_checkpoint(self, directory: str, step: int, sequences: int) -> None:
        """Every rank's DeepSpeed state; rank 0 adds the cursor and the config."""
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)  # every rank writes its own ZeRO partition
        if self.place.rank == 0:
            # the cursor: optimizer steps taken and global sequences consumed (see reader.py)
            (Path(directory) / CURSOR_FILE).write_text(json.dumps({"step": step, "sequences": sequences}))
            (Path(directory) / TRAIN_CONFIG_FILE).write_text(
                json.dumps(storage.redact_values(self.cfg.model_dump(mode="json")), indent=1))  # no URL credentials

    def export(self) -> None:
        """Save the student as a plain HF directory (weights gathered from ZeRO-3 partitions) with the
        tokenizer it was trained with, and summary.json after it (rank 0 only; every rank joins the gather)."""
        cfg, model = self.cfg, self.model
        gather = (self.deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
                  if cfg.zero_stage == 3 else contextlib.nullcontext())
        with gather:  # inside it, ZeRO-3 parameters are whole (outside, they hold 0 elements on every rank)
            if self.place.rank != 0:
                return
            params = count_parameters(model)
            # whole or not at all: a crash mid-export leaves the previous model/ (or none), never a mix
            with storage.atomic_dir(storage.join(cfg.output, MODEL_DIR)) as tmp:
                self.source.save_tokenizer(tmp)
                align_special_tokens(model, load_tokenizer(tmp))  # bos/eos/pad ids of *this* tokenizer
                state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
                model.save_pretrained(tmp, state_dict=state)
        write_summary(cfg.output, storage.redact_values({  # no URL credentials in a stored file
            "params": params, "tokens": self.tokens_seen, "steps": cfg.steps, "loss": cfg.loss,
            "alpha": cfg.alpha, "student": cfg.student.model_dump(), "loss_path": "fused" if self.fused else "logits",
            "attention": self.attention, "packing": "positions" if self.by_positions else "dense_mask",
            "student_config_sha256": student_config_sha256(cfg.student), **self.source.summary(),
            "config": cfg.model_dump(mode="json")}))


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker: a Trainer from the worker's context, resumed from Ray Train's
    latest checkpoint if there is one, fit, export."""
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig.model_validate(config["train"])
    torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    use_cuda = torch.cuda.is_available() and config["use_gpu"]
    place = Placement(rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                      device=torch.device("cuda", ctx.get_local_rank()) if use_cuda else torch.device("cpu"),
                      bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda))
    trainer = Trainer(cfg, place)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            trainer.resume_from(ckpt_dir)
    else:
        trainer.resume_from(None)

    def report(metrics: dict, step: int, sequences: int) -> None:
        with tempfile.TemporaryDirectory(prefix="raydistill-ckpt-") as tmp:
            trainer.save_checkpoint(tmp, step, sequences)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    trainer.fit(report)
    trainer.export()
