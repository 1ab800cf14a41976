"""Storage benchmark: bytes per token and fidelity of every sparsification mode and codec setting,
against two baselines, on the same teacher targets, in one run.

Usage: python tools/bench_storage.py [--teacher DIR] [--gguf-file F] [--tokens 8192] [--quick]

The teacher runs once over held-out text of the embedded corpus (the demo teacher by default;
any HF directory, or a GGUF file in one with --gguf-file); every configuration then sparsifies
the same logits with raydistill's own code (``sparsify_topk``), encodes with the shard writer
(``encode_windows`` + ``serialize_table``, Parquet zstd 3) and decodes with the reader
(``decode_table``). Fidelity compares the teacher's full distribution p with the p̂ the decoded
target stands for (stored probabilities, tail spread by the tail model; sampled: counts / n):
TV(p, p̂) = ½ Σ|p − p̂| (the headline: the forward-KL gradient error is made of it), KL(p‖p̂),
and the stored mass. Baselines, on the same logits: naive (int32 ids + fp32 probabilities) and
DistillKit-style top-64 (ids bit-packed to ceil(log2 V) bits, fp16 probabilities, uniform tail),
both as binary cells in Parquet zstd 3. Encode/decode speeds are single-threaded (torch, numpy
and Arrow held to one thread). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raydistill.config import CaptureConfig, CorpusConfig
from raydistill.contracts.shards import Codec, TargetWindow, VocabTable, decode_table, encode_windows
from raydistill.contracts.shards.writer import ZSTD_LEVEL, serialize_table
from raydistill.io.corpus import read_documents
from raydistill.models.windows import cut_windows
from raydistill.stages.capture.sparsify import budget_cut, hybrid_cut, sparse_to_dense, sparsify_topk
from raydistill.stages.capture.vocab_count import count_vocab_table
from raydistill.stages.capture.worker import draw_uniforms

DEFAULT_TEACHER = "raydistill-demo/teacher"
TARGET_COLUMNS = ("num_ids", "ids", "values", "tail")
DEFAULTS = CaptureConfig.model_fields  # the shipped defaults: the "default" row is these
DEFAULT_NAME = "default"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside --teacher to load (needs `gguf`)")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="fewer configurations (for a smoke run)")
    return p.parse_args()


def single_thread() -> None:
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def load_teacher(path: str, gguf_file: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return tokenizer, model


def teacher_logits(tokenizer, model, n_tokens: int, max_length: int) -> tuple[list, torch.Tensor]:
    """(windows [(doc_id, window, ids)], logits [N, V] float32) over held-out documents."""
    vocab = len(tokenizer)
    windows, parts, total = [], [], 0
    for doc in read_documents(CorpusConfig(split="heldout")):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for w, chunk in enumerate(cut_windows(ids, max_length)):
            chunk = chunk[: n_tokens - total]
            if len(chunk) < 2:
                continue
            with torch.inference_mode():
                logits = model(torch.tensor([chunk]), use_cache=False).logits[0, :, :vocab].float()
            windows.append((doc.id, w, chunk))
            parts.append(logits)
            total += len(chunk)
            if total >= n_tokens:
                return windows, torch.cat(parts)
    return windows, torch.cat(parts)


def storage_context(teacher: str, gguf_file: str | None, tokens: int, max_length: int,
                    temperature: float = 1.0) -> dict:
    """The teacher's logits over ``tokens`` held-out tokens and what every configuration is scored with:
    the shipped vocabulary table and tail prior, and the teacher's distribution p (``run_config``'s input)."""
    tokenizer, model = load_teacher(teacher, gguf_file)
    windows, logits = teacher_logits(tokenizer, model, tokens, max_length)
    table = vocab_table(tokenizer, logits.shape[1], DEFAULTS["vocab_sample_tokens"].default)
    exponent = DEFAULTS["tail_prior_exponent"].default if DEFAULTS["tail_model"].default == "unigram" else 0.0
    p = torch.softmax(logits / temperature, dim=-1)
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
    return {"logits": logits, "windows": windows, "table": table, "p": p, "temperature": temperature,
            "prior": torch.from_numpy(table.prior(exponent)), "k_max": 128, "entropy": entropy}


def vocab_table(tokenizer, vocab: int, sample_tokens: int) -> VocabTable:
    """Counted by capture's own function, over the train split (what a capture of it would count)."""
    return count_vocab_table(tokenizer, read_documents(CorpusConfig(split="train")), vocab, sample_tokens)


def column_bytes(data: bytes) -> dict[str, int]:
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    out: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            out[col.path_in_schema] = out.get(col.path_in_schema, 0) + col.total_compressed_size
    return out


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def fidelity(p: torch.Tensor, ids, probs, tail, prior: torch.Tensor | None) -> dict[str, float]:
    """Mean TV(p, p̂) and KL(p‖p̂) over tokens, in chunks (p̂ is dense [N, V])."""
    tv, kl, n = 0.0, 0.0, p.shape[0]
    for s in range(0, n, 1024):
        sl = slice(s, s + 1024)
        q = sparse_to_dense(ids[sl], probs[sl], tail[sl], p.shape[1], prior=prior).double()
        pp = p[sl].double()
        tv += 0.5 * float((pp - q).abs().sum())
        with torch.no_grad():
            kl_rows = torch.where(pp > 0, pp * (pp.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0)
            kl += float(kl_rows.sum()) if bool((q[pp > 1e-12] > 0).all()) else math.inf
    return {"tv": tv / n, "kl": kl / n}


def split_rows(windows, arrays) -> list[TargetWindow]:
    """Per-window TargetWindows of (ids, probs, tail[, hybrid's draw counts]) over the whole sample."""
    ids, probs, tail, *counts = (np.asarray(a) for a in arrays)
    out, at = [], 0
    for doc_id, w, chunk in windows:
        n = len(chunk)
        out.append(TargetWindow(doc_id, w, np.asarray(chunk), ids[at : at + n], probs[at : at + n], tail[at : at + n],
                                counts[0][at : at + n] if counts else None))
        at += n
    return out


def targets_of(spec: dict, ctx: dict) -> tuple:
    """(ids, probs, tail[, counts]) of one configuration over the sample, as a capture would store them:
    the budget and hybrid cuts over the whole sample as one unit, draws keyed per window."""
    logits, windows, T = ctx["logits"], ctx["windows"], ctx["temperature"]
    mode, draws = spec["mode"], spec.get("draws", 1)
    kw: dict = {"k": spec.get("k", 1), "temperature": T, "mode": mode}
    if mode == "adaptive":
        kw["threshold"], kw["min_prob"] = spec.get("threshold", 1.0), spec.get("min_prob", 0.0)
    width = 2 * draws if mode == "hybrid" else draws
    uniforms = np.concatenate([draw_uniforms(0, d, w, len(c), width) for d, w, c in windows]) \
        if mode in ("sampled", "hybrid") else None
    if uniforms is not None:
        kw["uniforms"] = torch.from_numpy(np.ascontiguousarray(uniforms[:, :draws]))
    t = sparsify_topk(logits, **kw)
    if mode == "budget":
        t = cut_sample(t, spec["mean_ids"])
    if mode == "hybrid":
        cut = hybrid_cut(t.ids.numpy(), t.probs.numpy(), t.tail.numpy(), t.drawn.numpy(), uniforms[:, draws:],
                         spec["mean_ids"])
        return cut.ids, cut.probs, cut.tail, cut.counts
    return t.ids.numpy(), t.probs.numpy(), t.tail.numpy()


def run_config(name: str, spec: dict, ctx: dict) -> dict:
    """Sparsify, encode, decode and score one configuration.

    ``spec``: mode, k (top-k: k ids; adaptive, budget: the cap), threshold and min_prob (adaptive),
    mean_ids (budget), draws (sampled), scale (the √ code's S).
    """
    logits, windows, table, p = ctx["logits"], ctx["windows"], ctx["table"], ctx["p"]
    n, vocab = logits.shape
    mode, k, draws, scale = spec["mode"], spec.get("k", 1), spec.get("draws", 1), spec.get("scale", 128)
    codec = Codec.for_mode(mode, k=k, draws=draws, vocab_size=vocab, table=table, value_scale=scale)
    rows = split_rows(windows, targets_of(spec, ctx))
    enc_s, data = best_of(lambda: serialize_table(encode_windows(rows, codec)))
    dec_s, decoded = best_of(lambda: decode_table(pq.ParquetFile(pa.BufferReader(data)).read(), codec))
    cols = column_bytes(data)
    targets_b = sum(cols[c] for c in TARGET_COLUMNS) / n
    fid = fidelity(p, torch.from_numpy(decoded.ids), torch.from_numpy(decoded.probs),
                   torch.from_numpy(decoded.tail), ctx["prior"])
    row = {"config": name, "mode": mode, "value_scale": scale if mode != "sampled" else None,
           "mean_ids": float((decoded.ids >= 0).sum(1).mean()), "bytes_per_token": targets_b,
           "bytes_with_tokens": targets_b + cols["tokens"] / n,
           "ids_bytes": cols["ids"] / n, "values_bytes": cols["values"] / n,
           "tv": fid["tv"], "kl": fid["kl"], "stored_mass": float((1 - decoded.stored_tail).mean()),
           "encode_tok_s": n / enc_s, "decode_tok_s": n / dec_s}
    if mode == "sampled":
        row["draws"] = draws
        row["bias_tv"] = sampled_bias(ctx, draws)
    if mode == "hybrid":
        row["draws"], row["exact_ids"] = draws, float(decoded.num_ids.mean())
    return row


def cut_sample(targets, mean_ids: float):
    """Budget mode's unit-level cut, over the whole sample as one unit (a few thousand tokens here,
    ≈ 100k in a default capture unit of 64 documents)."""
    ids, probs, tail = budget_cut(*(a.numpy() for a in (targets.ids, targets.probs, targets.tail)), mean_ids)
    return type(targets)(torch.from_numpy(ids), torch.from_numpy(probs), torch.from_numpy(tail))


def sampled_bias(ctx: dict, draws: int, tokens: int = 64, seeds: tuple[int, ...] = (16, 64, 256)
                  ) -> tuple[list[float], list[float]]:
    """TV(p, mean of p̂ over S independent seeds) for growing S, and the same figure for an ideal
    sampler (numpy's multinomial with S·draws draws from p). An unbiased estimator's figure is pure
    sampling noise: it keeps falling with S and matches the ideal sampler's; a bias would not."""
    logits, p = ctx["logits"][:tokens], ctx["p"][:tokens].double()
    rng = np.random.default_rng(0)
    p_np = (p / p.sum(-1, keepdim=True)).numpy()
    ideal = [float(np.mean([0.5 * np.abs(rng.multinomial(s * draws, row) / (s * draws) - row).sum()
                            for row in p_np])) for s in seeds]
    total, out = torch.zeros_like(p), []
    for seed in range(max(seeds)):
        u = torch.from_numpy(draw_uniforms(seed, "bias", 0, tokens, draws))
        t = sparsify_topk(logits, k=1, mode="sampled", uniforms=u, temperature=ctx["temperature"])
        valid = t.ids >= 0
        total += torch.zeros_like(p).scatter_add_(1, t.ids.clamp(min=0), torch.where(valid, t.probs, 0.0).double())
        if seed + 1 in seeds:
            out.append(float(0.5 * (total / (seed + 1) - p).abs().sum(-1).mean()))
    return out, ideal


def cells(flat: np.ndarray, lengths: list[int], per_token_bytes: int) -> pa.Array:
    bounds = np.concatenate([[0], np.cumsum(lengths)]) * per_token_bytes
    raw = flat.tobytes()
    return pa.array([raw[a:b] for a, b in itertools.pairwise(bounds)], pa.binary())


def baseline_bytes(columns: dict[str, pa.Array], n: int) -> dict[str, float]:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
                   write_statistics=False)
    cols = column_bytes(sink.getvalue().to_pybytes())
    targets = sum(b for c, b in cols.items() if c != "tokens") / n
    return {"bytes_per_token": targets, "bytes_with_tokens": targets + cols["tokens"] / n}


def baselines(ctx: dict) -> dict[str, dict]:
    """Naive and DistillKit-style top-64 on the same logits (uniform tail, as those systems spread it)."""
    logits, windows, p, T = ctx["logits"], ctx["windows"], ctx["p"], ctx["temperature"]
    n, vocab = logits.shape
    t = sparsify_topk(logits, k=64, temperature=T)
    lengths = [len(c) for _, _, c in windows]
    tokens = cells(np.concatenate([np.asarray(c) for _, _, c in windows]).astype("<u2" if vocab <= 65536 else "<u4"),
                   lengths, 2 if vocab <= 65536 else 4)
    naive = baseline_bytes({"tokens": tokens, "ids": cells(t.ids.numpy().astype("<i4"), lengths, 256),
                            "probs": cells(t.probs.numpy().astype("<f4"), lengths, 256)}, n)
    bits = math.ceil(math.log2(vocab))
    packed_rows = []
    ids = t.ids.numpy()
    at = 0
    for length in lengths:  # ids of one window as one bit stream of `bits`-bit little-endian fields
        block = ids[at : at + length].reshape(-1)
        bitarr = ((block[:, None] >> np.arange(bits)[None, :]) & 1).astype(np.uint8).reshape(-1)
        packed_rows.append(np.packbits(bitarr, bitorder="little").tobytes())
        at += length
    distillkit = baseline_bytes({"tokens": tokens, "ids": pa.array(packed_rows, pa.binary()),
                                 "probs": cells(t.probs.numpy().astype("<f2"), lengths, 128)}, n)
    fp16 = torch.from_numpy(t.probs.numpy().astype(np.float16).astype(np.float32))
    fid = fidelity(p, t.ids, fp16, t.tail, None)
    naive_fid = fidelity(p, t.ids, t.probs, t.tail, None)
    return {"naive": {**naive, **naive_fid}, "distillkit_style": {**distillkit, **fid}}


def default_targets(ctx: dict, default: dict) -> tuple:
    """The default configuration's (ids, probs, tail[, counts]) over the sample."""
    return targets_of({**default, "draws": default.get("draws") or 1}, ctx)


def large_vocab_cost(ctx: dict, default: dict, target_vocab: int = 152064) -> float:
    """Targets bytes/token of the default at a 152k vocabulary: the same renumbered ranks spread
    over a vocabulary target_vocab / V times larger (each rank r becomes one of r·s … r·s + s − 1),
    coded with u32 deltas as a 152k-vocab set would be."""
    logits, windows, table = ctx["logits"], ctx["windows"], ctx["table"]
    n, vocab = logits.shape
    s = target_vocab // vocab
    rng = np.random.default_rng(0)
    spread = table.rank_of_id * s + rng.integers(0, s, vocab)  # id -> its rank in the big vocabulary
    big_table = VocabTable(np.arange(target_vocab, 0, -1))  # counts fall with the id: rank of x is x
    ids, *rest = default_targets(ctx, default)
    ids = np.where(ids >= 0, spread[ids.clip(0)], -1)
    rows = split_rows([(d, w, np.asarray(c) * 0) for d, w, c in windows], (ids, *rest))
    codec = Codec.for_mode(default["mode"], k=default["k"], draws=default.get("draws") or 1, vocab_size=target_vocab,
                           table=big_table, value_scale=default["value_scale"])
    cols = column_bytes(serialize_table(encode_windows(rows, codec)))
    return sum(cols[c] for c in TARGET_COLUMNS) / n


def compression_study(ctx: dict, default: dict) -> dict[str, float]:
    """Targets bytes/token of the default under other zstd settings: Parquet zstd levels, and cells
    compressed one by one with the `zstandard` package, without and with a trained dictionary
    (trained on the first half of the windows, measured on the second half)."""
    import zstandard

    logits, windows, table = ctx["logits"], ctx["windows"], ctx["table"]
    n, vocab = logits.shape
    codec = Codec.for_mode(default["mode"], k=default["k"], draws=default.get("draws") or 1, vocab_size=vocab,
                           table=table, value_scale=default["value_scale"])
    encoded = encode_windows(split_rows(windows, default_targets(ctx, default)), codec)
    out = {}
    for level in (1, 3, 9, 19):
        enc_s, data = best_of(lambda level=level: serialize_table(encoded, level=level), repeats=1)
        cols = column_bytes(data)
        out[f"parquet_zstd{level}"] = sum(cols[c] for c in TARGET_COLUMNS) / n
        out[f"parquet_zstd{level}_encode_tok_s"] = n / enc_s
    half = encoded.num_rows // 2
    second_half_tokens = int(np.asarray(encoded.column("num_tokens"))[half:].sum())
    plain, with_dict = 0, 0
    try:
        for name in TARGET_COLUMNS:
            cells = [c.as_py() for c in encoded.column(name)]
            train, test = cells[:half], cells[half:]
            dictionary = zstandard.train_dictionary(16384, [c for c in train if c] * 2)
            c_plain = zstandard.ZstdCompressor(level=3)
            c_dict = zstandard.ZstdCompressor(level=3, dict_data=dictionary)
            plain += sum(len(c_plain.compress(c)) for c in test)
            with_dict += sum(len(c_dict.compress(c)) for c in test)
    except zstandard.ZstdError as err:  # too little data to train on (a --tokens smoke run)
        print(f"(no dictionary study: {err})")
        return out
    out["cellwise_zstd3"] = plain / second_half_tokens
    out["cellwise_zstd3_trained_dict"] = with_dict / second_half_tokens
    return out


def main() -> None:
    args = parse_args()
    single_thread()
    t0 = time.perf_counter()
    ctx = storage_context(args.teacher, args.gguf_file, args.tokens, args.max_length, args.temperature)
    logits, entropy = ctx["logits"], ctx["entropy"]
    n, vocab = logits.shape
    default = {name: DEFAULTS[name].default for name in ("mode", "k", "mean_ids", "threshold", "min_prob",
                                                          "value_scale", "tail_model", "tail_prior_exponent")}
    shipped = CaptureConfig(teacher="t", output="o")
    default["mean_ids"], default["draws"] = shipped.budget_mean_ids, shipped.draw_count or None
    default_spec = {"mode": default["mode"], "k": default["k"], "mean_ids": default["mean_ids"],
                    "threshold": default["threshold"], "min_prob": default["min_prob"], "scale": default["value_scale"],
                    **({"draws": default["draws"]} if default["draws"] else {})}
    print(f"teacher {args.teacher}{' / ' + args.gguf_file if args.gguf_file else ''}: V={vocab}, {n} held-out "
          f"tokens, mean entropy {entropy:.2f} nats, logits in {time.perf_counter() - t0:.0f} s", flush=True)

    configs = {f"top{k} s{sc}": {"mode": "topk", "k": k, "scale": sc} for k in (8, 16, 32, 64, 128)
               for sc in (64, 128, 255)}
    configs.update({f"adaptive{t} s128": {"mode": "adaptive", "k": 128, "threshold": t} for t in (0.5, 0.7, 0.9)})
    configs.update({f"cut{c:g} k{cap}": {"mode": "adaptive", "k": cap, "min_prob": c}
                    for c in (0.001, 0.0013, 0.002) for cap in (64, 128)})
    configs.update({f"budget{m} k{cap}": {"mode": "budget", "k": cap, "mean_ids": m}
                    for m, cap in ((40, 96), (48, 64), (48, 128), (56, 96))})  # (48, 96) is the default
    configs.update({f"sampled{d}": {"mode": "sampled", "draws": d} for d in (16, 32, 64)})
    configs.update({f"hybrid{m} d{d}": {"mode": "hybrid", "k": 2 * m, "mean_ids": m, "draws": d}
                    for m, d in ((8, 16), (16, 16), (24, 16), (16, 32))})
    configs[DEFAULT_NAME] = default_spec
    if args.quick:
        configs = {n: c for n, c in configs.items()
                   if n in (DEFAULT_NAME, "top64 s128", "adaptive0.9 s128", "sampled32", "hybrid8 d16", "hybrid16 d16")}
    base = baselines(ctx)
    dk = base["distillkit_style"]["bytes_per_token"]
    header = (f"{'config':<16}{'ids/tok':>8}{'B/tok':>8}{'+tokens':>8}{'ids B':>7}{'val B':>7}{'vs DK':>7}"
              f"{'TV':>8}{'KL':>8}{'mass':>7}{'enc tok/s':>11}{'dec tok/s':>11}")
    print(header)
    rows = []
    for name, spec in configs.items():
        row = run_config(name, spec, ctx)
        rows.append(row)
        extra = ("  TV(p, mean p̂) over 16/64/256 seeds: " + " / ".join(f"{x:.4f}" for x in row["bias_tv"][0])
                 + " (ideal sampler: " + " / ".join(f"{x:.4f}" for x in row["bias_tv"][1]) + ")"
                 if "bias_tv" in row else "")
        print(f"{name:<16}{row['mean_ids']:>8.1f}{row['bytes_per_token']:>8.1f}{row['bytes_with_tokens']:>8.1f}"
              f"{row['ids_bytes']:>7.1f}{row['values_bytes']:>7.1f}{row['bytes_per_token'] / dk:>7.3f}"
              f"{row['tv']:>8.4f}{row['kl']:>8.4f}{row['stored_mass']:>7.3f}{row['encode_tok_s']:>11,.0f}"
              f"{row['decode_tok_s']:>11,.0f}{extra}", flush=True)
    for label, b in base.items():
        print(f"{label:<16}{64.0:>8.1f}{b['bytes_per_token']:>8.1f}{b['bytes_with_tokens']:>8.1f}{'':>14}"
              f"{b['bytes_per_token'] / dk:>7.3f}{b['tv']:>8.4f}{b['kl']:>8.4f}")
    by_name = {r["config"]: r for r in rows}
    d = by_name[DEFAULT_NAME]
    k64 = by_name["top64 s128"]
    big = large_vocab_cost(ctx, default)
    print(f"default ({default_spec}, tail {default['tail_model']}^{default['tail_prior_exponent']}): "
          f"{d['bytes_per_token']:.1f} B/token; at a 152,064-token vocabulary ≈ {big:.1f} B/token "
          f"(DistillKit-style top-64 there: 64 × 18 bits + 128 B fp16 ≈ {64 * 18 / 8 + 128:.0f} B before zstd)")
    study = compression_study(ctx, default)
    print("compression of the default's target columns, B/token: " + ", ".join(
        f"{k} {v:,.1f}" for k, v in study.items()))
    result = {
        "teacher": args.teacher if not args.gguf_file else f"{args.teacher}/{args.gguf_file}",
        "vocab_size": vocab, "tokens": n, "mean_entropy_nats": round(entropy, 3),
        "default_config": default,
        "default_bytes_per_token": round(d["bytes_per_token"], 2),
        "default_bytes_with_tokens": round(d["bytes_with_tokens"], 2),
        "naive_bytes_per_token": round(base["naive"]["bytes_per_token"], 2),
        "distillkit_style_bytes_per_token": round(dk, 2),
        "bytes_ratio_vs_distillkit_style": round(d["bytes_per_token"] / dk, 4),
        "default_tv": round(d["tv"], 5),
        "top64_fp16_tv": round(base["distillkit_style"]["tv"], 5),
        "default_kl": round(d["kl"], 5),
        "default_stored_mass": round(d["stored_mass"], 4),
        "decode_tokens_per_s_k64": round(k64["decode_tok_s"]),
        "encode_tokens_per_s_k64": round(k64["encode_tok_s"]),
        "default_bytes_per_token_at_152k_vocab": round(big, 2),
        "sampled_tv_of_mean_over_16_64_256_seeds": {str(r["draws"]): [round(x, 5) for x in r["bias_tv"][0]]
                                                    for r in rows if "bias_tv" in r},
        "ideal_sampler_tv_of_mean_over_16_64_256_seeds": {str(r["draws"]): [round(x, 5) for x in r["bias_tv"][1]]
                                                          for r in rows if "bias_tv" in r},
        "compression_study": {k: round(v, 2) for k, v in study.items()},
        "bytes_per_token_by_config": {r["config"]: round(r["bytes_per_token"], 2) for r in rows},
        "tv_by_config": {r["config"]: round(r["tv"], 5) for r in rows},
        "ratio_vs_distillkit_style_by_config": {r["config"]: round(r["bytes_per_token"] / dk, 4) for r in rows},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
