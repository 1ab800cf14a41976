"""``raydistill select`` (MiniPLM difference sampling): scores against slow references, the ranking's
rules, the refined corpus and report, resume, a killed actor, S3, and capture of the selection only."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support import capture_config, moto_s3, teacher_processes, wait_for, write_jsonl_corpus

from raydistill.config import CorpusConfig, SelectConfig
from raydistill.contracts.selection import SCORES_NAME, selected_documents
from raydistill.contracts.shards.reader import ShardSet
from raydistill.errors import ConfigError, PlanMismatchError
from raydistill.io import storage
from raydistill.io.corpus import read_documents
from raydistill.models.loading import load_causal_lm
from raydistill.models.sizes import build_llama
from raydistill.models.tokenizers import load_tokenizer, train_tokenizer
from raydistill.models.windows import cut_windows
from raydistill.stages.capture.run import run_capture
from raydistill.stages.select.repetition import repeated_line_chars
from raydistill.stages.select.run import run_select

DOCS, UNIT_BYTES, MAX_LENGTH = 30, 1900, 48  # every line is shorter than a unit: 10 units of 1-5 documents
UNITS = 10


def save_model(tokenizer, out: Path, *, hidden: int, layers: int, seed: int) -> str:
    model = build_llama(vocab_size=len(tokenizer), hidden=hidden, layers=layers, heads=2, max_positions=256, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = write_jsonl_corpus(tmp_path_factory.mktemp("select-corpus") / "docs.jsonl", DOCS, base_chars=40,
                              step_chars=50)
    assert -(-os.path.getsize(path) // UNIT_BYTES) == UNITS and max(map(len, open(path, "rb"))) < UNIT_BYTES
    return path


@pytest.fixture(scope="module")
def reference_model(tiny_teacher, tmp_path_factory) -> str:
    """A smaller random model with the teacher's tokenizer."""
    return save_model(load_tokenizer(tiny_teacher), tmp_path_factory.mktemp("reference"), hidden=16, layers=1, seed=7)


def select_config(teacher: str, reference: str, corpus: str, output: str, **overrides) -> SelectConfig:
    settings = dict(teacher=teacher, reference=reference, output=output, corpus={"source": corpus, "split": "all"},
                    max_length=MAX_LENGTH, unit_bytes=UNIT_BYTES, num_actors=2, batch_tokens=256, fraction=0.4)
    settings.update(overrides)
    return SelectConfig(**settings)


@pytest.fixture(scope="module")
def selected(tiny_teacher, reference_model, corpus, ray_session, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("select") / "out")
    return out, run_select(select_config(tiny_teacher, reference_model, corpus, out), progress=False)


def read_parquet(url: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(url)))


def slow_document_loss(model, tokenizer, text: str) -> tuple[int, float]:
    """Predicted tokens and summed −log p of one document, window by window, one position at a time."""
    tokens, total = 0, 0.0
    for window in cut_windows(tokenizer(text, add_special_tokens=False)["input_ids"], MAX_LENGTH):
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0].double()
        for t in range(len(window) - 1):
            total -= float(torch.log_softmax(logits[t], dim=-1)[window[t + 1]])
            tokens += 1
    return tokens, total






def test_scores_match_a_slow_reference_and_the_outputs_agree(selected, tiny_teacher, reference_model, corpus):
    out, report = selected
    docs = read_documents(CorpusConfig(source=corpus, split="all"))
    table = read_parquet(os.path.join(out, SCORES_NAME))
    assert table.column("doc_id").to_pylist() == [d.id for d in docs]  # corpus order, every document
    tokenizer = load_tokenizer(tiny_teacher)
    models = [load_causal_lm(p).eval() for p in (tiny_teacher, reference_model)]
    for i in (0, 7, DOCS - 1):  # short, middle and the longest (several windows) documents
        for model, column in zip(models, ("teacher_loss", "reference_loss"), strict=True):
            tokens, loss = slow_document_loss(model, tokenizer, docs[i].text)
            assert table.column("tokens")[i].as_py() == tokens
            assert table.column(column)[i].as_py() == pytest.approx(loss, rel=1e-5)
    assert table.column("repeated_line_chars").to_pylist() == [repeated_line_chars(d.text) for d in docs]
    assert not any(table.column("repetitive").to_pylist())  # max_repeated_lines is off by default

    kept = table.column("kept").to_pylist()
    assert report["documents"] == DOCS and report["kept_documents"] == sum(kept) == round(0.4 * DOCS)
    assert report["kept_fraction"] == pytest.approx(sum(kept) / DOCS)
    tokens = table.column("tokens").to_numpy()
    assert report["kept_tokens"] == int(tokens[np.array(kept)].sum()) and report["tokens"] == int(tokens.sum())
    parts = sorted(Path(report["refined"]).iterdir())  # one part per unit, written by the workers
    assert [p.name for p in parts] == [f"part-{u:06d}.jsonl" for u in range(UNITS)]
    refined = [json.loads(line) for part in parts for line in part.read_text().splitlines()]
    assert [(r["id"], r["text"]) for r in refined] == [(d.id, d.text) for d, k in zip(docs, kept, strict=True) if k]
    scores = table.column("score").to_pylist()
    best = sorted(range(DOCS), key=lambda i: (-scores[i], docs[i].id))
    assert [h["id"] for h in report["highest"]] == [docs[i].id for i in best[:10]]
    assert [h["id"] for h in report["lowest"]] == [docs[i].id for i in best[::-1][:10]]
    assert min(s for s, k in zip(scores, kept, strict=True) if k) >= max(s for s, k in zip(scores, kept, strict=True)
                                                                        if not k)
    assert Path(report["histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(out, "report.json").read_text())["kept_tokens"] == report["kept_tokens"]
    assert "kept 12 of 30 documents" in Path(out, "report.md").read_text()


def test_rerun_scores_nothing_and_a_new_fraction_only_reranks(selected, tiny_teacher, reference_model, corpus):
    out = selected[0]
    before = Path(out, SCORES_NAME).read_bytes()
    again = run_select(select_config(tiny_teacher, reference_model, corpus, out), progress=False)
    assert again["units_this_run"] == 0 and Path(out, SCORES_NAME).read_bytes() == before
    wider = run_select(select_config(tiny_teacher, reference_model, corpus, out, fraction=0.8), progress=False)
    assert wider["units_this_run"] == 0 and wider["kept_documents"] == 24
    table = read_parquet(os.path.join(out, SCORES_NAME))
    assert table.column("score").to_pylist() == pq.read_table(io.BytesIO(before)).column("score").to_pylist()
    docs = read_documents(CorpusConfig(source=corpus, split="all"))
    shares = [repeated_line_chars(d.text) for d in docs]
    assert any(s > 0 for s in shares)  # a code example repeats a line: max_repeated_lines=0 drops it
    filtered = run_select(select_config(tiny_teacher, reference_model, corpus, out, max_repeated_lines=0.0,
                                        fraction=1.0), progress=False)
    kept = read_parquet(os.path.join(out, SCORES_NAME)).column("kept").to_pylist()
    assert filtered["units_this_run"] == 0 and filtered["repetitive_documents"] == sum(s > 0 for s in shares)
    assert kept == [s == 0 for s in shares]  # every other document, as fraction 1.0 asks
    assert "dropped before ranking" in Path(out, "report.md").read_text()
    run_select(select_config(tiny_teacher, reference_model, corpus, out), progress=False)  # leave it as it was
    other = save_model(load_tokenizer(tiny_teacher), Path(out).parent / "other-ref", hidden=16, layers=1, seed=8)
    with pytest.raises(PlanMismatchError):
        run_select(select_config(tiny_teacher, other, corpus, out), progress=False)


def test_a_killed_actor_is_restarted_and_the_scores_are_the_same(selected, tiny_teacher, reference_model, corpus,
                                                                  tmp_path):
    out = str(tmp_path / "out")
    scores_dir = os.path.join(out, "scores")

    def files() -> int:
        return len([n for n in os.listdir(scores_dir) if ".tmp-" not in n]) if os.path.isdir(scores_dir) else 0

    already = {p.pid for p in teacher_processes("ScoreWorker")}
    finished, seen = threading.Event(), {}

    def kill_one() -> None:
        wait_for(lambda: files() >= 1 or finished.is_set(), 120, "the first scored unit")
        victims = [p for p in teacher_processes("ScoreWorker") if p.pid not in already]
        if victims and not finished.is_set():
            victims[0].kill()
            seen.update(pid=victims[0].pid, at=files())

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    try:
        report = run_select(select_config(tiny_teacher, reference_model, corpus, out), progress=False)
    finally:
        finished.set()
        killer.join(timeout=10)
    assert "pid" in seen and seen["at"] < UNITS, f"not killed mid-run: {seen}"
    assert report["units_this_run"] == UNITS
    want = read_parquet(os.path.join(selected[0], SCORES_NAME)).drop_columns(["kept", "rank"])
    got = read_parquet(os.path.join(out, SCORES_NAME)).drop_columns(["kept", "rank"])
    assert got.equals(want)
    assert [f for f in os.listdir(scores_dir) if ".tmp-" in f] == []


def test_a_reference_with_another_tokenizer_is_refused_naming_both(tiny_teacher, corpus, tmp_path):
    texts = [json.loads(line)["text"] for line in open(corpus)]
    other = save_model(train_tokenizer(texts * 4, vocab_size=300), tmp_path / "ref", hidden=16, layers=1, seed=0)
    with pytest.raises(ConfigError, match="tokenize differently") as err:
        run_select(select_config(tiny_teacher, other, corpus, str(tmp_path / "out")), progress=False)
    assert tiny_teacher in str(err.value) and other in str(err.value)


def test_refined_parquet_on_s3_reads_back_as_a_corpus(tiny_teacher, reference_model, corpus, ray_session, tmp_path):
    """The actors write the scores locally; the refine tasks write the refined corpus's parts to S3."""
    with moto_s3():
        storage.makedirs("s3://rd-select")
        cfg = select_config(tiny_teacher, reference_model, corpus, str(tmp_path / "out"), num_actors=1, fraction=0.5,
                            refined_format="parquet", refined="s3://rd-select/refined")
        report = run_select(cfg, progress=False)
        assert report["refined"] == "s3://rd-select/refined"
        refined = read_documents(CorpusConfig(source="s3://rd-select/refined/*.parquet", split="all"))
    table = read_parquet(str(tmp_path / "out" / SCORES_NAME))
    kept = {i for i, k in zip(table.column("doc_id").to_pylist(), table.column("kept").to_pylist(), strict=True) if k}
    assert {d.id for d in refined} == kept and len(kept) == DOCS // 2


def test_capture_of_the_selected_documents_only(selected, tiny_teacher, corpus, ray_session, tmp_path):
    out, report = selected
    cfg = capture_config(tiny_teacher, corpus, str(tmp_path / "set"))
    cfg.corpus = CorpusConfig(source=corpus, split="all", selection=out)
    manifest = run_capture(cfg, progress=False)
    shard_set = ShardSet(str(tmp_path / "set"))
    stored = [doc_id for i in range(len(shard_set)) for doc_id in dict.fromkeys(shard_set.read_shard(i).doc_ids)]
    assert stored == [d.id for d in read_documents(CorpusConfig(source=report["refined"], split="all"))]
    assert manifest.stats["documents"] == report["kept_documents"]
    assert f"selected by {out}" in manifest.plan.corpus

    other = write_jsonl_corpus(tmp_path / "other.jsonl", DOCS + 5, base_chars=40, step_chars=50)
    with pytest.raises(ConfigError, match="were not scored by the selection"):
        selected_documents(CorpusConfig(source=other, split="all", selection=out))
    with pytest.raises(ConfigError, match="run `raydistill select`"):
        selected_documents(CorpusConfig(source=corpus, split="all", selection=str(tmp_path / "nowhere")))


