"""Capture throughput against the bare teacher forward pass, on one actor-equivalent (no Ray).

Usage: python tools/bench_capture.py [--teacher DIR] [--documents N] [--threads 1] [--rounds 3]
       python tools/bench_capture.py --random-teacher 2048x24 [--vocab 151936] --dtype bfloat16 ...  (on a GPU)

One ``TeacherWorker`` (what a Ray actor holds) runs, on the same pre-tokenized documents and
the same padded batches, interleaved round by round so that load changes hit every phase:
  bare       ``model(input_ids, attention_mask, use_cache=False)`` on every batch, nothing else;
  capture×2  the actor's full path (forward, sparsify, encode, write a shard + completion record
             to a temp dir) with two calls in flight on different units, sharing the device lock,
             as the actor runs with max_concurrency=2;
  capture×1  the same, one unit after another.
Tokenization is excluded from all three (documents are tokenized once, up front; its cost is
printed separately). Then, per batch, the pieces are timed alone. Then (unless --no-ray) the same
units go through real Ray actors, 1 and then 2 of them (one torch thread each), rounds
interleaved: ``scaling_2_actors`` is their throughput ratio. Prints a table, then as its last
line one JSON object.

``--random-teacher HIDDENxLAYERS`` measures a teacher of real size without one on disk: a randomly
initialised, untied Llama of that shape and ``--vocab`` (heads of 128) is saved to a temporary directory
with a tokenizer trained on the corpus (its ids are fewer than the head's rows, as Qwen's are), in the
chosen dtype; throughput depends on the shape, not on the weights.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from raydistill.config import CaptureConfig, CorpusConfig
from raydistill.contracts.units import unplanned_unit
from raydistill.io.corpus import read_documents
from raydistill.models.windows import PaddedBatch
from raydistill.stages.capture import sparsify
from raydistill.stages.capture.sparsify import sparsify_hidden, sparsify_topk
from raydistill.stages.capture.worker import TeacherSettings, TeacherWorker

DEFAULT_TEACHER = "raydistill-demo/teacher"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help=f"teacher model directory (default {DEFAULT_TEACHER})")
    p.add_argument("--random-teacher", default=None, metavar="HIDDENxLAYERS",
                   help="a random Llama teacher of this shape in place of --teacher (e.g. 2048x24: 1.6B at V=151,936)")
    p.add_argument("--vocab", type=int, default=151936, help="--random-teacher's vocabulary (head rows)")
    p.add_argument("--split", default="train", choices=["heldout", "train"], help="embedded corpus split")
    p.add_argument("--documents", type=int, default=64, help="documents of the split (0: all of it)")
    p.add_argument("--docs-per-unit", type=int, default=1, help="documents per work unit (one shard each); many "
                   "units, as in a real capture, so the end of a run (one actor finishing the last unit) is a small "
                   "share of it")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the actor (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three phases")
    p.add_argument("--mode", default=CaptureConfig.model_fields["mode"].default, help="sparsify mode (default: "
                   "the capture default)")
    p.add_argument("--k", type=int, default=CaptureConfig.model_fields["k"].default)
    p.add_argument("--mean-ids", type=float, default=None, help="budget mode: ids per token (default k / 2)")
    p.add_argument("--no-ray", dest="ray", action="store_false", help="skip the 1- and 2-actor Ray phases")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--head", default="auto", choices=["auto", "chunked", "full"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--sparsify-chunk", type=int, default=0, help="rows per sparsify chunk (0 = automatic)")
    return p.parse_args()


def random_teacher(shape: str, vocab: int, dtype: str, out: str) -> str:
    """A random untied Llama of ``shape`` (HIDDENxLAYERS) saved to ``out`` with a corpus-trained tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raydistill.models.sizes import swiglu_width
    from raydistill.models.tokenizers import train_tokenizer

    hidden, layers = (int(x) for x in shape.lower().split("x"))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 256),
                         intermediate_size=swiglu_width(hidden), max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch_dtype = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init where it is fast
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.save_pretrained(out)
    train_tokenizer([d.text for d in read_documents(CorpusConfig(split="train"))], vocab_size=8192).save_pretrained(out)
    print(f"random teacher {shape} ({sum(p.numel() for p in model.parameters()):,} parameters, V={vocab}) in {out}")
    del model
    return out


def check_teacher(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: no teacher at '{path}' (no config.json there); run `raydistill demo` to build "
                         f"{DEFAULT_TEACHER}, or pass --teacher DIR of a saved HF causal LM")


def corpus_counts(settings: TeacherSettings):
    """The vocabulary table a capture of the train split would count, so encoding renumbers ids as it does."""
    from raydistill.models.tokenizers import load_tokenizer, vocab_size_of
    from raydistill.stages.capture.vocab_count import count_vocab_table

    tokenizer = load_tokenizer(settings.teacher)
    documents = read_documents(CorpusConfig(split="train"))
    sample_tokens = CaptureConfig.model_fields["vocab_sample_tokens"].default
    return count_vocab_table(tokenizer, documents, vocab_size_of(tokenizer), sample_tokens).counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """The documents, units and batches of one run, and the three timed phases over them."""

    def __init__(self, worker: TeacherWorker, units: list[list[tuple[str, int, list[int]]]]):
        self.worker = worker
        self.units = units
        self.batches: list[PaddedBatch] = [b for u in units for b in worker.batches([w[2] for w in u])]
        self.tokens = sum(b.tokens for b in self.batches)
        self.unit_timings: list[dict] = []
        self.threads_seen: set[int] = set()

    @torch.inference_mode()
    def bare(self) -> None:
        model, device = self.worker.model, self.worker.device
        for b in self.batches:
            model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
        sync(device)

    def capture(self, in_flight: int) -> None:
        root = tempfile.mkdtemp(prefix="bench-capture-")
        todo = list(enumerate(self.units))
        lock = threading.Lock()

        def actor_thread() -> None:  # what one of the actor's max_concurrency threads does
            self.threads_seen.add(torch.get_num_threads())
            while True:
                with lock:
                    if not todo:
                        return
                    unit, windows = todo.pop(0)
                self.unit_timings.append(self.worker.capture_windows(root, unplanned_unit(unit), windows)["timings"])

        try:
            with ThreadPoolExecutor(in_flight) as pool:
                for f in [pool.submit(actor_thread) for _ in range(in_flight)]:
                    f.result()
        finally:
            shutil.rmtree(root, ignore_errors=True)

    @torch.inference_mode()
    def pieces(self) -> dict[str, float]:
        """Mean ms per batch of each piece alone: full forward, its sparsify, decoder, head + sparsify."""
        w, s = self.worker, self.worker.settings
        kw = dict(k=s.k, temperature=s.temperature, vocab_size=w.vocab_size, chunk_size=w.chunk_rows)
        head = w.model.get_output_embeddings()
        totals = dict.fromkeys(("forward", "sparsify", "decoder", "head_sparsify", "head_sparsify_torch"), 0.0)
        triton_head = sparsify._triton_head(w.device)  # on a GPU: the Triton kernels, and torch's ops beside them

        @contextmanager
        def timed(name: str) -> Iterator[None]:
            t0 = time.perf_counter()
            yield
            sync(w.device)
            totals[name] += time.perf_counter() - t0

        for b in self.batches:
            ids, mask = b.input_ids.to(w.device), b.attention_mask.to(w.device)
            valid = mask.bool()
            with timed("forward"):
                logits = w.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            with timed("sparsify"):
                sparsify_topk(logits[valid], **kw)
            del logits
            if w.head == "chunked":
                with timed("decoder"):
                    hidden = w.model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
                with timed("head_sparsify"):
                    sparsify_hidden(hidden.last_hidden_state[valid], head.weight, **kw)
                if triton_head:
                    devices, sparsify.TRITON_DEVICES = sparsify.TRITON_DEVICES, set()
                    try:
                        with timed("head_sparsify_torch"):
                            sparsify_hidden(hidden.last_hidden_state[valid], head.weight, **kw)
                    finally:
                        sparsify.TRITON_DEVICES = devices
        return {name: 1e3 * t / len(self.batches) for name, t in totals.items()}


class RayPhase:
    """The same units captured by N Ray actors (``TeacherWorker``, one torch thread each, two calls in
    flight per actor, as ``raydistill precompute`` runs them), timed from the first call to the last
    result. Actors start and warm up before timing: startup is not throughput. Both pools stay up so
    their rounds can interleave; they reserve no CPUs (``num_cpus=0``) because 1 + 2 actors would not
    fit a 2-CPU Ray node's accounting, while an idle pool uses no CPU time."""

    def __init__(self, settings: TeacherSettings, counts, units, actors: int, in_flight: int = 2):
        import ray

        self.units = units
        self.in_flight = in_flight
        cls = ray.remote(TeacherWorker).options(num_cpus=0, max_concurrency=2)
        self.actors = [cls.remote(settings, counts) for _ in range(actors)]
        self.root = tempfile.mkdtemp(prefix=f"bench-capture-ray{actors}-")
        ray.get([a.capture_windows.remote(self.root, unplanned_unit(10**6 + i), units[0][:2]) for i, a in enumerate(self.actors)])

    def run(self) -> None:
        import ray

        # largest first, as the capture driver orders them (raydistill.stages.capture.run.largest_first)
        todo = sorted(enumerate(self.units), key=lambda u: (-sum(len(w[2]) for w in u[1]), u[0]))
        pending = {}
        for actor in self.actors:  # calls in flight per actor, refilled as they return
            for _ in range(self.in_flight):
                if todo:
                    unit, windows = todo.pop(0)
                    pending[actor.capture_windows.remote(self.root, unplanned_unit(unit), windows)] = actor
        self.device_s = 0.0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            self.device_s += ray.get(done[0])["timings"]["device_s"]
            if todo:
                unit, windows = todo.pop(0)
                pending[actor.capture_windows.remote(self.root, unplanned_unit(unit), windows)] = actor

    def bare(self) -> None:
        """The bare forward of the same units inside the first actor (the in-actor baseline)."""
        import ray

        ray.get([self.actors[0].bare_forward.remote([w[2] for w in u]) for u in self.units])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        shutil.rmtree(self.root, ignore_errors=True)


def run_ray_phases(settings: TeacherSettings, counts, units, tokens: int, rounds: int) -> dict[str, list[float]]:
    """Tokens per second of the bare forward inside a Ray actor, and of the capture with 1 and with 2
    Ray actors, rounds interleaved with the order rotated (all pools stay up). Ray's own processes
    (raylet, GCS, dashboard) take a share of a 2-core machine's CPU, so the Ray capture is compared
    with the bare forward run in an actor, under the same conditions, not with the one before Ray."""
    from raydistill.runtime.cluster import init_ray

    init_ray(None)
    pools = {n: RayPhase(settings, counts, units, n) for n in (1, 2)}
    phases = {"ray_bare": pools[1].bare, "ray_1": pools[1].run, "ray_2": pools[2].run}
    names = list(phases)
    rates: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(rounds):
            for name in names[r % 3:] + names[: r % 3]:
                t0 = time.perf_counter()
                phases[name]()
                rates[name].append(tokens / (time.perf_counter() - t0))
    finally:
        for pool in pools.values():
            pool.close()
    return rates


def run_rounds(bench: Bench, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per round and phase: tokens per wall second, and CPU seconds (all threads) per 1k tokens.

    The phase order rotates so that no phase always runs first. CPU time is what the work
    costs whatever else the machine runs; wall time is what a user waits for.
    """
    phases: dict[str, Callable[[], None]] = {
        "bare": bench.bare, "capture_2": lambda: bench.capture(2), "capture_1": lambda: bench.capture(1)}
    names = list(phases)
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:
            t0, c0 = time.perf_counter(), time.process_time()
            phases[name]()
            rates[name].append(bench.tokens / (time.perf_counter() - t0))
            cpu[name].append(1e3 * (time.process_time() - c0) / bench.tokens)
    return rates, cpu


def main() -> None:
    args = parse_args()
    if args.random_teacher:
        args.teacher = random_teacher(args.random_teacher, args.vocab, args.dtype,
                                      tempfile.mkdtemp(prefix="raydistill-random-teacher-"))
        atexit.register(shutil.rmtree, args.teacher, True)  # gigabytes of random weights
    check_teacher(args.teacher)
    load_before = os.getloadavg()
    settings = TeacherSettings(teacher=args.teacher, k=args.k, temperature=args.temperature,
                               max_length=args.max_length, batch_tokens=args.batch_tokens, dtype=args.dtype,
                               threads_per_actor=args.threads, head=args.head, sparsify_chunk=args.sparsify_chunk,
                               mode=args.mode, mean_ids=args.mean_ids)
    docs = read_documents(CorpusConfig(split=args.split, max_documents=args.documents or None))
    counts = corpus_counts(settings)
    worker = TeacherWorker(settings, counts)
    t0 = time.perf_counter()
    windows = [worker.tokenize(docs[i : i + args.docs_per_unit]) for i in range(0, len(docs), args.docs_per_unit)]
    tokenize_s = time.perf_counter() - t0
    units = [u for u in windows if u]
    bench = Bench(worker, units)
    # warm-up (allocator, kernels, lazy inits), not timed
    warm = Bench(worker, [units[0][:4]])
    warm.bare()
    warm.capture(1)

    rates, cpu = run_rounds(bench, args.rounds)
    bench.unit_timings.clear()
    bench.capture(1)  # one more serial pass, for the per-unit split of the actor's time
    per_unit = {k: 1e3 * sum(t[k] for t in bench.unit_timings) / len(bench.unit_timings)
                for k in ("device_s", "write_s")}
    pieces = bench.pieces()
    ray_rates = run_ray_phases(settings, counts, units, bench.tokens, args.rounds) if args.ray else None
    load_after = os.getloadavg()

    med = {name: statistics.median(v) for name, v in rates.items()}
    ratio_2 = statistics.median(c / b for c, b in zip(rates["capture_2"], rates["bare"], strict=True))
    ratio_1 = statistics.median(c / b for c, b in zip(rates["capture_1"], rates["bare"], strict=True))
    cpu_med = {name: statistics.median(v) for name, v in cpu.items()}
    cpu_ratio = statistics.median(b / c for c, b in zip(cpu["capture_1"], cpu["bare"], strict=True))
    device = str(worker.device) if worker.device.type == "cpu" else torch.cuda.get_device_name(worker.device)
    print(f"teacher {args.teacher}  device {device}  threads {args.threads}  head {worker.head}  k {args.k}  "
          f"dtype {worker.dtype}")
    print(f"{len(docs)} documents ({args.split}), {len(units)} units, {len(bench.batches)} batches, "
          f"{bench.tokens:,} tokens; tokenization {bench.tokens / tokenize_s:,.0f} tokens/s (excluded below); "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"\n| phase | tokens/s (median of {args.rounds}) | per round | vs bare | CPU s per 1k tokens |"
          "\n|---|---|---|---|---|")
    for name, label in (("bare", "bare forward"), ("capture_2", "capture, 2 calls in flight"),
                        ("capture_1", "capture, serial")):
        rounds = " / ".join(f"{r:,.0f}" for r in rates[name])
        vs = 1.0 if name == "bare" else (ratio_2 if name == "capture_2" else ratio_1)
        print(f"| {label} | {med[name]:,.0f} | {rounds} | {vs:.3f} | {cpu_med[name]:.3f} |")
    print(f"serial capture vs bare forward in CPU time (load-independent cost): {cpu_ratio:.3f}")
    scaling = ray_ratio = None
    if ray_rates:
        ray_med = {name: statistics.median(v) for name, v in ray_rates.items()}
        scaling = statistics.median(b / a for a, b in zip(ray_rates["ray_1"], ray_rates["ray_2"], strict=True))
        ray_ratio = statistics.median(c / b for c, b in zip(ray_rates["ray_1"], ray_rates["ray_bare"], strict=True))
        for name, label in (("ray_bare", "Ray actor: bare forward"), ("ray_1", "Ray, 1 actor × 1 thread: capture"),
                            ("ray_2", "Ray, 2 actors × 1 thread: capture")):
            rounds = " / ".join(f"{r:,.0f}" for r in ray_rates[name])
            print(f"| {label} | {ray_med[name]:,.0f} | {rounds} | {ray_med[name] / ray_med['ray_bare']:.3f} "
                  "(vs the bare forward in an actor) | |")
        print(f"Ray: 1-actor capture vs the bare forward in an actor (median of per-round ratios): {ray_ratio:.3f}; "
              f"scaling, 2 actors over 1: {scaling:.3f}")
    print(f"\n| piece, alone | ms per batch (mean, {bench.tokens / len(bench.batches):,.0f} tokens) |\n|---|---|")
    print(f"| full forward (model(...).logits) | {pieces['forward']:.1f} |")
    print(f"| sparsify_topk of those logits | {pieces['sparsify']:.1f} |")
    if worker.head == "chunked":
        print(f"| decoder only (no lm_head) | {pieces['decoder']:.1f} |")
        print(f"| lm_head chunk by chunk + sparsify (sparsify_hidden) | {pieces['head_sparsify']:.1f} |")
        if pieces["head_sparsify_torch"]:
            print(f"| the same through torch's ops, not the Triton kernels | {pieces['head_sparsify_torch']:.1f} |")
    print(f"| per unit in capture×1: device lock held (forward + sparsify) / encode + write | "
          f"{per_unit['device_s']:.0f} / {per_unit['write_s']:.0f} ms |")
    print(json.dumps({
        "bare_forward_tokens_per_s": round(med["bare"], 1),
        "capture_tokens_per_s": round(med["capture_2"], 1),
        "capture_serial_tokens_per_s": round(med["capture_1"], 1),
        "capture_vs_forward": round(ratio_2, 4),
        "capture_serial_vs_forward": round(ratio_1, 4),
        "capture_serial_vs_forward_cpu_time": round(cpu_ratio, 4),
        "forward_ms_per_batch": round(pieces["forward"], 2),
        "sparsify_ms_per_batch": round(pieces["sparsify"], 2),
        "decoder_ms_per_batch": round(pieces["decoder"], 2) if worker.head == "chunked" else None,
        "head_and_sparsify_ms_per_batch": round(pieces["head_sparsify"], 2) if worker.head == "chunked" else None,
        # on a GPU with Triton: the same head through torch's ops (the Triton kernels' baseline), same batches
        "head_and_sparsify_torch_ops_ms_per_batch": round(pieces["head_sparsify_torch"], 2)
        if pieces["head_sparsify_torch"] else None,
        "encode_write_ms_per_unit": round(per_unit["write_s"], 2),
        "head": worker.head, "mode": args.mode, "k": args.k, "threads": args.threads, "device": device, "dtype": str(worker.dtype),
        "tokens": bench.tokens, "batches": len(bench.batches), "units": len(units), "rounds": args.rounds,
        "torch_threads_in_call_threads": sorted(bench.threads_seen),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        # the names issue 5 item 6 uses, for the one-actor figures
        "forward_tokens_per_s": round(med["bare"], 1),
        "capture_tokens_per_s_1_actor": round(med["capture_2"], 1),
        "capture_vs_forward_ratio": round(ratio_2, 4),
        "bare_forward_tokens_per_s_in_ray_actor": round(statistics.median(ray_rates["ray_bare"]), 1)
        if ray_rates else None,
        "capture_tokens_per_s_ray_1_actor": round(statistics.median(ray_rates["ray_1"]), 1) if ray_rates else None,
        "ray_capture_vs_forward_ratio": round(ray_ratio, 4) if ray_rates else None,
        "capture_tokens_per_s_2_actors": round(statistics.median(ray_rates["ray_2"]), 1) if ray_rates else None,
        "scaling_2_actors": round(scaling, 4) if scaling else None,
    }))


if __name__ == "__main__":
    main()
