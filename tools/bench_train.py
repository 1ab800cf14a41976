"""Cost of a sparse-KD training step against a plain CE step, and whether the reader keeps up.

Usage: python tools/bench_train.py [--shards DIR] [--teacher DIR] [--size small] [--steps 30] [--threads 1]

One student size, the same packed batches, three kinds of step timed in one run with their
order rotated every step (so load on a shared machine hits all three alike), medians reported:

- ``ce``: CE on the next token only (``distillation_loss(alpha=0)``, the F.cross_entropy path);
- ``kd``: alpha 0.5 with forward KL against the top-k targets streamed from the shards;
- ``sampled``: alpha 0.5 with sampled targets (n draws per position from the teacher's full
  distribution at T = 1, as distinct ids + counts), drawn once up front; the teacher's
  forward pass is not timed, it stands in for targets a sampled capture would have stored.

Each step is forward, loss, backward, AdamW, with the backward split at the logits so the
extra time of a KD step can be placed (loss forward, loss backward, or the model). No Ray,
no DeepSpeed: this measures the loss path, which is what the KD/CE ratio is about. Then the
reader alone (``PackedReader.micro_batch``: decode + pack) and decode alone
(``ShardSet.read_shard``), in tokens/s. Torch and Arrow use one thread unless --threads.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import torch
from transformers.utils import logging as hf_logging

from raydistill.contracts.shards.manifest import Manifest
from raydistill.contracts.shards.reader import ShardSet
from raydistill.errors import ConfigError, RaydistillError
from raydistill.io import storage
from raydistill.models.loading import count_parameters, load_causal_lm
from raydistill.models.students import build_student
from raydistill.stages.train.losses import LossOutput, distillation_loss, sampled_distillation_loss
from raydistill.stages.train.reader import PackedBatch, PackedReader

MODES = ("ce", "kd", "sampled")
PHASES = ("forward", "loss", "loss_backward", "model_backward", "optimizer")


@dataclass
class Prepared:
    """One benchmark batch with everything a step needs already built (not part of the step's cost)."""

    batch: PackedBatch
    attention_mask: torch.Tensor
    sampled_ids: torch.Tensor  # [B*L, n] distinct ids drawn from the teacher, 0-padded
    sampled_counts: torch.Tensor  # [B*L, n] how often each was drawn, 0 = padding


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="raydistill-demo/shards", help="shard set (what `raydistill demo` writes)")
    p.add_argument("--teacher", default="raydistill-demo/teacher", help="teacher HF dir, for the sampled targets")
    p.add_argument("--size", default="small", help="student size (raydistill.models.sizes.STUDENT_SIZES)")
    p.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each kind first")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight of the two KD steps")
    p.add_argument("--draws", type=int, default=64, help="teacher draws per position for the sampled step")
    p.add_argument("--loader-batches", type=int, default=None,
                   help="micro-batches the reader builds in its own benchmark (default: one epoch)")
    p.add_argument("--threads", type=int, default=1, help="torch and Arrow threads (1 = per-core figures)")
    p.add_argument("--device", default="cpu", help="torch device for the steps (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.draws < 1:
        p.error("--steps, --threads and --draws must be >= 1 and --warmup >= 0")
    return args


def check_inputs(shards: str, teacher: str) -> None:
    """One clear line when the demo's outputs are not where the benchmark looks."""
    if not storage.exists(storage.join(shards, "manifest.json")):
        raise ConfigError(f"no shard set at '{shards}' (no manifest.json); run `raydistill demo` first or pass --shards")
    if not storage.exists(storage.join(teacher, "config.json")):
        raise ConfigError(f"no teacher model at '{teacher}' (no config.json); run `raydistill demo` first "
                          "or pass --teacher")


def now(device: torch.device) -> float:
    """Wall clock after the device's queued work is done (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def draws_to_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, n] drawn ids -> ([N, n] distinct ids, [N, n] counts), left-aligned, padding id 0 / count 0."""
    ordered, _ = draws.sort(dim=1)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = new.long().cumsum(dim=1) - 1  # which distinct id each draw belongs to
    counts = torch.zeros_like(ordered).scatter_add_(1, slot, torch.ones_like(ordered))
    ids = torch.zeros_like(ordered).scatter_(1, slot, ordered)  # every draw in a slot has the same id
    return ids, counts


@torch.no_grad()
def sample_teacher(teacher: torch.nn.Module, batch: PackedBatch, mask: torch.Tensor, *, vocab: int, draws: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids + counts of ``draws`` samples per position from the teacher's softmax at T = 1."""
    logits = teacher(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).logits
    probs = torch.softmax(logits.flatten(0, 1)[:, :vocab].float(), dim=-1)
    return draws_to_counts(torch.multinomial(probs, draws, replacement=True, generator=generator))


def prepare(args: argparse.Namespace, shard_set: ShardSet, n_batches: int) -> list[Prepared]:
    """The benchmark's batches from the packed reader, with sampled targets from one teacher pass."""
    reader = PackedReader(shard_set, seq_len=args.seq_len, micro_batch_size=args.micro_batch, grad_accum=1,
                          rank=0, world_size=1, seed=args.seed)
    teacher = load_causal_lm(args.teacher).eval()
    vocab = shard_set.manifest.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    out = []
    for step in range(n_batches):
        batch = reader.micro_batch(step, 0)
        mask = batch.attention_mask()
        ids, counts = sample_teacher(teacher, batch, mask, vocab=vocab, draws=args.draws, generator=generator)
        out.append(Prepared(batch, mask, ids, counts))
    return out


def to_device(p: Prepared, device: torch.device) -> Prepared:
    fields = {name: getattr(p.batch, name).to(device) for name in p.batch.__dataclass_fields__}
    return Prepared(PackedBatch(**fields), p.attention_mask.to(device), p.sampled_ids.to(device),
                    p.sampled_counts.to(device))


def loss_fns(args: argparse.Namespace, manifest: Manifest) -> dict[str, Callable[[torch.Tensor, Prepared], LossOutput]]:
    """The three losses, each a function of the [B*L, V] student logits and the batch."""
    vocab, temperature = manifest.vocab_size, manifest.sparsify.temperature

    def topk(alpha: float) -> Callable[[torch.Tensor, Prepared], LossOutput]:
        def fn(logits: torch.Tensor, p: Prepared) -> LossOutput:
            b = p.batch
            return distillation_loss(
                logits, b.labels.flatten(), b.target_ids.flatten(0, 1), b.target_probs.flatten(0, 1), b.tail.flatten(),
                b.target_mask.flatten(), alpha=alpha, temperature=temperature, vocab_size=vocab, kind="forward_kl",
            )
        return fn

    def sampled(logits: torch.Tensor, p: Prepared) -> LossOutput:
        b = p.batch
        return sampled_distillation_loss(
            logits, b.labels.flatten(), p.sampled_ids, p.sampled_counts, args.draws, b.target_mask.flatten(),
            alpha=args.alpha, temperature=1.0, vocab_size=vocab,
        )

    return {"ce": topk(0.0), "kd": topk(args.alpha), "sampled": sampled}


def timed_step(model: torch.nn.Module, opt: torch.optim.Optimizer, p: Prepared,
               loss_fn: Callable[[torch.Tensor, Prepared], LossOutput], device: torch.device) -> dict[str, float]:
    """One training step, seconds per phase. The backward is split at the logits (same work as one
    backward call) so the loss's own backward is told apart from the model's."""
    b = p.batch
    t0 = now(device)
    logits = model(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=p.attention_mask).logits
    logits = logits.flatten(0, 1).float()
    t1 = now(device)
    leaf = logits.detach().requires_grad_()
    loss = loss_fn(leaf, p).loss
    t2 = now(device)
    loss.backward()
    t3 = now(device)
    logits.backward(leaf.grad)
    t4 = now(device)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t5 = now(device)
    return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True))


def bench_steps(args: argparse.Namespace, shard_set: ShardSet, batches: list[Prepared],
                device: torch.device) -> tuple[dict[str, dict[str, float]], int]:
    """Median seconds per phase and in total, per mode (modes interleaved in a rotating order); parameters."""
    fns = loss_fns(args, shard_set.manifest)
    models, opts = {}, {}
    for mode in MODES:  # one student per mode, all from the same initial weights, each with its own AdamW
        models[mode] = build_student(args.size, vocab_size=shard_set.manifest.vocab_size, seed=args.seed).to(device)
        models[mode].train()
        opts[mode] = torch.optim.AdamW(models[mode].parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for i, p in enumerate(batches):
        order = MODES[i % len(MODES):] + MODES[: i % len(MODES)]
        for mode in order:
            phases = timed_step(models[mode], opts[mode], p, fns[mode], device)
            if i >= args.warmup:
                samples[mode].append(phases)
    medians = {}
    for mode, rows in samples.items():
        medians[mode] = {ph: statistics.median(r[ph] for r in rows) for ph in PHASES}
        medians[mode]["step"] = statistics.median(sum(r.values()) for r in rows)
        medians[mode]["step_min"] = min(sum(r.values()) for r in rows)  # the least disturbed step
    for mode in ("kd", "sampled"):  # ratio within each round, where slow drifts in load cancel
        pairs = zip(samples[mode], samples["ce"], strict=True)
        medians[mode]["paired_ratio"] = statistics.median(sum(a.values()) / sum(b.values()) for a, b in pairs)
    return medians, count_parameters(models["ce"])


def bench_loader(args: argparse.Namespace, shard_set: ShardSet) -> tuple[float, int]:
    """Tokens/s of ``PackedReader.micro_batch`` (decode + pack) from a cold reader, on the calling thread."""
    reader = PackedReader(shard_set, seq_len=args.seq_len, micro_batch_size=args.micro_batch, grad_accum=1,
                          rank=0, world_size=1, seed=args.seed)  # a new reader: its shard cache is empty
    n = args.loader_batches or max(1, reader.plan.sequences_per_epoch // args.micro_batch)
    t0 = time.perf_counter()
    tokens = sum(reader.micro_batch(step, 0).num_tokens for step in range(n))
    return tokens / (time.perf_counter() - t0), tokens


def bench_decode(shard_set: ShardSet) -> tuple[float, int]:
    """Tokens/s of ``ShardSet.read_shard`` (read + checksum + Parquet decode) over every shard."""
    t0 = time.perf_counter()
    tokens = sum(shard_set.read_shard(i).num_tokens for i in range(len(shard_set)))
    return tokens / (time.perf_counter() - t0), tokens


def print_table(steps: dict[str, dict[str, float]], tokens_per_step: int) -> None:
    ce = steps["ce"]["step"]
    ce_min = steps["ce"]["step_min"]
    head = ["step", "median ms", "vs CE", "best ms", "best vs CE", "tokens/s", *(f"{ph} ms" for ph in PHASES)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    names = {"ce": "CE only", "kd": "KD top-k (forward KL)", "sampled": "KD sampled"}
    for mode in MODES:
        s = steps[mode]
        cells = [names[mode], f"{s['step'] * 1e3:.1f}", f"{s['step'] / ce:.3f}", f"{s['step_min'] * 1e3:.1f}",
                 f"{s['step_min'] / ce_min:.3f}", f"{tokens_per_step / s['step']:,.0f}",
                 *(f"{s[ph] * 1e3:.1f}" for ph in PHASES)]
        print("| " + " | ".join(cells) + " |")


def run(args: argparse.Namespace) -> dict:
    check_inputs(args.shards, args.teacher)
    hf_logging.disable_progress_bar()  # keep stdout a table and one JSON line
    torch.set_num_threads(args.threads)
    pa.set_cpu_count(args.threads)
    pa.set_io_thread_count(args.threads)
    device = torch.device(args.device)
    shard_set = ShardSet(args.shards)
    manifest = shard_set.manifest
    t0 = time.perf_counter()
    batches = [to_device(p, device) for p in prepare(args, shard_set, args.warmup + args.steps)]
    print(f"prepared {len(batches)} batches of {args.micro_batch}x{args.seq_len} tokens with sampled targets "
          f"({args.draws} draws/position) in {time.perf_counter() - t0:.1f} s (not timed)")
    steps, params = bench_steps(args, shard_set, batches, device)
    loader_tps, loader_tokens = bench_loader(args, shard_set)
    decode_tps, decode_tokens = bench_decode(shard_set)

    tokens_per_step = args.micro_batch * args.seq_len
    ce, kd, sampled = steps["ce"]["step"], steps["kd"]["step"], steps["sampled"]["step"]
    train_tps = tokens_per_step / kd
    print(f"\nstudent '{args.size}' ({params:,} params), vocab {manifest.vocab_size}, "
          f"k={manifest.sparsify.k}, {args.micro_batch}x{args.seq_len} tokens/step, median of {args.steps} steps "
          f"after {args.warmup} warmup, {args.threads} thread(s), {device.type}\n")
    print_table(steps, tokens_per_step)
    print(f"\nreader (decode + pack, 1 thread): {loader_tps:,.0f} tokens/s over {loader_tokens:,} tokens; "
          f"decode alone: {decode_tps:,.0f} tokens/s over {decode_tokens:,} tokens; "
          f"headroom over the KD step: {loader_tps / train_tps:.1f}x; KD/CE and sampled/CE within each round "
          f"(median): {steps['kd']['paired_ratio']:.3f}, {steps['sampled']['paired_ratio']:.3f}\n")
    return {
        "ce_step_s": round(ce, 5),
        "kd_step_s": round(kd, 5),
        "kd_vs_ce_step_ratio": round(kd / ce, 4),
        "sampled_kd_step_s": round(sampled, 5),
        "sampled_vs_ce_step_ratio": round(sampled / ce, 4),
        "kd_vs_ce_best_step_ratio": round(steps["kd"]["step_min"] / steps["ce"]["step_min"], 4),
        "sampled_vs_ce_best_step_ratio": round(steps["sampled"]["step_min"] / steps["ce"]["step_min"], 4),
        "kd_vs_ce_paired_ratio_median": round(steps["kd"]["paired_ratio"], 4),
        "sampled_vs_ce_paired_ratio_median": round(steps["sampled"]["paired_ratio"], 4),
        "loader_tokens_per_s": round(loader_tps),
        "decode_tokens_per_s": round(decode_tps),
        "train_tokens_per_s": round(train_tps),
        "loader_headroom": round(loader_tps / train_tps, 2),
        "kd_ratio_target_met": kd / ce <= 1.05,
        "loader_headroom_target_met": loader_tps / train_tps >= 10,
        "phases_ms": {m: {ph: round(steps[m][ph] * 1e3, 2) for ph in PHASES} for m in MODES},
        "device": device.type,
        "threads": args.threads,
        "size": args.size,
        "params": params,
        "tokens_per_step": tokens_per_step,
        "k": manifest.sparsify.k,
        "draws": args.draws,
        "steps": args.steps,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = run(args)
    except RaydistillError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
