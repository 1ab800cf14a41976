"""Capture under real faults, and what a capture reports.

A teacher actor process and the driver's whole process group are killed with SIGKILL in the
middle of a capture; each interrupted capture must end as a sound shard set whose shards have
the same bytes as an uninterrupted capture of the same corpus and settings (capture is
deterministic on CPU). Also: a corpus read from S3 (a moto server on 127.0.0.1) with bad,
duplicate and oversize records counted in the manifest, and the pure pieces behind the stats.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import yaml
from support import capture_config, moto_s3, teacher_processes, wait_for, write_jsonl_corpus

from raydistill.config import CaptureConfig, CorpusConfig
from raydistill.contracts.shards.manifest import read_manifest
from raydistill.contracts.shards.verify import verify_shard_set
from raydistill.io import storage
from raydistill.io.corpus import read_documents
from raydistill.stages.capture.run import run_capture

FAULT_DOCS, DOCS_PER_UNIT = 40, 2
UNITS = FAULT_DOCS // DOCS_PER_UNIT


def settings(teacher: str, corpus: str, output: str) -> dict:
    return dict(teacher=teacher, output=output, corpus={"source": corpus, "split": "all"}, k=16, max_length=64,
                docs_per_unit=DOCS_PER_UNIT, num_actors=2, batch_tokens=512)


def done_records(out: str) -> int:
    done = os.path.join(out, "done")
    if not os.path.isdir(done):
        return 0
    return sum(1 for n in os.listdir(done) if n.endswith(".json") and ".tmp-" not in n)


def shard_mtimes(out: Path, units: list[str]) -> dict[str, int]:
    return {u: os.stat(out / "shards" / f"{u}.parquet").st_mtime_ns for u in units}


def unit_hashes(out: str) -> dict[int, str]:
    return {s.unit: s.sha256 for s in read_manifest(out).shards}


def assert_complete_and_equal(out: str, reference: str) -> None:
    """Sound, every planned unit exactly once, nothing left over, same bytes as the reference."""
    assert verify_shard_set(out) == []
    planned = [u["unit"] for u in json.loads(Path(out, "plan.json").read_text())["units"]]
    assert planned == list(range(UNITS))
    assert [s.unit for s in read_manifest(out).shards] == planned
    names = {f"unit-{u:06d}" for u in planned}
    assert {n.removesuffix(".parquet") for n in os.listdir(os.path.join(out, "shards"))} == names
    assert {n.removesuffix(".json") for n in os.listdir(os.path.join(out, "done"))} == names
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".tmp-" in f]
    assert leftovers == []
    assert unit_hashes(out) == unit_hashes(reference)


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory) -> str:
    """40 real documents of varied length (some span several 64-token windows): 20 units of 2."""
    path = tmp_path_factory.mktemp("fault-corpus") / "docs.jsonl"
    return write_jsonl_corpus(path, FAULT_DOCS, base_chars=150, step_chars=40)


@pytest.fixture(scope="module")
def reference(tiny_teacher, fault_corpus, ray_session, tmp_path_factory) -> str:
    """The uninterrupted capture every faulted one must reproduce byte for byte."""
    out = str(tmp_path_factory.mktemp("reference") / "set")
    manifest = run_capture(CaptureConfig(**settings(tiny_teacher, fault_corpus, out)), progress=False)
    assert manifest.stats["units_this_run"] == UNITS and verify_shard_set(out) == []
    return out


def test_actor_killed_mid_run_is_restarted_and_its_units_redone(tiny_teacher, fault_corpus, reference, tmp_path):
    out = str(tmp_path / "set")
    already_there = {p.pid for p in teacher_processes()}
    finished = threading.Event()
    seen: dict = {}

    def kill_one_teacher_after_the_first_unit() -> None:
        wait_for(lambda: done_records(out) >= 1 or finished.is_set(), 120, "the first completion record")
        actors = [p for p in teacher_processes() if p.pid not in already_there]
        if finished.is_set() or not actors:
            return
        victim = actors[0]
        victim.kill()
        seen.update(pid=victim.pid, done_at_kill=done_records(out))
        # Ray starts a replacement process for the killed actor, which then redoes its calls
        known = already_there | {p.pid for p in actors}
        try:
            wait_for(lambda: any(p.pid not in known for p in teacher_processes()) or finished.is_set(), 60,
                     "the restarted actor")
            seen["restarted"] = any(p.pid not in known for p in teacher_processes())
        except TimeoutError:
            seen["restarted"] = False

    killer = threading.Thread(target=kill_one_teacher_after_the_first_unit, daemon=True)
    killer.start()
    try:
        manifest = run_capture(CaptureConfig(**settings(tiny_teacher, fault_corpus, out)), progress=False)
    finally:
        finished.set()
        killer.join(timeout=10)
    assert "pid" in seen, "no TeacherWorker process was killed"
    assert 1 <= seen["done_at_kill"] < UNITS, f"not killed mid-run: {seen['done_at_kill']} of {UNITS} units done"
    assert not psutil.pid_exists(seen["pid"]) or psutil.Process(seen["pid"]).status() == psutil.STATUS_ZOMBIE
    assert seen["restarted"], "no replacement actor process was seen"
    assert_complete_and_equal(out, reference)
    stats = manifest.stats
    assert stats["units_this_run"] == UNITS and stats["num_actors"] == 2
    assert stats["actor.0.units"] + stats["actor.1.units"] == UNITS
    assert stats["actor.0.tokens"] + stats["actor.1.tokens"] == stats["tokens_this_run"] == stats["tokens"]


def test_driver_killed_mid_run_is_finished_by_the_same_command(tiny_teacher, fault_corpus, reference, tmp_path):
    out = tmp_path / "set"
    config = tmp_path / "capture.yaml"
    config.write_text(yaml.safe_dump(settings(tiny_teacher, fault_corpus, str(out))))
    # `--address local`: its own one-node Ray even if a `ray start` cluster runs on this machine
    cmd = [sys.executable, "-m", "raydistill", "precompute", str(config), "--address", "local"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    family: list[psutil.Process] = []
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: done_records(str(out)) >= 1 or driver.poll() is not None, 120, "the first unit")
            with contextlib.suppress(psutil.NoSuchProcess):
                family = psutil.Process(driver.pid).children(recursive=True)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and its actors
            driver.wait()
    for p in psutil.wait_procs(family, timeout=10)[1]:  # anything that left the group dies too
        p.kill()
    done_at_kill = done_records(str(out))
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    assert 1 <= done_at_kill < UNITS, f"not killed mid-run: {done_at_kill} of {UNITS} units done"
    assert not (out / "manifest.json").exists()
    first_mtimes = shard_mtimes(out, [p.stem for p in (out / "done").glob("unit-*.json")])
    # what a writer killed between its write and its rename leaves behind; the rerun removes it
    (out / "shards" / "unit-000019.parquet.tmp-0123456789ab").write_bytes(b"half a shard")
    (out / "done" / "unit-000019.json.tmp-0123456789ab").write_bytes(b"{")

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["units"] == UNITS
    assert "tokens/s" in rerun.stderr and "skipped documents: 0" in rerun.stderr  # the summary for a person
    stats = read_manifest(str(out)).stats
    assert stats["units_already_done"] == done_at_kill and stats["units_this_run"] == UNITS - done_at_kill
    assert stats["stale_temporaries_removed"] >= 2
    # units finished before the kill were left alone
    assert shard_mtimes(out, list(first_mtimes)) == first_mtimes
    assert_complete_and_equal(str(out), reference)


@pytest.fixture
def s3_env():
    with moto_s3():
        yield


def test_capture_reads_a_jsonl_corpus_on_s3_and_counts_what_it_skips(s3_env, tiny_teacher, tiny_corpus,
                                                                     ray_session, tmp_path):
    from raydistill.models.tokenizers import load_tokenizer

    texts = [json.loads(line)["text"] for line in open(tiny_corpus)][:8]
    tokenizer = load_tokenizer(tiny_teacher)
    limit = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    too_long = " ".join(texts)  # more tokens than any single document
    records = [json.dumps({"text": t}) for t in texts[:4]] + [
        json.dumps({"text": ""}), json.dumps({"text": "  \n "}), json.dumps({"text": texts[0]}),
        json.dumps({"text": 42}), '{"text": "broken', json.dumps({"text": too_long}),
    ]
    storage.makedirs("s3://rd-capture")
    storage.atomic_write_text("s3://rd-capture/corpus/part-0.jsonl", "\n".join(records) + "\n")
    storage.atomic_write_text("s3://rd-capture/corpus/part-1.jsonl",
                              "\n".join(json.dumps({"text": t}) for t in texts[4:]) + "\n")
    out = str(tmp_path / "set")
    cfg = capture_config(tiny_teacher, "s3://rd-capture/corpus/*.jsonl", out, docs_per_unit=3,
                         num_actors=1, max_document_tokens=limit)
    manifest = run_capture(cfg, progress=False)

    assert manifest.plan.corpus.startswith("s3://rd-capture/corpus/")
    assert verify_shard_set(out) == []
    stats = manifest.stats
    assert stats["documents"] == 8 and stats["units"] == 3
    assert {r: stats[f"skipped_documents.{r}"] for r in ("empty", "undecodable", "duplicate", "oversize")} == {
        "empty": 2, "undecodable": 2, "duplicate": 1, "oversize": 1}
    assert stats["skipped_documents"] == 6
    from raydistill.contracts.shards.reader import ShardSet

    shard_set = ShardSet(out)
    stored = {doc_id for i in range(len(manifest.shards)) for doc_id in shard_set.read_shard(i).doc_ids}
    assert stored == {d.id for d in read_documents(CorpusConfig(source=tiny_corpus, split="all", max_documents=8))}


# --- the pure pieces: actor count, busy time, stats, summary, skip counts ------------------------










