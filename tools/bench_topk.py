"""Candidate search on CPU: ``sparsify.top_candidates`` (two stages over blocks) against one ``torch.topk``.

Usage: python tools/bench_topk.py [--rows 512] [--threads 1] [--repeats 20]

For the vocabularies of the demo teacher (4,096), SmolLM2 (49,152) and Qwen2 (151,936) and the k a
capture uses, times both on the same random logits, interleaved, in one process (one torch thread,
as a capture actor runs), checks that they return the same values, and prints a table and, as its
last line, one JSON object: per (vocab, k) the milliseconds per row block of each and their ratio.
Also the whole ``sparsify_topk`` at the budget default (k = 96) and at k = 48 on the demo vocabulary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from raydistill.sparsify import _block_size, sparsify_topk, top_candidates

CASES = [(4096, 48), (4096, 64), (4096, 96), (4096, 128), (49152, 48), (49152, 96), (151936, 96)]


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=512, help="rows per call on the 4,096-id vocabulary (fewer on larger "
                   "ones, the same number of elements)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results = []
    print("| vocab | k | rows | torch.topk ms | top_candidates ms | ratio | block |")
    print("|---|---|---|---|---|---|---|")
    for vocab, k in CASES:
        rows = max(16, args.rows * 4096 // vocab)
        x = torch.randn(rows, vocab, generator=gen) * 3
        assert torch.equal(top_candidates(x, k)[0], torch.topk(x, k)[0])
        base = timed(lambda x=x, k=k: torch.topk(x, k, sorted=True), args.repeats)
        ours = timed(lambda x=x, k=k: top_candidates(x, k), args.repeats)
        block = _block_size(x.device, vocab, k)
        results.append({"vocab": vocab, "k": k, "rows": rows, "topk_ms": round(base, 3), "ours_ms": round(ours, 3),
                        "ratio": round(ours / base, 3), "block": block})
        print(f"| {vocab:,} | {k} | {rows} | {base:.2f} | {ours:.2f} | {ours / base:.3f} | {block} |")
    x = torch.randn(args.rows, 4096, generator=gen) * 3
    sparsify = {f"sparsify_topk_ms_k{k}": round(timed(lambda k=k: sparsify_topk(x, k=k, chunk_size=args.rows),
                                                      args.repeats), 3) for k in (48, 96)}
    print(f"sparsify_topk on [{args.rows}, 4096]: " + ", ".join(f"{k} {v} ms" for k, v in sparsify.items()))
    print(json.dumps({"threads": args.threads, "cases": results, **sparsify}))


if __name__ == "__main__":
    main()
