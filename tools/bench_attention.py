"""Packed attention: the dense block-causal mask against document boundaries given as position ids.

Usage: python tools/bench_attention.py [--seq-len 4096] [--tokens 16384] [--hidden 1024] [--layers 4]
                                      [--kernels sdpa,flex_attention,flash_attention_2] [--steps 5] [--device cuda]

One Llama-shaped student with random weights, one packed micro-batch (rows of ``--seq-len`` tokens holding
documents of random lengths, ``--tokens`` in all), forward + backward timed for:

- ``dense_mask``: the [B, 1, L, L] block-causal mask raydistill passed before (SDPA);
- each kernel in ``--kernels`` fed position ids that restart at 0 and no mask (``packing.model_inputs``):
  SDPA gets HF's own boolean block-causal mask, FlexAttention a sparse BlockMask, flash-attention its varlen
  path. Kernels this machine cannot run (flash-attention without a GPU or the package; FlexAttention at a
  length that is not a multiple of 128) are reported as skipped.

The kinds run interleaved in a rotating order (medians of ``--steps`` after one warmup each, which also
compiles FlexAttention), every kernel's loss is checked against the dense mask's first, and on a GPU
peak memory is ``torch.cuda.max_memory_allocated`` per kind. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers.utils import logging as hf_logging

from raydistill.errors import ConfigError
from raydistill.models.sizes import build_llama
from raydistill.stages.train.losses import next_token_cross_entropy
from raydistill.stages.train.packing import attention_kernel, model_inputs
from raydistill.stages.train.reader import PackedBatch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=2048, help="tokens in the micro-batch (a multiple of --seq-len)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--kernels", default="sdpa,flex_attention,flash_attention_2")
    p.add_argument("--mean-document", type=int, default=None, help="mean document length (default seq_len / 4)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (default on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tokens % args.seq_len:
        p.error(f"--tokens {args.tokens} must be a multiple of --seq-len {args.seq_len}")
    return args


def packed_batch(rows: int, seq_len: int, vocab: int, mean_document: int, generator: torch.Generator) -> PackedBatch:
    """Rows filled with documents of exponential-ish random lengths (as a real corpus packs)."""
    segment_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    position_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    for row in range(rows):
        start, piece = 0, 0
        while start < seq_len:
            length = max(1, int(torch.empty(1).exponential_(1.0 / mean_document, generator=generator)))
            end = min(seq_len, start + length)
            segment_ids[row, start:end] = piece
            position_ids[row, start:end] = torch.arange(end - start)
            start, piece = end, piece + 1
    input_ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    same_next = torch.cat([segment_ids[:, 1:] == segment_ids[:, :-1], torch.zeros(rows, 1, dtype=torch.bool)], 1)
    labels = torch.where(same_next, torch.roll(input_ids, -1, 1), -100)
    zeros = torch.zeros(rows, seq_len)
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, labels=labels,
                       target_ids=input_ids[..., None], target_probs=zeros[..., None], tail=zeros,
                       target_mask=labels != -100)


def step(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    logits = model(**inputs).logits
    loss = next_token_cross_entropy(logits.flatten(0, 1), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, float(loss)


def runnable(kernel: str, device: torch.device, seq_len: int) -> str | None:
    """None when ``kernel`` can run here, else why not."""
    try:
        attention_kernel(kernel, device, seq_len)
    except ConfigError as err:
        return str(err)
    return None


def run(args: argparse.Namespace) -> dict:
    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    bf16 = args.bf16 or device.type == "cuda"
    generator = torch.Generator().manual_seed(args.seed)
    batch = packed_batch(args.tokens // args.seq_len, args.seq_len, args.vocab, args.mean_document or args.seq_len // 4,
                         generator)
    labels = batch.labels.flatten().to(device)
    model = build_llama(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                        max_positions=args.seq_len, seed=args.seed).to(device)
    if bf16:
        model = model.to(torch.bfloat16)
    model.train()
    kinds = {"dense_mask": ("sdpa", model_inputs(batch, device, by_positions=False))}
    skipped = {}
    for kernel in [k for k in args.kernels.split(",") if k]:
        why = runnable(kernel, device, args.seq_len)
        if why:
            skipped[kernel] = why
        else:
            kinds[kernel] = (kernel, model_inputs(batch, device, by_positions=True))
    times: dict[str, list[float]] = {k: [] for k in kinds}
    losses, peaks = {}, {}
    names = list(kinds)
    for i in range(args.steps + 1):
        for name in names[i % len(names):] + names[: i % len(names)]:
            kernel, inputs = kinds[name]
            model.set_attn_implementation(kernel)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, loss = step(model, inputs, labels, device)
            if i == 0:
                losses[name] = loss
                if device.type == "cuda":
                    peaks[name] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            else:
                times[name].append(seconds)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    dense = medians["dense_mask"]
    tolerance = 2e-2 if bf16 else 1e-4
    print(f"\n{args.tokens:,} tokens in rows of {args.seq_len}, h{args.hidden} x {args.layers} layers, "
          f"{'bf16' if bf16 else 'fp32'}, {device.type}; forward + backward, median of {args.steps}\n")
    print("| attention | ms | speedup over the dense mask | loss | peak MiB |\n|---|---|---|---|---|")
    for name in kinds:
        print(f"| {name} | {medians[name] * 1e3:.1f} | {dense / medians[name]:.2f}x | {losses[name]:.4f} | "
              f"{peaks.get(name, '-')} |")
    for kernel, why in skipped.items():
        print(f"| {kernel} | skipped: {why} | | | |")
    return {
        "seq_len": args.seq_len, "tokens": args.tokens, "hidden": args.hidden, "layers": args.layers,
        "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "bf16": bf16, "ms": {k: round(v * 1e3, 2) for k, v in medians.items()},
        "speedup_over_dense_mask": {k: round(dense / v, 3) for k, v in medians.items() if k != "dense_mask"},
        "loss": losses, "losses_agree": all(abs(v - losses["dense_mask"]) <= tolerance * abs(losses["dense_mask"])
                                            for v in losses.values()),
        "peak_memory_mib": peaks or None, "skipped": skipped, "steps": args.steps,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = run(args)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
