"""Exact resume of training: kill the driver or a training worker mid-run, run again, get the same losses.

Every run logs every step to metrics.csv; an interrupted-and-resumed run must reproduce the loss sequence of an
uninterrupted run with the same settings (the reader's cursor, the DeepSpeed state and the LR schedule all resume).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from raydistill.config import TrainConfig
from raydistill.stages.train.run import run_training

STEPS, CHECKPOINT_EVERY = 40, 10


def settings(shards: str, out: Path) -> dict:
    return dict(shards=shards, output=str(out), student={"size": "small"}, seq_len=64, micro_batch_size=4,
                steps=STEPS, warmup_steps=2, log_every=1, checkpoint_every=CHECKPOINT_EVERY, num_workers=2,
                zero_stage=2)


def losses(out: Path) -> list[tuple[int, float]]:
    with open(out / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("ray/*/checkpoint_*"))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(captured, ray_session, tmp_path_factory) -> list[tuple[int, float]]:
    out = tmp_path_factory.mktemp("reference") / "run"
    run_training(TrainConfig(**settings(captured, out)))
    result = losses(out)
    assert [s for s, _ in result] == list(range(1, STEPS + 1))
    return result


def test_driver_killed_mid_run_resumes_on_the_same_batches(captured, reference, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(settings(captured, out)))
    cmd = [sys.executable, "-m", "raydistill", "train", str(config)]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray, like a user's shell
    driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: checkpoints(out) or driver.poll() is not None, 240, "the first checkpoint")
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and the training workers
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    done_before = losses(out)[-1][0] if (out / "metrics.csv").exists() else 0
    assert done_before < STEPS, "the run finished before it could be interrupted"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = losses(out)
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(resumed, reference, strict=True):
        assert abs(a - b) < 1e-4, (step, a, b)


def test_worker_killed_mid_run_is_restarted_from_the_last_checkpoint(captured, reference, tmp_path):
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        wait_for(lambda: checkpoints(out), 240, "the first checkpoint")
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline() or [])]
        if workers:
            workers[-1].kill()
            killed.append(losses(out)[-1][0] if (out / "metrics.csv").exists() else 0)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    run_training(TrainConfig(**settings(captured, out)))
    killer.join(timeout=5)
    assert killed, "no training worker process was found to kill"
    assert killed[0] < STEPS, "the run finished before a worker could be killed"
    resumed = losses(out)
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(resumed, reference, strict=True):
        assert abs(a - b) < 1e-4, (step, a, b)
