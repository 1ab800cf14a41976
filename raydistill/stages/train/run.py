"""``raydistill train``: one student, DeepSpeed ZeRO inside Ray Train, fed from the shards or a corpus.

The teacher is never loaded: everything the loss needs (token ids, sparse targets, the
tokenizer) is in the shard set. In corpus mode ("MiniPLM mode") there are no teacher targets:
the student trains with CE on a text corpus tokenized with any tokenizer (``text_data``).
Inputs are checked on the driver before any worker starts, so contract mismatches fail in
one line instead of a worker traceback.

Checkpoints (DeepSpeed checkpoint + reader cursor + config) go through Ray Train; running
the same command again with the same run name and storage resumes from the latest one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from raydistill.config import TrainConfig
from raydistill.contracts.shards.reader import ShardSet
from raydistill.errors import ConfigError, ContractError, RaydistillError
from raydistill.io import storage
from raydistill.runtime.cluster import cluster_has_gpus, init_ray

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "step"  # DeepSpeed tag inside every Ray Train checkpoint directory
CURSOR_FILE = "raydistill_cursor.json"


def absolute(url: str) -> str:
    """Ray and DeepSpeed need absolute local paths; URLs with a scheme pass through."""
    return url if "://" in url else str(Path(url).expanduser().resolve())


def local_copy_of_tokenizer(shard_set: ShardSet, dest: str) -> str:
    fs, path = storage.filesystem(shard_set.tokenizer_url())
    if not fs.exists(path):
        raise ContractError(f"shard set {shard_set.root} has no tokenizer/ directory; re-run the capture")
    fs.get(path.rstrip("/") + "/", dest, recursive=True)
    return dest


def absolute_if_local(path: str) -> str:
    """A local path made absolute (Ray Train workers run in another directory); hub ids and URLs unchanged."""
    looks_local = path.startswith(("/", ".", "~")) or os.path.exists(path)
    return absolute(path) if looks_local and "://" not in path else path


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its local paths absolute, as the driver hands it to the workers and records it."""
    update: dict = {"output": absolute(cfg.output)}
    if cfg.shards is not None:
        update["shards"] = absolute(cfg.shards)
    if cfg.corpus is not None:
        corpus = {"source": absolute(cfg.corpus.source)} if cfg.corpus.source != "default" else {}
        if cfg.corpus.selection is not None:
            corpus["selection"] = absolute(cfg.corpus.selection)
        update["corpus"] = cfg.corpus.model_copy(update=corpus)
    if cfg.tokenizer is not None:
        update["tokenizer"] = absolute_if_local(cfg.tokenizer)
    if cfg.student.model is not None:
        update["student"] = cfg.student.model_copy(update={"model": absolute_if_local(cfg.student.model)})
    return cfg.model_copy(update=update)


def load_corpus_tokenizer(cfg: TrainConfig):
    """Corpus mode's tokenizer (``tokenizer``, else student.model's), or one ConfigError line naming the field."""
    from raydistill.models.tokenizers import load_tokenizer

    field = "tokenizer" if cfg.tokenizer else "student.model"
    try:
        return load_tokenizer(cfg.corpus_tokenizer)
    except RaydistillError as err:
        raise ConfigError(f"{field} '{cfg.corpus_tokenizer}' gives no tokenizer for the corpus: {err}"
                          + ("; set tokenizer to the tokenizer to train with" if field == "student.model" else "")
                          ) from None


def student_config_and_tokenizer_check(cfg: TrainConfig, shard_set: ShardSet | None = None) -> None:
    """Refuse, before any worker starts, a student that cannot use this data.

    Shard mode (``shard_set``): the student's vocabulary and tokenizer must be the teacher's.
    Corpus mode (``shard_set`` None): a student.model must hold the corpus tokenizer's vocabulary.
    """
    from transformers import AutoConfig

    from raydistill.models.loading import STUDENT_SIZES

    if cfg.student.model is None:
        if cfg.student.size not in STUDENT_SIZES:
            raise ConfigError(f"unknown student size '{cfg.student.size}'; known sizes: {', '.join(STUDENT_SIZES)}")
        config = None
        max_positions = STUDENT_SIZES[cfg.student.size].get("max_positions", 512)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.student.model)
        except (OSError, ValueError) as err:
            raise ConfigError(f"student.model '{cfg.student.model}' cannot be loaded: {str(err).splitlines()[0]}") from None
        max_positions = getattr(config, "max_position_embeddings", cfg.seq_len)
    if shard_set is None:
        _check_corpus_student(cfg, config)
    else:
        _check_shard_student(cfg, config, shard_set)
    if cfg.seq_len > max_positions:
        raise ConfigError(f"seq_len {cfg.seq_len} is longer than the student's {max_positions} positions; "
                          f"lower seq_len to <= {max_positions}")


def _check_shard_student(cfg: TrainConfig, config, shard_set: ShardSet) -> None:
    """Logit KD compares teacher and student ids one to one: the student needs the teacher's tokenizer."""
    from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256, vocab_size_of

    manifest = shard_set.manifest
    if config is not None:
        if config.vocab_size < manifest.vocab_size:
            raise ContractError(
                f"student vocab size {config.vocab_size} is smaller than the shard set's teacher vocab "
                f"{manifest.vocab_size} ({shard_set.root}); use a student with the teacher's tokenizer"
            )
        try:
            tok = load_tokenizer(cfg.student.model)
        except RaydistillError:
            tok = None
        if tok is not None:
            shard_set.check_contract(tokenizer_sha256=tokenizer_sha256(tok), vocab_size=vocab_size_of(tok),
                                     student=f"student.model '{cfg.student.model}'")
    if cfg.online_teacher:
        try:
            teacher_tok = load_tokenizer(cfg.online_teacher)
        except RaydistillError as err:
            raise ConfigError(f"online_teacher '{cfg.online_teacher}': {err}") from None
        shard_set.check_contract(tokenizer_sha256=tokenizer_sha256(teacher_tok), vocab_size=vocab_size_of(teacher_tok))


def _check_corpus_student(cfg: TrainConfig, config) -> None:
    """CE on text needs only that the student's embedding covers every id of the corpus tokenizer."""
    from raydistill.models.tokenizers import vocab_size_of

    vocab = vocab_size_of(load_corpus_tokenizer(cfg))
    if config is not None and config.vocab_size < vocab:
        raise ContractError(
            f"student.model '{cfg.student.model}' has vocab size {config.vocab_size}, smaller than the {vocab} ids "
            f"of tokenizer '{cfg.corpus_tokenizer}'; use a student built for that tokenizer (or a student.size)"
        )


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.steps, "warmup_num_steps": max(1, cfg.warmup_steps),
            "warmup_type": "linear", "warmup_min_ratio": 0.0, "cos_min_ratio": cfg.min_lr_ratio}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW: no multi-minute CPUAdam JIT build
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class MetricsLog:
    """metrics.csv beside the exported student, rewritten whole (works on object stores too)."""

    FIELDS = ("step", "loss", "kd", "ce", "lr", "tokens", "tokens_per_s", "seconds")

    def __init__(self, output: str, resume_step: int):
        self.url = storage.join(output, "metrics.csv")
        self.rows: list[dict] = []
        if resume_step > 0 and storage.exists(self.url):
            rows = list(csv.DictReader(io.StringIO(storage.read_text(self.url))))
            self.rows = [r for r in rows if int(r["step"]) <= resume_step]
        self.tensorboard = _tensorboard_writer(output)

    def add(self, row: dict) -> None:
        self.rows.append({k: row[k] for k in self.FIELDS})
        if self.tensorboard is not None:
            for key in ("loss", "kd", "ce", "lr", "tokens_per_s"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], row["step"])
            self.tensorboard.flush()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        storage.atomic_write_text(self.url, out.getvalue())


def _tensorboard_writer(output: str):
    """TensorBoard event files under <output>/tensorboard when the tensorboard package is installed."""
    if "://" in output:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(Path(output) / "tensorboard"))


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker: build student + DeepSpeed engine, stream, step, checkpoint, export."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    if not torch.cuda.is_available():
        # DeepSpeed's CPU shared-memory allreduce is a C++ op JIT-built on first use (minutes on a
        # laptop); gloo's allreduce is plenty for CPU runs. DeepSpeed keeps this dict editable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from raydistill.models.loading import build_student, load_causal_lm
    from raydistill.stages.train.losses import dense_distillation_loss, distillation_loss, taid_lambda
    from raydistill.stages.train.reader import PackedReader

    cfg = TrainConfig.model_validate(config["train"])
    torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_cuda = torch.cuda.is_available() and config["use_gpu"]
    device = torch.device("cuda", ctx.get_local_rank()) if use_cuda else torch.device("cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)

    source = open_source(cfg)  # every rank builds the same one (see text_data.CorpusTokens)
    corpus_mode = not isinstance(source, ShardSet)
    manifest = None if corpus_mode else source.manifest
    temperature = 1.0 if corpus_mode else manifest.sparsify.temperature
    vocab_size = source.vocab_size if corpus_mode else manifest.vocab_size
    if cfg.student.model:
        model = load_causal_lm(cfg.student.model)
    else:
        model = build_student(cfg.student.size, vocab_size=vocab_size, seed=cfg.seed)
    teacher = None
    if cfg.online_teacher:  # the online-KD baseline: the teacher in the loop, frozen
        teacher = load_causal_lm(cfg.online_teacher, dtype=torch.bfloat16 if bf16 else torch.float32)
        teacher.to(device).eval().requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, bf16))

    start_step, sequences_done = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
            cursor = json.loads((Path(ckpt_dir) / CURSOR_FILE).read_text())
            start_step, sequences_done = cursor["step"], cursor["sequences"]
    global_batch = world * cfg.micro_batch_size * cfg.grad_accum
    reader = PackedReader(source, seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size,
                          grad_accum=cfg.grad_accum, rank=rank, world_size=world, seed=cfg.seed,
                          sequence_offset=sequences_done - start_step * global_batch)
    metrics_log = MetricsLog(cfg.output, start_step) if rank == 0 else None
    alpha = 0.0 if cfg.loss == "ce" else cfg.alpha  # corpus mode: loss is ce (TrainConfig checks)
    tail_prior = None
    if cfg.tail_target == "prior" and alpha > 0:  # the set's tail model, inside the loss
        tail_prior = torch.from_numpy(manifest.tail_prior(source.vocab_table)).float().to(device)
    sums = torch.zeros(3, dtype=torch.float64)
    micro_steps = 0
    tokens_seen = sequences_done * cfg.seq_len
    t_window, tokens_window = time.perf_counter(), 0
    t_start = time.perf_counter()
    last_row: dict = {}

    for step, micro, batch in reader.iterate(start_step, cfg.steps):
        inputs = {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
                  "attention_mask": batch.attention_mask().to(device)}
        logits = engine(**inputs).logits
        if corpus_mode:  # no teacher targets (width 0): CE only, the KD path never runs
            out = cross_entropy_only(logits.flatten(0, 1), batch.labels.flatten().to(device), vocab_size)
        elif teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            out = dense_distillation_loss(
                logits.flatten(0, 1).float(), teacher_logits.flatten(0, 1), batch.labels.flatten().to(device),
                batch.target_mask.flatten().to(device), alpha=alpha, temperature=temperature,
                vocab_size=vocab_size)
        else:
            out = distillation_loss(
                logits.flatten(0, 1).float(), batch.labels.flatten().to(device),
                batch.target_ids.flatten(0, 1).to(device), batch.target_probs.flatten(0, 1).to(device),
                batch.tail.flatten().to(device), batch.target_mask.flatten().to(device),
                alpha=alpha, temperature=temperature, vocab_size=vocab_size,
                kind="forward_kl" if cfg.loss == "ce" else cfg.loss, skew=cfg.skew,
                taid_lambda=taid_lambda(step, cfg.steps, cfg.taid_start, cfg.taid_fraction) if cfg.taid else None,
                tail_prior=tail_prior,
            )
        engine.backward(out.loss)
        engine.step()
        sums += torch.tensor([out.loss.item(), out.kd.item(), out.ce.item()], dtype=torch.float64)
        micro_steps += 1
        tokens_window += batch.num_tokens * world
        if micro < cfg.grad_accum - 1:
            continue
        done = step + 1
        tokens_seen += reader.global_batch_sequences * cfg.seq_len
        if done % cfg.log_every == 0 or done == cfg.steps:
            dist.all_reduce(sums)  # mean over ranks and micro-steps since the last log line
            mean = sums / (world * micro_steps)
            elapsed = time.perf_counter() - t_window
            row = {"step": done, "loss": round(mean[0].item(), 5), "kd": round(mean[1].item(), 5),
                   "ce": round(mean[2].item(), 5), "lr": engine.get_lr()[0], "tokens": tokens_seen,
                   "tokens_per_s": round(tokens_window / max(elapsed, 1e-9), 1),
                   "seconds": round(time.perf_counter() - t_start, 2)}
            if metrics_log:
                metrics_log.add(row)
            sums.zero_()
            micro_steps = 0
            t_window, tokens_window = time.perf_counter(), 0
            last_row = row
        # ray.train.report is a synchronization point with the controller (≈1 s each here), so metrics
        # reach Ray Train with each checkpoint, and metrics.csv gets every log line.
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            _report_with_checkpoint(engine, {**last_row, "step": done}, done, tokens_seen // cfg.seq_len, cfg)

    _export(engine, model, source, cfg, rank, tokens_seen)


def open_source(cfg: TrainConfig):
    """The training rows of ``cfg``: its ShardSet, or the corpus tokenized (``text_data.CorpusTokens``)."""
    if cfg.corpus is None:
        return ShardSet(cfg.shards)
    from raydistill.stages.train.corpus_rows import CorpusTokens

    return CorpusTokens(cfg.corpus, load_corpus_tokenizer(cfg), seq_len=cfg.seq_len)


def cross_entropy_only(logits, labels, vocab_size: int):
    """Corpus mode's loss: next-token CE over the tokenizer's vocabulary, reported as a LossOutput with kd 0."""
    from raydistill.stages.train.losses import LossOutput, next_token_cross_entropy

    ce = next_token_cross_entropy(logits.float(), labels, vocab_size=vocab_size)
    return LossOutput(loss=ce, kd=ce.new_zeros(()), ce=ce)


def _report_with_checkpoint(engine, metrics: dict, step: int, sequences: int, cfg: TrainConfig) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="raydistill-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)  # every rank writes its own ZeRO partition
        if ray.train.get_context().get_world_rank() == 0:
            # the cursor: optimizer steps taken and global sequences consumed (see data.py)
            (Path(tmp) / CURSOR_FILE).write_text(json.dumps({"step": step, "sequences": sequences}))
            (Path(tmp) / "train_config.json").write_text(cfg.model_dump_json(indent=1))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _export(engine, model, source, cfg: TrainConfig, rank: int, tokens: int) -> None:
    """Save the student as a plain HF directory (weights gathered from ZeRO-3 partitions) with the
    tokenizer it was trained with: the shard set's copy of the teacher's, or the corpus tokenizer."""
    import contextlib

    import deepspeed

    from raydistill.models.loading import align_special_tokens, count_parameters
    from raydistill.models.tokenizers import load_tokenizer

    params = list(model.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3
              else contextlib.nullcontext())
    with gather:
        if rank != 0:
            return
        fs, out_path = storage.filesystem(storage.join(cfg.output, "model"))
        with tempfile.TemporaryDirectory(prefix="raydistill-export-") as tmp:
            if isinstance(source, ShardSet):
                local_copy_of_tokenizer(source, tmp)
            else:
                source.tokenizer.save_pretrained(tmp)
            align_special_tokens(model, load_tokenizer(tmp))  # bos/eos/pad ids of *this* tokenizer
            state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, state_dict=state)
            fs.put(tmp + "/", out_path, recursive=True)
            summary = {"params": count_parameters(model), "tokens": tokens, "steps": cfg.steps,
                       "loss": cfg.loss, "alpha": cfg.alpha, "student": cfg.student.model_dump(),
                       **data_summary(source, cfg), "config": cfg.model_dump(mode="json")}
            storage.atomic_write_text(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=1))


def data_summary(source, cfg: TrainConfig) -> dict:
    """summary.json's account of the training data; ``data_identity`` is what finished_summary compares."""
    if isinstance(source, ShardSet):
        identity = shard_set_identity(source.root)
        return {"shards": cfg.shards, "shards_identity": identity, "data_identity": identity,
                "teacher": source.manifest.teacher.name_or_path}
    from raydistill.io.corpus import describe

    return {"corpus": describe(cfg.corpus), "tokenizer": cfg.corpus_tokenizer,
            "tokenizer_sha256": source.tokenizer_sha256, "data_identity": source.identity(),
            "documents": source.num_documents, "skipped_short_documents": source.skipped_short,
            "corpus_tokens": source.num_tokens}


def shard_set_identity(shards: str) -> str:
    """Identity of a shard set's contents: the manifest without its volatile fields (when it was
    written, the last run's statistics), so a capture rerun that finds nothing to do keeps it, and
    a re-capture (other shard checksums, settings or teacher) changes it."""
    from raydistill.contracts.shards.manifest import MANIFEST_NAME

    manifest = json.loads(storage.read_text(storage.join(shards, MANIFEST_NAME)))
    stable = {k: v for k, v in manifest.items() if k not in ("created_at", "stats")}
    return storage.sha256_bytes(json.dumps(stable, sort_keys=True).encode())


def finished_summary(cfg: TrainConfig) -> dict | None:
    """The summary of a finished run of exactly ``cfg`` on its data as it is now, else None.

    Lets drivers that train many students (demo, sweep) reuse finished runs without ever
    reusing one trained with other settings, on shards captured since, or on a corpus (or
    tokenizer) that has changed since.
    """
    cfg = with_absolute_paths(cfg)
    url = storage.join(cfg.output, "summary.json")
    if not storage.exists(url):
        return None
    summary = json.loads(storage.read_text(url))
    if summary.get("config") != cfg.model_dump(mode="json") or "wall_seconds" not in summary:
        return None
    if cfg.corpus is None:  # shards_identity: summaries written before corpus mode have no data_identity
        same = summary.get("shards_identity") == shard_set_identity(cfg.shards)
    else:
        from raydistill.stages.train.corpus_rows import corpus_identity

        same = summary.get("data_identity") == corpus_identity(cfg.corpus, load_corpus_tokenizer(cfg))
    return summary if same else None


def check_corpus_fills_a_batch(cfg: TrainConfig) -> None:
    """Tokenize the corpus once on the driver, so an unreadable or too small corpus fails in one line here
    rather than in every worker."""
    from raydistill.io.corpus import describe

    source = open_source(cfg)
    if source.num_tokens < cfg.seq_len:
        raise ConfigError(f"corpus {describe(cfg.corpus)} holds {source.num_tokens} tokens "
                          f"({source.num_documents} documents), fewer than one sequence of seq_len {cfg.seq_len}; "
                          "add documents or lower seq_len")


def run_training(cfg: TrainConfig, *, address: str | None = None) -> dict:
    """Launch (or resume) the Ray Train job for ``cfg``; returns the student's summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = with_absolute_paths(cfg)
    if cfg.corpus is None:
        student_config_and_tokenizer_check(cfg, ShardSet(cfg.shards))
    else:
        student_config_and_tokenizer_check(cfg)
        check_corpus_fills_a_batch(cfg)
    init_ray(address)
    use_gpu = cluster_has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    name = cfg.name or Path(cfg.output.rstrip("/")).name or "student"
    storage_path = absolute(cfg.storage_path or storage.join(cfg.output, "ray"))
    resources = {"CPU": cfg.threads_per_worker, **({"GPU": 1} if use_gpu else {})}
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": cfg.model_dump(), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps worker errors; keep the cause, drop Ray's frames
        cause = err.__cause__ or err
        raise RaydistillError(f"training run '{name}' failed: {type(cause).__name__}: "
                              f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}; "
                              f"see the Ray logs; re-running the same command resumes from the last checkpoint") from err
    summary = json.loads(storage.read_text(storage.join(cfg.output, "summary.json")))
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    storage.atomic_write_text(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=1))
    return summary
