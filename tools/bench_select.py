"""Selection benchmark: do students learn more from MiniPLM's refined corpus than from a random one?

Usage: python tools/bench_select.py [--workdir raydistill-demo] [--fraction 0.5] [--size tiny | --size JSON]
                                   [--steps 150 | --epochs 1]
                                   [--seeds 0,1] [--reference-steps 80] [--teacher-steps 300]
                                   [--disjoint] [--student-tokenizer teacher|own]
                                   [--noisy [--noise-fraction 0.3]] [--max-repeated-lines 0.2]
                                   [--teacher DIR [--gguf-file F]]
                                   [--max-documents N] [--train KEY=VALUE ...] [--output DIR]

On the embedded default corpus: the demo teacher (cached by `raydistill demo`, or trained here), the
demo's reference model (a small model with the teacher's tokenizer, trained briefly), then
`raydistill select` over the train split keeps the top ``fraction`` of documents by (reference −
teacher) loss per token. A random subset of the train split with as many tokens (documents drawn in
a seeded random order until the refined corpus's token count is reached) is the baseline. One
student size is trained with plain CE on each corpus (`raydistill train` in corpus mode: DeepSpeed
ZeRO-2 under Ray Train, same steps, batch and seeds, so the same token budget), and every student
is scored on the held-out split, which the selection never saw: text from the full distribution.

``--student-tokenizer own`` trains the students with a tokenizer of their own (a 3,072-id BPE
trained here), not the teacher's: what selection offers across model families, where logit KD
cannot go. Both arms then share that tokenizer, so their losses compare.

``--noisy`` selects where difference sampling should help: the train split mixed with 30% low-quality
documents (``tools/noisy_corpus.py``: shuffled words, repeated boilerplate, random characters), the
reference trained on that mixture (MiniPLM's reference sees the pool), the random baseline drawn from the
same mixture, the students still scored on clean held-out text; the JSON adds ``noise_share`` (noise by
documents and tokens in the refined corpus, the random one and the pool). ``--teacher`` scores with any
teacher (a GGUF file is exported once, as bench_quality does); its students default to a tokenizer of their own.

Prints a table and, as its last line, one JSON object with refined_loss and random_loss (means over
seeds), per-seed losses, seed_spread (largest gap between seeds of one arm), kept_fraction and the
subset sizes. About 8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

from bench_quality import parse_override, prepare_teacher, steps_for_epochs
from noisy_corpus import NOISE_KINDS, noisy_mixture

from raydistill.config import CorpusConfig, DemoConfig, SelectConfig, TrainConfig
from raydistill.contracts.selection import SCORES_NAME, unit_scores_relpath
from raydistill.contracts.units import unplanned_unit
from raydistill.io import storage
from raydistill.io.corpus import Document, read_documents
from raydistill.io.slices import plan_slices
from raydistill.models.tokenizers import load_tokenizer, train_tokenizer
from raydistill.recipes.demo import student_settings
from raydistill.recipes.pretrain import ensure_demo_reference, ensure_demo_teacher
from raydistill.stages.evaluate.scores import evaluate_model
from raydistill.stages.select.ranking import corpus_bytes, ranked_scores
from raydistill.stages.select.run import run_select
from raydistill.stages.select.worker import ScoreSettings, ScoreWorker
from raydistill.stages.train.run import finished_summary, run_training

OWN_TOKENIZER_VOCAB = 3072


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="raydistill-demo", help="the demo's work dir (teacher, reference reused)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the train documents the selection keeps")
    p.add_argument("--size", default="tiny", help="student: a named size (raydistill.models.sizes.STUDENT_SIZES) or "
                   'a JSON student of any shape, e.g. \'{"name": "h32", "family": "llama", "hidden": 32, ...}\'')
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per student (2 workers x 8 x 128 tokens)")
    p.add_argument("--epochs", type=float, default=None, help="in place of --steps: the steps that read the refined "
                   "corpus this many times, counted in the students' tokens (both arms train as many steps: one "
                   "epoch reads the same tokens at every seed, the quiet recipe of docs/results.md)")
    p.add_argument("--seeds", default="0,1", help="student seeds, comma-separated")
    p.add_argument("--reference-steps", type=int, default=DemoConfig().reference_steps)
    p.add_argument("--teacher-steps", type=int, default=DemoConfig().teacher_steps, help="teacher training steps "
                   "(default: the demo's, whose cached teacher is reused; others train a teacher of their own)")
    p.add_argument("--disjoint", action="store_true", help="teacher and reference learn from one half of the train "
                   "split; the selection and the students use the other half")
    p.add_argument("--student-tokenizer", choices=["teacher", "own"], default=None,
                   help="default: the teacher's for the demo teacher, their own with --teacher")
    p.add_argument("--noisy", action="store_true", help="select from the train split mixed with low-quality "
                   "documents (tools/noisy_corpus.py); the reference learns from that mixture, as MiniPLM's does")
    p.add_argument("--max-repeated-lines", type=float, default=None, help="select's max_repeated_lines: drop "
                   "documents whose repeated lines hold more than this share of their characters (Gopher: 0.2)")
    p.add_argument("--noise-fraction", type=float, default=0.3, help="share of the mixture's documents that is noise")
    p.add_argument("--teacher", default=None, help="a teacher directory in place of the demo teacher")
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside --teacher (exported once to a directory)")
    p.add_argument("--max-documents", type=int, default=None, help="clean train documents to start from")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="student training overrides, e.g. micro_batch_size=16 (a quieter recipe: docs/results.md)")
    p.add_argument("--output", default=None, help="default <workdir>/bench-select-<settings>")
    return p.parse_args()


def random_subset(documents: list[Document], tokens_of: dict[str, int], target_tokens: int, seed: int = 0
                  ) -> list[Document]:
    """Documents in a seeded random order until ``target_tokens`` is reached, returned in corpus order."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    chosen, total = set(), 0
    for i in order:
        if total >= target_tokens:
            break
        chosen.add(i)
        total += tokens_of[documents[i].id]
    return [d for i, d in enumerate(documents) if i in chosen]


def split_by_score(documents: list[Document], select: SelectConfig, cut: float) -> tuple[list[Document], list[Document]]:
    """Held-out documents the selection would keep (score >= the lowest kept score) and the rest, scored by
    the same models and windows as the train split (in process: a ScoreWorker without Ray, reading its one
    slice from a file as the select workers do)."""
    import tempfile

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        source = str(Path(tmp, "heldout.jsonl"))
        storage.atomic_write_bytes(source, corpus_bytes([{"id": d.id, "text": d.text, "score": None}
                                                         for d in documents], "jsonl"))
        corpus = CorpusConfig(source=source, split="all")
        (piece,) = plan_slices(corpus, unit_bytes=1 << 40)
        worker = ScoreWorker(ScoreSettings(teacher=select.teacher, reference=select.reference, corpus=corpus,
                                           max_length=select.max_length, batch_tokens=select.batch_tokens))
        worker.run_unit(tmp, unplanned_unit(0), piece)
        table = ranked_scores(pq.read_table(Path(tmp, unit_scores_relpath(0))), 1.0)
        score_of = dict(zip(table.column("doc_id").to_pylist(), table.column("score").to_pylist(), strict=True))
    keep = [not math.isnan(score_of.get(d.id, math.nan)) and score_of[d.id] >= cut for d in documents]
    return ([d for d, k in zip(documents, keep, strict=True) if k],
            [d for d, k in zip(documents, keep, strict=True) if not k])


def write_if_changed(path: str, data: bytes) -> None:
    """Write a corpus file only when its bytes change: a rewrite would change its identity (size, mtime), and
    the cached scores and finished students that planned from it would be redone."""
    if not (storage.exists(path) and storage.read_bytes(path) == data):
        storage.atomic_write_bytes(path, data)


def noise_share(ids: list[str], noise_of: dict[str, str | None], tokens_of: dict[str, int]) -> dict:
    """How much of a corpus (document ids) is noise: by documents, by tokens, and documents per kind."""
    kinds = [noise_of.get(i) for i in ids]
    noisy_tokens = sum(tokens_of.get(i, 0) for i, k in zip(ids, kinds, strict=True) if k)
    total = sum(tokens_of.get(i, 0) for i in ids)
    return {"documents": round(sum(k is not None for k in kinds) / max(1, len(ids)), 4),
            "tokens": round(noisy_tokens / max(1, total), 4),
            "by_kind": {kind: sum(k == kind for k in kinds) for kind in NOISE_KINDS}}


def student_spec(size: str) -> tuple[dict, str]:
    """(the TrainConfig student, its short name): a named size, or a JSON student whose "name" labels it."""
    if not size.lstrip().startswith("{"):
        return {"size": size}, size
    spec = json.loads(size)
    name = spec.pop("name", None) or f"{spec.get('family', 'llama')}-h{spec['hidden']}-l{spec['layers']}"
    return spec, name


def corpus_tokens(url: str, tokenizer: str) -> int:
    """How many tokens the students read from a corpus: its documents in their tokenizer (no special tokens, as
    the corpus reader encodes them)."""
    tok = load_tokenizer(tokenizer)
    documents = read_documents(CorpusConfig(source=url, split="all"))
    return sum(len(tok(d.text, add_special_tokens=False)["input_ids"]) for d in documents)


def student_tokenizer(kind: str, teacher: str, texts: list[str], out: Path) -> str:
    if kind == "teacher":
        return teacher
    path = out / "student-tokenizer"
    if not (path / "tokenizer.json").exists():
        train_tokenizer(texts, vocab_size=OWN_TOKENIZER_VOCAB).save_pretrained(path)
    return str(path)


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    demo = DemoConfig()
    train_docs = read_documents(CorpusConfig(split="train"))  # what the demo teacher learns from, always
    if args.student_tokenizer is None:
        args.student_tokenizer = "own" if args.teacher else "teacher"
    # --disjoint: teacher and reference learn from one half of the train split, the selection scores the other
    # half (as MiniPLM's teacher scores a corpus it was not trained on); otherwise all of it, as the demo does
    models_docs = [d for d in train_docs if int(d.id, 16) % 2 == 0] if args.disjoint else train_docs
    documents = [d for d in train_docs if int(d.id, 16) % 2 == 1] if args.disjoint else train_docs
    documents = documents[: args.max_documents]  # the pool the selection scores (the demo's cap picks the first)
    texts = [d.text for d in models_docs]
    # the demo's teacher and reference are reused at the demo's settings; other settings get models of their own
    tag = ("" if args.teacher_steps == demo.teacher_steps or args.teacher else f"-t{args.teacher_steps}") + (
        "-disjoint" if args.disjoint else "")
    if args.teacher:
        teacher, teacher_label = prepare_teacher(args, workdir)
        tag = f"-{teacher_label}{tag}"
        teacher_home = workdir / f"bench-select-models{tag}"
    else:
        teacher_home = workdir / f"bench-teacher{tag}" if tag else workdir
        teacher = ensure_demo_teacher(str(teacher_home), texts, steps=args.teacher_steps, log=print)
    tag += f"-docs{args.max_documents}" if args.max_documents else ""  # the pool's, not the teacher's
    train_overrides = dict(parse_override(item) for item in args.train)
    student, size_name = student_spec(args.size)
    budget = f"e{args.epochs:g}" if args.epochs is not None else str(args.steps)
    label = (f"f{args.fraction:g}-r{args.reference_steps}-{size_name}{budget}{tag}"
             + "".join(f"-{k}{v}" for k, v in train_overrides.items())
             + ("-own-tokenizer" if args.student_tokenizer == "own" else "")
             + (f"-noisy{args.noise_fraction:g}" if args.noisy else "")
             + (f"-rep{args.max_repeated_lines:g}" if args.max_repeated_lines is not None else ""))
    out = (Path(args.output) if args.output else workdir / f"bench-select-{label}").resolve()
    noise_of: dict[str, str | None] = {}
    if args.noisy:  # the pool is the clean documents and their noise; the reference learns from all of it
        rows = noisy_mixture([d.text for d in documents], args.noise_fraction, seed=0)
        noise_of = {r["id"]: r["noise"] for r in rows}
        documents = [Document(r["id"], r["text"]) for r in rows]
        texts = [d.text for d in documents]
        tag += f"-noisy{args.noise_fraction:g}"
    demo_reference = args.reference_steps == demo.reference_steps and not args.noisy and not args.teacher
    home = teacher_home if demo_reference else teacher_home / f"bench-reference-{args.reference_steps}{tag}"
    reference = ensure_demo_reference(str(home), teacher, texts, steps=args.reference_steps, log=print)
    corpus = CorpusConfig(split="train")
    if args.disjoint or args.noisy or args.max_documents:
        # named by the pool alone, as its scores are: students of other settings reuse both
        pool = workdir / f"bench-select-pool{tag}.jsonl"
        write_if_changed(str(pool), corpus_bytes(
            [{"id": d.id, "text": d.text, "score": None} for d in documents], "jsonl"))
        corpus = CorpusConfig(source=str(pool), split="all")
    select = SelectConfig(teacher=teacher, reference=reference,
                          output=str(workdir / f"bench-select-scores-r{args.reference_steps}{tag}"),
                          corpus=corpus, fraction=args.fraction, refined=str(out / "refined"),
                          max_repeated_lines=args.max_repeated_lines,
                          num_actors=2, unit_bytes=192 << 10)
    report = run_select(select, progress=False)

    import pyarrow.parquet as pq

    scores = pq.read_table(storage.join(select.output, SCORES_NAME))
    tokens_of = dict(zip(scores.column("doc_id").to_pylist(), scores.column("tokens").to_pylist(), strict=True))
    baseline = random_subset(documents, tokens_of, report["kept_tokens"])
    write_if_changed(str(out / "random.jsonl"), corpus_bytes(
        [{"id": d.id, "text": d.text, "score": None} for d in baseline], "jsonl"))
    tokenizer = student_tokenizer(args.student_tokenizer, teacher, [d.text for d in train_docs], out)
    arms = {"refined": str(out / "refined"), "random": str(out / "random.jsonl")}  # a folder of parts, a file
    refined_ids = [d.id for d in read_documents(CorpusConfig(source=arms["refined"], split="all"))]
    noise = {"refined": noise_share(refined_ids, noise_of, tokens_of), "random": noise_share(
        [d.id for d in baseline], noise_of, tokens_of), "pool": noise_share(list(tokens_of), noise_of, tokens_of)} \
        if args.noisy else None

    student_tokens = {arm: corpus_tokens(url, tokenizer) for arm, url in arms.items()}
    steps = args.steps
    if args.epochs is not None:
        steps = steps_for_epochs(args.epochs, student_tokens["refined"], {**student_settings(1), **train_overrides})
    heldout = read_documents(CorpusConfig(split="heldout"))
    high, low = split_by_score(heldout, select, report["kept_score_min"])
    seeds = [int(s) for s in args.seeds.split(",")]
    losses: dict[str, list[float]] = {"refined": [], "random": []}
    by_part: dict[str, list[float]] = {f"{arm}_{part}": [] for arm in losses for part in ("high", "low")}
    for arm in losses:
        for seed in seeds:
            cfg = TrainConfig(corpus=CorpusConfig(source=arms[arm], split="all"), tokenizer=tokenizer,
                              output=str(out / "runs" / f"{size_name}-{arm}-s{seed}"), loss="ce", seed=seed,
                              student=student, **{**student_settings(steps, alpha=0.0), **train_overrides})
            summary = finished_summary(cfg) or run_training(cfg)
            model = storage.join(cfg.output, "model")
            loss = evaluate_model(model, heldout)["loss"]
            losses[arm].append(loss)
            for part, docs in (("high", high), ("low", low)):
                by_part[f"{arm}_{part}"].append(evaluate_model(model, docs)["loss"] if docs else float("nan"))
            print(f"{arm:8s} seed {seed}: held-out loss {loss:.4f} ({summary['tokens']:,} training tokens)")

    def mean(xs: list[float]) -> float:
        return round(statistics.fmean(xs), 4)

    spread = max(max(v) - min(v) for v in losses.values()) if len(seeds) > 1 else None
    result = {
        "refined_loss": mean(losses["refined"]), "random_loss": mean(losses["random"]),
        "refined_per_seed": [round(x, 4) for x in losses["refined"]],
        "random_per_seed": [round(x, 4) for x in losses["random"]],
        "seed_spread": None if spread is None else round(spread, 4),
        "refined_beats_random_by_more_than_seed_spread": (
            None if spread is None else mean(losses["random"]) - mean(losses["refined"]) > spread),
        "kept_fraction": report["kept_fraction"], "kept_documents": report["kept_documents"],
        "max_repeated_lines": args.max_repeated_lines, "repetitive_documents": report["repetitive_documents"],
        "kept_tokens": report["kept_tokens"], "corpus_documents": report["documents"],
        "corpus_tokens": report["tokens"], "random_documents": len(baseline),
        "random_tokens": sum(tokens_of[d.id] for d in baseline),
        "score_mean": report["score_mean"], "kept_score_min": report["kept_score_min"],
        "student_size": size_name, "steps": steps, "epochs": args.epochs,
        "student_tokens": student_tokens, "train_overrides": train_overrides, "seeds": seeds, "student_tokenizer": args.student_tokenizer,
        "student_vocab_size": len(load_tokenizer(tokenizer)), "reference_steps": args.reference_steps,
        "teacher_steps": args.teacher_steps, "disjoint": args.disjoint, "teacher_heldout_loss": round(evaluate_model(teacher, heldout)["loss"], 4),
        "heldout_documents": len(heldout), "heldout_high_score_documents": len(high),
        "teacher": teacher, "noisy": args.noisy, "noise_fraction": args.noise_fraction if args.noisy else None,
        "noise_share": noise,
        **{f"{key.split('_')[0]}_loss_{key.split('_')[1]}_score_heldout": mean(v) for key, v in by_part.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"refined {result['refined_loss']:.4f} vs random {result['random_loss']:.4f} "
          f"(seed spread {result['seed_spread']}); kept {result['kept_fraction']:.0%} of the documents")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
