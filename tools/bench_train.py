"""Cost of a sparse-KD training step against a plain CE step, in time and peak memory, and whether the reader
keeps up.

Usage: python tools/bench_train.py [--shards DIR] [--teacher DIR] [--size small] [--steps 30] [--threads 1]
       python tools/bench_train.py --vocab 151936 --hidden 512 --tokens 4096 [--layers 2] [--k 64] [--steps 5]

One student, the same packed batches, four kinds of step timed in one run with their order rotated
every step (so load on a shared machine hits all alike), medians reported:

- ``ce``: plain CE on full logits (``F.cross_entropy`` on the model's [tokens, V] logits): the
  baseline a user would otherwise run;
- ``kd``: alpha 0.5, forward KL against the top-k targets, through the fused head (the default of
  ``raydistill train``: the loss from hidden states a chunk of tokens at a time, never [tokens, V]);
- ``kd_logits``: the same loss on full logits (the path models without a plain linear head take);
- ``sampled``: alpha 0.5 with sampled targets (distinct ids + counts), through the fused head.

With the demo's shards (default) the top-k targets are streamed from them and the sampled targets
are n draws per position from the teacher at T = 1 (drawn once up front, not timed). With
``--vocab/--hidden/--tokens`` everything is random: a Llama-shaped student of that vocabulary and
width, packed rows of random documents, k random distinct ids per token, so real vocabularies
(49,152; 151,936) can be measured without a teacher.

Each step is forward, loss, backward, AdamW, split into phases (the logits path's backward at the
logits; the fused loss's forward includes its gradients). No Ray, no DeepSpeed: this measures the
loss path. Peak memory is measured per kind in a fresh process (the figures must not inherit another
kind's allocations): a warmup step, then the peak over ``--memory-steps`` steps: on CPU the
process's resident high-water mark (VmHWM, reset after the warmup), on a GPU
``torch.cuda.max_memory_allocated``; both the whole process's peak and the step's rise above what was
resident before it. With shards it then times the reader alone (``PackedReader.micro_batch``) and
decode alone (``ShardSet.read_shard``). Torch uses one thread unless --threads. The last line printed
is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from transformers.utils import logging as hf_logging

from raydistill.contracts.shards.reader import ShardSet
from raydistill.errors import ConfigError, RaydistillError
from raydistill.io import storage
from raydistill.models.loading import count_parameters, load_causal_lm
from raydistill.models.sizes import build_llama
from raydistill.models.students import build_student
from raydistill.stages.train.fused_head import RowsObjective, fused_linear_loss
from raydistill.stages.train.losses import LossOutput, distillation_loss, sampled_distillation_loss
from raydistill.stages.train.reader import PackedBatch, PackedReader

MODES = ("ce", "kd", "kd_logits", "sampled")
FUSED = ("kd", "sampled")  # through the fused head, as `raydistill train` runs them
PHASES = ("forward", "loss", "loss_backward", "model_backward", "optimizer")
NAMES = {"ce": "CE only (full logits)", "kd": "KD top-k, fused head", "kd_logits": "KD top-k, full logits",
         "sampled": "KD sampled, fused head"}


@dataclass
class Prepared:
    """One benchmark batch with everything a step needs already built (not part of the step's cost)."""

    batch: PackedBatch
    attention_mask: torch.Tensor
    sampled_ids: torch.Tensor  # [B*L, n] distinct ids drawn from the teacher, 0-padded
    sampled_counts: torch.Tensor  # [B*L, n] how often each was drawn, 0 = padding


@dataclass(frozen=True)
class Setup:
    """What the steps run on: the vocabulary, the KD temperature, and how to build the student."""

    vocab: int
    temperature: float
    k: int
    student: Callable[[], torch.nn.Module]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="raydistill-demo/shards", help="shard set (what `raydistill demo` writes)")
    p.add_argument("--teacher", default="raydistill-demo/teacher", help="teacher HF dir, for the sampled targets")
    p.add_argument("--size", default="small", help="student size (raydistill.models.sizes.STUDENT_SIZES)")
    p.add_argument("--vocab", type=int, default=None, help="random mode: vocabulary of a random student and targets")
    p.add_argument("--hidden", type=int, default=256, help="random mode: the student's width")
    p.add_argument("--layers", type=int, default=2, help="random mode: the student's layers")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (random mode: default 4096; with "
                   "shards: --micro-batch x --seq-len)")
    p.add_argument("--k", type=int, default=64, help="random mode: stored ids per token")
    p.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each kind first")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight of the KD steps")
    p.add_argument("--draws", type=int, default=64, help="teacher draws per position for the sampled step")
    p.add_argument("--loader-batches", type=int, default=None,
                   help="micro-batches for the reader benchmark (default: one epoch)")
    p.add_argument("--threads", type=int, default=1, help="torch and Arrow threads (1 = per-core figures)")
    p.add_argument("--device", default="cpu", help="torch device for the steps (cpu, cuda)")
    p.add_argument("--bf16", action="store_true", help="student weights in bf16 (what a GPU run trains in)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps per kind in the peak-memory processes "
                   "(0: no memory figures)")
    p.add_argument("--memory-of", choices=MODES, default=None, help=argparse.SUPPRESS)  # one kind's child process
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.draws < 1 or args.memory_steps < 0:
        p.error("--steps, --threads and --draws must be >= 1, --warmup and --memory-steps >= 0")
    if args.vocab is not None and args.tokens is None:
        args.tokens = 4096
    if args.tokens is not None:
        if args.tokens % args.seq_len:
            p.error(f"--tokens {args.tokens} must be a multiple of --seq-len {args.seq_len}")
        args.micro_batch = args.tokens // args.seq_len
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


def distinct_ids(n: int, k: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """[n, k] ids, distinct within each row: a random start, then strides of a prime coprime to ``vocab``."""
    stride = next(p for p in (7919, 7907, 7901) if vocab % p)
    start = torch.randint(0, vocab, (n, 1), generator=generator)
    return (start + torch.arange(k) * stride) % vocab


def random_batch(args: argparse.Namespace, vocab: int, generator: torch.Generator) -> Prepared:
    """A packed micro-batch of random documents (2–4 per row) with random top-k and sampled targets."""
    b, length, k = args.micro_batch, args.seq_len, args.k
    input_ids = torch.randint(0, vocab, (b, length), generator=generator)
    segment_ids = torch.zeros(b, length, dtype=torch.long)
    for row in range(b):
        cuts = torch.randint(1, length, (int(torch.randint(1, 4, (1,), generator=generator)),), generator=generator)
        for cut in cuts.tolist():
            segment_ids[row, cut:] += 1
    starts = torch.ones(b, length, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    index = torch.arange(length).expand(b, length)
    position_ids = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    labels = torch.full((b, length), -100)
    same_next = segment_ids[:, 1:] == segment_ids[:, :-1]
    labels[:, :-1] = torch.where(same_next, input_ids[:, 1:], -100)
    n = b * length
    probs = torch.rand(n, k, generator=generator) ** 4  # peaked, as real teachers are
    probs = probs / probs.sum(-1, keepdim=True) * 0.9
    batch = PackedBatch(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, labels=labels,
                        target_ids=distinct_ids(n, k, vocab, generator).view(b, length, k),
                        target_probs=probs.view(b, length, k), tail=torch.full((b, length), 0.1),
                        target_mask=labels != -100)
    sampled_ids = distinct_ids(n, args.draws // 2, vocab, generator)
    counts = torch.randint(1, 3, sampled_ids.shape, generator=generator)
    return Prepared(batch, batch.attention_mask(), sampled_ids, counts)


def make_setup(args: argparse.Namespace) -> tuple[Setup, ShardSet | None]:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.vocab is not None:
        heads = max(1, args.hidden // 64)

        def student() -> torch.nn.Module:
            model = build_llama(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=heads,
                                max_positions=max(512, args.seq_len), seed=args.seed)
            return model.to(dtype)
        return Setup(args.vocab, 1.0, args.k, student), None
    check_inputs(args.shards, args.teacher)
    shard_set = ShardSet(args.shards)
    manifest = shard_set.manifest

    def shard_student() -> torch.nn.Module:
        return build_student(args.size, vocab_size=manifest.vocab_size, seed=args.seed).to(dtype)
    return Setup(manifest.vocab_size, manifest.sparsify.temperature, manifest.sparsify.k, shard_student), shard_set


def batches_for(args: argparse.Namespace, setup: Setup, shard_set: ShardSet | None, n: int) -> list[Prepared]:
    if shard_set is None:
        generator = torch.Generator().manual_seed(args.seed)
        return [random_batch(args, setup.vocab, generator) for _ in range(n)]
    return prepare(args, shard_set, n)


def to_device(p: Prepared, device: torch.device) -> Prepared:
    fields = {name: getattr(p.batch, name).to(device) for name in p.batch.__dataclass_fields__}
    return Prepared(PackedBatch(**fields), p.attention_mask.to(device), p.sampled_ids.to(device),
                    p.sampled_counts.to(device))


RowsLoss = Callable[[torch.Tensor, slice, Prepared], LossOutput]


def loss_fns(args: argparse.Namespace, setup: Setup) -> dict[str, RowsLoss]:
    """Each kind's loss on any slice of the flattened rows: ``fn(float32 logits of rows, rows, batch)``."""
    vocab, temperature = setup.vocab, setup.temperature

    def topk(alpha: float) -> RowsLoss:
        def fn(logits: torch.Tensor, rows: slice, p: Prepared) -> LossOutput:
            b = p.batch
            return distillation_loss(
                logits, b.labels.flatten()[rows], b.target_ids.flatten(0, 1)[rows], b.target_probs.flatten(0, 1)[rows],
                b.tail.flatten()[rows], b.target_mask.flatten()[rows], alpha=alpha, temperature=temperature,
                vocab_size=vocab, kind="forward_kl")
        return fn

    def sampled(logits: torch.Tensor, rows: slice, p: Prepared) -> LossOutput:
        b = p.batch
        return sampled_distillation_loss(
            logits, b.labels.flatten()[rows], p.sampled_ids[rows], p.sampled_counts[rows],
            p.sampled_counts[rows].sum(-1), b.target_mask.flatten()[rows], alpha=args.alpha, temperature=1.0,
            vocab_size=vocab)

    kd = topk(args.alpha)
    return {"ce": topk(0.0), "kd": kd, "kd_logits": kd, "sampled": sampled}


def timed_step(model: torch.nn.Module, opt: torch.optim.Optimizer, p: Prepared, mode: str, loss_fn: RowsLoss,
               args: argparse.Namespace, vocab: int, device: torch.device) -> dict[str, float]:
    """One training step, seconds per phase. On full logits the backward is split at the logits (same work
    as one backward call) so the loss's own backward is told apart from the model's; the fused loss makes
    its gradients in its forward, so its ``loss`` phase holds them and ``loss_backward`` is 0."""
    b = p.batch
    inputs = {"input_ids": b.input_ids, "position_ids": b.position_ids, "attention_mask": p.attention_mask}
    t0 = now(device)
    if mode in FUSED:
        hidden = model.get_decoder()(**inputs)[0]
        t1 = now(device)
        objective = RowsObjective(of_rows=lambda logits, rows: loss_fn(logits, rows, p),
                                  kd_rows=b.target_mask.flatten(), ce_rows=b.labels.flatten() != -100,
                                  alpha=args.alpha, vocab=vocab)
        loss = fused_linear_loss(hidden, model.get_output_embeddings().weight, objective).loss
        t2 = t3 = now(device)
        loss.backward()
    else:
        logits = model(**inputs).logits.flatten(0, 1).float()
        t1 = now(device)
        leaf = logits.detach().requires_grad_()
        loss = loss_fn(leaf, slice(None), p).loss
        t2 = now(device)
        loss.backward()
        t3 = now(device)
        logits.backward(leaf.grad)
    t4 = now(device)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t5 = now(device)
    return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True))


def new_student(setup: Setup, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = setup.student().to(device)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)


def bench_steps(args: argparse.Namespace, setup: Setup, batches: list[Prepared],
                device: torch.device) -> tuple[dict[str, dict[str, float]], int]:
    """Median seconds per phase and in total, per mode (modes interleaved in a rotating order); parameters."""
    fns = loss_fns(args, setup)
    students = {mode: new_student(setup, device) for mode in MODES}  # same initial weights, own AdamW each
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for i, p in enumerate(batches):
        order = MODES[i % len(MODES):] + MODES[: i % len(MODES)]
        for mode in order:
            model, opt = students[mode]
            phases = timed_step(model, opt, p, mode, fns[mode], args, setup.vocab, device)
            if i >= args.warmup:
                samples[mode].append(phases)
    medians = {}
    for mode, rows in samples.items():
        medians[mode] = {ph: statistics.median(r[ph] for r in rows) for ph in PHASES}
        medians[mode]["step"] = statistics.median(sum(r.values()) for r in rows)
        medians[mode]["step_min"] = min(sum(r.values()) for r in rows)  # the least disturbed step
    for mode in MODES[1:]:  # ratio within each round, where slow drifts in load cancel
        pairs = zip(samples[mode], samples["ce"], strict=True)
        medians[mode]["paired_ratio"] = statistics.median(sum(a.values()) / sum(b.values()) for a, b in pairs)
    return medians, count_parameters(students["ce"][0])


def resident_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure_memory(args: argparse.Namespace) -> dict:
    """In this (fresh) process: one warmup step of ``args.memory_of``, then the peak over the next steps."""
    device = torch.device(args.device)
    setup, shard_set = make_setup(args)
    batches = [to_device(p, device) for p in batches_for(args, setup, shard_set, 1 + args.memory_steps)]
    model, opt = new_student(setup, device)
    fn = loss_fns(args, setup)[args.memory_of]
    timed_step(model, opt, batches[0], args.memory_of, fn, args, setup.vocab, device)  # AdamW state now exists
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        base = resident_mib()[0]
    for p in batches[1:]:
        timed_step(model, opt, p, args.memory_of, fn, args, setup.vocab, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resident_mib()[1]
    return {"mode": args.memory_of, "peak_mib": round(peak, 1), "step_mib": round(peak - base, 1),
            "before_step_mib": round(base, 1)}


def memory_in_fresh_processes(argv: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Each kind's peak memory, from a child process of its own (nothing inherited from another kind)."""
    out = {}
    for mode in MODES:
        child = subprocess.run([sys.executable, __file__, *argv, "--memory-of", mode], capture_output=True,
                               text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if child.returncode != 0:
            raise RuntimeError(f"memory child for '{mode}' failed: {child.stderr.strip().splitlines()[-1:]}")
        out[mode] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"peak memory, {NAMES[mode]}: {out[mode]['peak_mib']:,.0f} MiB "
              f"(+{out[mode]['step_mib']:,.0f} MiB over the {out[mode]['before_step_mib']:,.0f} resident before it)")
    return out


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


def print_table(steps: dict[str, dict[str, float]], tokens_per_step: int, memory: dict[str, dict]) -> None:
    ce = steps["ce"]["step"]
    ce_min = steps["ce"]["step_min"]
    head = ["step", "median ms", "vs CE", "best ms", "best vs CE", "tokens/s", *(f"{ph} ms" for ph in PHASES),
            *(["peak MiB", "step MiB"] if memory else [])]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for mode in MODES:
        s = steps[mode]
        cells = [NAMES[mode], f"{s['step'] * 1e3:.1f}", f"{s['step'] / ce:.3f}", f"{s['step_min'] * 1e3:.1f}",
                 f"{s['step_min'] / ce_min:.3f}", f"{tokens_per_step / s['step']:,.0f}",
                 *(f"{s[ph] * 1e3:.1f}" for ph in PHASES),
                 *([f"{memory[mode]['peak_mib']:,.0f}", f"{memory[mode]['step_mib']:,.0f}"] if memory else [])]
        print("| " + " | ".join(cells) + " |")


def memory_figures(memory: dict[str, dict]) -> dict:
    if not memory:
        return {}
    ratio = memory["kd"]["peak_mib"] / memory["ce"]["peak_mib"]
    return {
        "ce_peak_memory_mib": memory["ce"]["peak_mib"], "kd_peak_memory_mib": memory["kd"]["peak_mib"],
        "kd_logits_peak_memory_mib": memory["kd_logits"]["peak_mib"],
        "sampled_peak_memory_mib": memory["sampled"]["peak_mib"],
        "kd_vs_ce_peak_memory_ratio": round(ratio, 4),
        "kd_vs_ce_step_memory_ratio": round(memory["kd"]["step_mib"] / max(memory["ce"]["step_mib"], 1e-9), 4),
        "step_memory_mib": {m: memory[m]["step_mib"] for m in MODES},
        "memory_target_met": ratio <= 0.5,
    }


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    hf_logging.disable_progress_bar()  # keep stdout a table and one JSON line
    torch.set_num_threads(args.threads)
    pa.set_cpu_count(args.threads)
    pa.set_io_thread_count(args.threads)
    device = torch.device(args.device)
    setup, shard_set = make_setup(args)
    t0 = time.perf_counter()
    batches = [to_device(p, device) for p in batches_for(args, setup, shard_set, args.warmup + args.steps)]
    print(f"prepared {len(batches)} batches of {args.micro_batch}x{args.seq_len} tokens "
          f"({'random' if shard_set is None else 'from the shards, sampled targets from the teacher'}) "
          f"in {time.perf_counter() - t0:.1f} s (not timed)")
    steps, params = bench_steps(args, setup, batches, device)
    del batches
    memory = memory_in_fresh_processes(argv, args) if args.memory_steps else {}
    tokens_per_step = args.micro_batch * args.seq_len
    ce, kd = steps["ce"]["step"], steps["kd"]["step"]
    train_tps = tokens_per_step / kd
    print(f"\nstudent {f'h{args.hidden} x {args.layers} layers' if shard_set is None else repr(args.size)} "
          f"({params:,} params), vocab {setup.vocab}, k={setup.k}, {args.micro_batch}x{args.seq_len} tokens/step, "
          f"median of {args.steps} steps after {args.warmup} warmup, {args.threads} thread(s), {device.type}"
          f"{' bf16' if args.bf16 else ''}\n")
    print_table(steps, tokens_per_step, memory)
    result = {
        "ce_step_s": round(ce, 5), "kd_step_s": round(kd, 5), "kd_vs_ce_step_ratio": round(kd / ce, 4),
        "kd_logits_step_s": round(steps["kd_logits"]["step"], 5),
        "kd_logits_vs_ce_step_ratio": round(steps["kd_logits"]["step"] / ce, 4),
        "sampled_kd_step_s": round(steps["sampled"]["step"], 5),
        "sampled_vs_ce_step_ratio": round(steps["sampled"]["step"] / ce, 4),
        **{f"{m}_vs_ce_best_step_ratio": round(steps[m]["step_min"] / steps["ce"]["step_min"], 4) for m in MODES[1:]},
        **{f"{m}_vs_ce_paired_ratio_median": round(steps[m]["paired_ratio"], 4) for m in MODES[1:]},
        **memory_figures(memory),
        "kd_ratio_target_met": kd / ce <= 1.05,
        "train_tokens_per_s": round(train_tps),
    }
    if shard_set is not None:
        loader_tps, loader_tokens = bench_loader(args, shard_set)
        decode_tps, decode_tokens = bench_decode(shard_set)
        print(f"\nreader (decode + pack, 1 thread): {loader_tps:,.0f} tokens/s over {loader_tokens:,} tokens; "
              f"decode alone: {decode_tps:,.0f} tokens/s over {decode_tokens:,} tokens; "
              f"headroom over the KD step: {loader_tps / train_tps:.1f}x")
        result.update({"loader_tokens_per_s": round(loader_tps), "decode_tokens_per_s": round(decode_tps),
                       "loader_headroom": round(loader_tps / train_tps, 2),
                       "loader_headroom_target_met": loader_tps / train_tps >= 10})
    print(f"KD (fused) / CE within each round (median): {steps['kd']['paired_ratio']:.3f}; "
          f"KD on full logits / CE: {steps['kd_logits']['paired_ratio']:.3f}\n")
    result.update({
        "phases_ms": {m: {ph: round(steps[m][ph] * 1e3, 2) for ph in PHASES} for m in MODES},
        "device": device.type, "bf16": args.bf16, "threads": args.threads,
        "size": f"h{args.hidden}x{args.layers}" if shard_set is None else args.size, "vocab": setup.vocab,
        "hidden": args.hidden if shard_set is None else None, "params": params, "tokens_per_step": tokens_per_step,
        "k": setup.k, "draws": args.draws, "steps": args.steps,
    })
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.memory_of:
            torch.set_num_threads(args.threads)
            hf_logging.disable_progress_bar()
            print(json.dumps(measure_memory(args)))
            return
        result = run(args, argv)
    except RaydistillError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
