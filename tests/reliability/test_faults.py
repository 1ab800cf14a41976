"""Faults injected into real runs, each followed by the normal rerun and a count of what survived.

Every case runs a real capture (or training run), injects one fault, checks what is visible right
after it (no file under its final name is partial: :func:`support.chaos.torn_files`), reruns the
same command as a user would, and compares the result with an uninterrupted run of the same corpus,
teacher and settings: every unit and token present exactly once, every shard byte-identical to the
reference's, ``raydistill verify`` clean. Each case records its figures (``chaos_record``, kind
``fault``) before its asserts, for ``tools/chaos.py``.

Capture faults: a teacher actor killed mid-unit; the capture driver killed (SIGKILL, whole process
group); a write that fails part-way, on the actors (a shard, a completion record) or on the driver
(the manifest), through ``faulty://`` (``support.faults``: a local filesystem that fails the Nth
matching write after N bytes, registered in every Ray worker by a ``worker_process_setup_hook``);
a real full disk (a 2-MiB-scale tmpfs, root only); a completion record whose shard is gone; shards
without their records; the object store under memory pressure. Training faults: a Ray Train worker
killed, and the training driver killed, after the first checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import yaml
from support import teacher_processes, wait_for, write_jsonl_corpus
from support.chaos import compare_capture, compare_training, read_metrics, torn_files
from support.faults import FAULTS_ENV, PROTOCOL, arm, fired

from raydistill.config import CaptureConfig, TrainConfig
from raydistill.contracts.shards.manifest import read_manifest
from raydistill.contracts.shards.verify import verify_shard_set
from raydistill.contracts.students import METRICS_FIELDS
from raydistill.errors import RaydistillError
from raydistill.stages.capture.run import run_capture
from raydistill.stages.train.run import run_training

pytestmark = pytest.mark.slow

FAULT_DOCS, UNIT_BYTES = 40, 1800  # every line is shorter than a unit, so each unit holds 1-3 documents
UNITS = 0  # set by fault_corpus: the plan's unit count for that file
TESTS_DIR = Path(__file__).resolve().parents[1]  # tests/: support.faults must import in the faulted driver
RUN_TIMEOUT_S = 1200  # a hang guard for one capture subprocess on a loaded machine, not a pace
EVENT_TIMEOUT_S = 600  # the longest any wait for an event (a record, a checkpoint, a process) may take


def settings(teacher: str, corpus: str, output: str) -> dict:
    return dict(teacher=teacher, output=output, corpus={"source": corpus, "split": "all"}, k=16, max_length=64,
                unit_bytes=UNIT_BYTES, num_actors=2, batch_tokens=512)


def done_records(out: str | Path) -> int:
    done = Path(out) / "done"
    return sum(1 for n in os.listdir(done) if n.endswith(".json") and ".tmp-" not in n) if done.is_dir() else 0


def shard_mtimes(out: Path, units: list[str]) -> dict[str, int]:
    return {u: os.stat(out / "shards" / f"{u}.parquet").st_mtime_ns for u in units}


def write_capture_config(path: Path, teacher: str, corpus: str, output: str) -> Path:
    path.write_text(yaml.safe_dump(settings(teacher, corpus, output)))
    return path


def rerun(teacher: str, corpus: str, out: Path):
    """The normal rerun: the same capture, on the plain local path, in this process's Ray."""
    return run_capture(CaptureConfig(**settings(teacher, corpus, str(out))), progress=False)


def one_error_line(stderr: str) -> str | None:
    """The CLI's one ``error:`` line, if that is all it printed about the failure (no traceback)."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    return lines[0] if len(lines) == 1 and "Traceback" not in stderr else None


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory) -> str:
    """40 real documents of varied length (some span several 64-token windows): about 19 units."""
    global UNITS
    path = write_jsonl_corpus(tmp_path_factory.mktemp("fault-corpus") / "docs.jsonl", FAULT_DOCS, base_chars=150,
                              step_chars=40)
    UNITS = -(-os.path.getsize(path) // UNIT_BYTES)
    assert UNITS >= 10 and max(map(len, open(path, "rb"))) < UNIT_BYTES
    return path


@pytest.fixture(scope="module")
def reference(tiny_teacher, fault_corpus, ray_session, tmp_path_factory) -> str:
    """The uninterrupted capture every faulted one must reproduce byte for byte."""
    out = str(tmp_path_factory.mktemp("reference") / "set")
    manifest = run_capture(CaptureConfig(**settings(tiny_teacher, fault_corpus, out)), progress=False)
    assert manifest.stats["units_this_run"] == UNITS and verify_shard_set(out) == []
    return out


def faulted_capture(config: Path, *args: str, faults: str | None = None) -> subprocess.CompletedProcess:
    """``raydistill capture CONFIG`` in a driver process of its own whose Ray workers know ``faulty://``
    (``python -m support.faults``), with the fault plan ``faults`` armed."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(TESTS_DIR), os.environ.get("PYTHONPATH")]))}
    env.pop(FAULTS_ENV, None)
    if faults:
        env[FAULTS_ENV] = faults
    return subprocess.run([sys.executable, "-m", "support.faults", str(config), *args], env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


# --- processes killed ---------------------------------------------------------------------------


def test_actor_killed_mid_unit_is_restarted_and_its_units_redone(tiny_teacher, fault_corpus, reference, tmp_path,
                                                                 chaos_record):
    out = str(tmp_path / "set")
    already_there = {p.pid for p in teacher_processes()}
    finished = threading.Event()
    seen: dict = {}

    def kill_one_teacher_after_the_first_unit() -> None:
        # the victim has two units in flight (CALLS_IN_FLIGHT_PER_ACTOR) when it dies: it dies mid-unit
        wait_for(lambda: done_records(out) >= 1 or finished.is_set(), EVENT_TIMEOUT_S, "the first completion record")
        actors = [p for p in teacher_processes() if p.pid not in already_there]
        if finished.is_set() or not actors:
            return
        victim = actors[0]
        victim.kill()
        seen.update(pid=victim.pid, done_at_kill=done_records(out))
        # Ray starts a replacement process for the killed actor, which then redoes its calls
        known = already_there | {p.pid for p in actors}
        try:
            wait_for(lambda: any(p.pid not in known for p in teacher_processes()) or finished.is_set(),
                     EVENT_TIMEOUT_S, "the restarted actor")
            seen["restarted"] = any(p.pid not in known for p in teacher_processes())
        except TimeoutError:
            seen["restarted"] = False

    killer = threading.Thread(target=kill_one_teacher_after_the_first_unit, daemon=True)
    killer.start()
    try:
        manifest = run_capture(CaptureConfig(**settings(tiny_teacher, fault_corpus, out)), progress=False)
    finally:
        finished.set()
        killer.join(timeout=EVENT_TIMEOUT_S)
    result = compare_capture(out, reference)
    mid_run = "pid" in seen and 1 <= seen["done_at_kill"] < UNITS
    chaos_record("fault", "actor-killed-mid-unit", ok=mid_run and seen.get("restarted", False) and result.intact,
                 **result.figures(), done_at_kill=seen.get("done_at_kill"))
    assert "pid" in seen, "no TeacherWorker process was killed"
    assert mid_run, f"not killed mid-run: {seen['done_at_kill']} of {UNITS} units done"
    assert not psutil.pid_exists(seen["pid"]) or psutil.Process(seen["pid"]).status() == psutil.STATUS_ZOMBIE
    assert seen["restarted"], "no replacement actor process was seen"
    assert result.intact, result
    stats = manifest.stats
    assert stats["units_this_run"] == UNITS and stats["num_actors"] == 2
    assert stats["actor.0.units"] + stats["actor.1.units"] == UNITS
    assert stats["actor.0.tokens"] + stats["actor.1.tokens"] == stats["tokens_this_run"] == stats["tokens"]


@pytest.mark.extended  # CI keeps the actor kill (same resume contract) and the unit test of stale temporaries
def test_capture_driver_killed_mid_run_is_finished_by_the_same_command(tiny_teacher, fault_corpus, reference,
                                                                       tmp_path, chaos_record):
    out = tmp_path / "set"
    config = write_capture_config(tmp_path / "capture.yaml", tiny_teacher, fault_corpus, str(out))
    # `--address local`: its own one-node Ray even if a `ray start` cluster runs on this machine
    cmd = [sys.executable, "-m", "raydistill", "precompute", str(config), "--address", "local"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    family: list[psutil.Process] = []
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: done_records(out) >= 1 or driver.poll() is not None, EVENT_TIMEOUT_S, "the first unit")
            with contextlib.suppress(psutil.NoSuchProcess):
                family = psutil.Process(driver.pid).children(recursive=True)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and its actors
            driver.wait()
    for p in psutil.wait_procs(family, timeout=30)[1]:  # anything that left the group dies too
        p.kill()
    done_at_kill = done_records(out)
    torn = torn_files(str(out), reference)  # what a reader could see between the kill and the rerun
    first_mtimes = shard_mtimes(out, [p.stem for p in (out / "done").glob("unit-*.json")])
    # what a writer killed between its write and its rename leaves behind; the rerun removes it
    (out / "shards" / "unit-000019.parquet.tmp-0123456789ab").write_bytes(b"half a shard")
    (out / "done" / "unit-000019.json.tmp-0123456789ab").write_bytes(b"{")

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    result = compare_capture(str(out), reference)
    killed_mid_run = driver.returncode == -signal.SIGKILL and 1 <= done_at_kill < UNITS
    chaos_record("fault", "capture-driver-killed", ok=killed_mid_run and not torn and again.returncode == 0
                 and result.intact, **result.figures(), torn_files=len(torn), done_at_kill=done_at_kill)
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    assert 1 <= done_at_kill < UNITS, f"not killed mid-run: {done_at_kill} of {UNITS} units done"
    assert torn == [], torn
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["units"] == UNITS
    assert "tokens/s" in again.stderr and "skipped documents: 0" in again.stderr  # the summary for a person
    stats = read_manifest(str(out)).stats
    assert stats["units_already_done"] == done_at_kill and stats["units_this_run"] == UNITS - done_at_kill
    assert stats["stale_temporaries_removed"] >= 2
    assert shard_mtimes(out, list(first_mtimes)) == first_mtimes  # units finished before the kill were left alone
    assert result.intact, result


# --- writes that fail part-way ------------------------------------------------------------------

WRITE_FAULTS = [
    pytest.param(dict(match="/shards/unit-", nth=3, after_bytes=0, errno="EIO"), "shard",
                 id="shard-write-fails-on-the-3rd-write", marks=pytest.mark.extended),
    pytest.param(dict(match="/shards/unit-", nth=2, after_bytes=1000, errno="EIO"), "shard",
                 id="shard-write-fails-after-1000-bytes", marks=pytest.mark.quick),
    pytest.param(dict(match="/done/unit-", nth=2, after_bytes=20, errno="EIO"), "record",
                 id="record-write-fails-after-20-bytes", marks=pytest.mark.extended),
    pytest.param(dict(match="/manifest.json", nth=1, after_bytes=100, errno="ENOSPC"), "manifest",
                 id="manifest-write-fails-disk-full", marks=pytest.mark.extended),
]


@pytest.mark.parametrize(("fault", "target"), WRITE_FAULTS)
def test_a_write_that_fails_part_way_is_never_visible_and_the_rerun_completes(
        fault, target, tiny_teacher, fault_corpus, reference, tmp_path, request, chaos_record):
    out = tmp_path / "set"
    config = write_capture_config(tmp_path / "capture.yaml", tiny_teacher, fault_corpus, f"{PROTOCOL}://{out}")
    plan = arm(str(tmp_path / "faults.json"), **fault)
    failed = faulted_capture(config, faults=plan)
    injected = fired(plan)
    torn = torn_files(str(out), reference)
    failed_unit = None
    if injected:
        name = Path(injected[0]["path"]).name
        failed_unit = int(name.split("-")[1].split(".")[0]) if name.startswith("unit-") else None
    done_at_failure = done_records(out)
    # the unit whose write failed is not done (a shard) / has its shard but no record (a record)
    failed_unit_done = failed_unit is not None and (out / "done" / f"unit-{failed_unit:06d}.json").exists()
    finished_anyway = (out / "manifest.json").exists()

    manifest = rerun(tiny_teacher, fault_corpus, out)
    result = compare_capture(str(out), reference)
    error = one_error_line(failed.stderr)
    stats = manifest.stats
    expected_redone = 0 if target == "manifest" else UNITS - done_at_failure
    survived = (len(injected) == 1 and failed.returncode != 0 and error is not None and not torn
                and not failed_unit_done and not finished_anyway and stats["units_this_run"] == expected_redone
                and result.intact)
    chaos_record("fault", request.node.callspec.id, ok=survived, **result.figures(), torn_files=len(torn),
                 done_at_failure=done_at_failure, one_error_line=error is not None)
    assert len(injected) == 1, (injected, failed.stderr[-3000:])
    assert injected[0]["written"] == fault["after_bytes"]  # it failed part-way, where it was told to
    assert failed.returncode != 0, failed.stdout[-2000:]
    assert error is not None, failed.stderr[-3000:]  # one `error:` line, wherever the write failed
    assert not finished_anyway  # a capture that failed has no manifest: it is unfinished, and says so
    assert torn == [], torn
    if target == "manifest":
        assert done_at_failure == UNITS  # every unit was done: the rerun only writes the manifest
    else:
        assert failed_unit is not None and not failed_unit_done
        assert error is not None and "failed" in error and os.strerror(5) in error, failed.stderr[-3000:]
    if target == "record":  # its shard landed whole before the record failed: a shard without a record
        assert (out / "shards" / f"unit-{failed_unit:06d}.parquet").exists()
    assert stats["units_this_run"] == expected_redone, stats
    assert result.intact, result


@pytest.fixture
def small_disk(tmp_path, reference):
    """A tmpfs just big enough for the capture's setup files and about half its shards: a disk that
    fills up mid-run. Needs root and a kernel that lets this process mount (skipped otherwise)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real full disk needs root to mount a small tmpfs; the ENOSPC case on faulty:// stands in")
    page = 4096
    ref = Path(reference)
    shards = sorted((ref / "shards").iterdir())
    setup = [p for p in ref.rglob("*") if p.is_file() and "shards" not in p.parts and "done" not in p.parts]
    pages = sum(math.ceil(p.stat().st_size / page) + 1 for p in setup) + 16  # + directories, slack
    pages += sum(math.ceil(p.stat().st_size / page) + 1 for p in shards[: len(shards) // 2])
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * page}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); the ENOSPC case on faulty:// stands in")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # busy: detach it now, free it later


@pytest.mark.extended
def test_a_full_disk_stops_the_capture_cleanly_and_the_rerun_finishes_it(small_disk, tiny_teacher, fault_corpus,
                                                                        reference, chaos_record):
    out = small_disk / "set"
    with pytest.raises(RaydistillError) as err:
        rerun(tiny_teacher, fault_corpus, out)
    message = str(err.value)
    done_at_failure = done_records(out)
    torn = torn_files(str(out), reference)
    # the operator frees space (here: the same tmpfs made bigger) and runs the same command again
    grown = subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], capture_output=True, text=True)
    manifest = rerun(tiny_teacher, fault_corpus, out) if grown.returncode == 0 else None
    result = compare_capture(str(out), reference)
    chaos_record("fault", "disk-full-tmpfs", ok=manifest is not None and "No space left" in message and not torn
                 and result.intact, **result.figures(), torn_files=len(torn), done_at_failure=done_at_failure)
    assert "No space left on device" in message and "\n" not in message, message
    assert 0 <= done_at_failure < UNITS
    assert torn == [], torn
    assert grown.returncode == 0, grown.stderr
    assert manifest.stats["units_this_run"] == UNITS - done_at_failure
    assert result.intact, result


# --- records and shards that do not match -------------------------------------------------------


@pytest.mark.quick
@pytest.mark.extended  # CI runs the same case in test_records.py (a deleted shard is redone)
def test_a_record_whose_shard_is_missing_is_not_trusted_and_its_unit_is_redone(tiny_teacher, fault_corpus,
                                                                               reference, tmp_path, chaos_record):
    out = tmp_path / "set"
    shutil.copytree(reference, out)
    (out / "shards" / "unit-000005.parquet").unlink()  # lost from storage; its record and the manifest remain
    caught = verify_shard_set(str(out))
    manifest = rerun(tiny_teacher, fault_corpus, out)
    result = compare_capture(str(out), reference)
    chaos_record("fault", "record-without-shard", ok=bool(caught) and manifest.stats["units_this_run"] == 1
                 and result.intact, **result.figures())
    assert any("unit-000005" in str(p) for p in caught), caught  # verify sees it before the rerun
    assert manifest.stats["units_this_run"] == 1 and manifest.stats["units_already_done"] == UNITS - 1
    assert result.intact, result


@pytest.mark.quick
def test_shards_without_their_records_are_redone_and_overwritten(tiny_teacher, fault_corpus, reference, tmp_path,
                                                                 chaos_record):
    out = tmp_path / "set"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()  # the run died after these shards landed, before their records
    (out / "done" / "unit-000007.json").unlink()  # a whole shard, no record: a crash between the two writes
    (out / "done" / "unit-000003.json").unlink()
    damaged = out / "shards" / "unit-000003.parquet"  # and one whose bytes are not what the unit makes
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    manifest = rerun(tiny_teacher, fault_corpus, out)
    result = compare_capture(str(out), reference)
    chaos_record("fault", "shard-without-record", ok=manifest.stats["units_this_run"] == 2 and result.intact,
                 **result.figures())
    assert manifest.stats["units_this_run"] == 2 and manifest.stats["units_already_done"] == UNITS - 2
    assert result.intact, result  # unit 3's shard overwritten with the bytes the unit makes


# --- the object store under memory pressure -----------------------------------------------------


@pytest.mark.extended
def test_capture_completes_with_the_object_store_full_and_spilling(tiny_teacher, fault_corpus, reference, tmp_path,
                                                                   chaos_record):
    out = tmp_path / "set"
    config = write_capture_config(tmp_path / "capture.yaml", tiny_teacher, fault_corpus, str(out))
    # the smallest object store Ray allows (75 MiB) given 80 MiB, then 160 MiB of pinned objects put in it
    ran = faulted_capture(config, "--object-store-mb", "80", "--fill-mb", "160")
    spilled = next((line for line in ran.stderr.splitlines() if line.startswith("object store:")), "")
    spilled_mib = re.search(r"Spilled (\d+) MiB", spilled)
    result = compare_capture(str(out), reference)
    chaos_record("fault", "object-store-pressure", ok=ran.returncode == 0 and "Spilled" in spilled and result.intact,
                 **result.figures(), spilled_mib=int(spilled_mib.group(1)) if spilled_mib else 0)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Spilled" in spilled, spilled or ran.stderr[-3000:]  # the store really was over full
    assert result.intact, result


# --- training: a worker and the driver killed ---------------------------------------------------

STEPS, CHECKPOINT_EVERY = 40, 10


def train_settings(shards: str, out: Path) -> dict:
    return dict(shards=shards, output=str(out), student={"size": "small"}, seq_len=64, micro_batch_size=4,
                steps=STEPS, warmup_steps=2, log_every=1, checkpoint_every=CHECKPOINT_EVERY, num_workers=2,
                zero_stage=2)


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("ray/*/checkpoint_*"))


@pytest.fixture(scope="module")
def train_reference(captured, ray_session, tmp_path_factory) -> list[dict]:
    """The per-step log of an uninterrupted run: the losses and tokens every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("train-reference") / "run"
    run_training(TrainConfig(**train_settings(captured, out)))
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    return rows


@pytest.mark.extended  # CI keeps the worker kill: the same checkpoint resume, compared step by step
def test_training_driver_killed_mid_run_resumes_on_the_same_batches(captured, train_reference, tmp_path,
                                                                    chaos_record):
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_settings(captured, out)))
    cmd = [sys.executable, "-m", "raydistill", "train", str(config)]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray, like a user's shell
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for(lambda: checkpoints(out) or driver.poll() is not None, EVENT_TIMEOUT_S, "the first checkpoint")
            alive_at_checkpoint = driver.poll() is None
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and the training workers
            driver.wait()
    rows = read_metrics(out)
    done_before = int(rows[-1]["step"]) if rows else 0
    # metrics.csv is rewritten whole every step (atomically): what the kill left is whole rows 1..n
    metrics_whole = [int(r["step"]) for r in rows] == list(range(1, done_before + 1)) and all(
        r.get(k) not in (None, "") for r in rows for k in METRICS_FIELDS)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    result = compare_training(out, train_reference)
    chaos_record("fault", "training-driver-killed", ok=alive_at_checkpoint and done_before < STEPS and metrics_whole
                 and again.returncode == 0 and result.intact, **result.figures(), steps_before_kill=done_before,
                 torn_files=0 if metrics_whole else 1)
    assert alive_at_checkpoint, (tmp_path / "driver.log").read_text()[-2000:]
    assert done_before < STEPS, "the run finished before it could be interrupted"
    assert metrics_whole, rows
    assert again.returncode == 0, again.stderr[-2000:]
    assert result.intact, result


def test_training_worker_killed_mid_run_is_restarted_from_the_last_checkpoint(captured, train_reference, tmp_path,
                                                                              chaos_record):
    out = tmp_path / "run"
    killed: list[int] = []
    finished = threading.Event()

    def kill_a_worker_after_the_first_checkpoint() -> None:
        wait_for(lambda: checkpoints(out) or finished.is_set(), EVENT_TIMEOUT_S, "the first checkpoint")
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline() or [])]
        if workers and not finished.is_set():
            workers[-1].kill()
            rows = read_metrics(out)
            killed.append(int(rows[-1]["step"]) if rows else 0)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        run_training(TrainConfig(**train_settings(captured, out)))
    finally:
        finished.set()
        killer.join(timeout=EVENT_TIMEOUT_S)
    result = compare_training(out, train_reference)
    chaos_record("fault", "training-worker-killed", ok=bool(killed) and killed[0] < STEPS and result.intact,
                 **result.figures(), steps_before_kill=killed[0] if killed else None)
    assert killed, "no training worker process was found to kill"
    assert killed[0] < STEPS, "the run finished before a worker could be killed"
    assert result.intact, result
