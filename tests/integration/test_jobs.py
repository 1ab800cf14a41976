"""Real Ray jobs: a private Ray head on 127.0.0.1, stages submitted through the Job Submission SDK.

The head runs in its own ``--temp-dir`` with its own ports and its own auth token, so it
cannot touch (or be found by) any other Ray on the machine, and it is torn down by process
id, never by a global ``ray stop``. Jobs run ``python -m raydistill`` from the installed
package; nothing is uploaded. The S3 test points every process at a moto server through the
standard AWS environment variables, passed to the jobs in their runtime_env.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import free_port, moto_s3

from raydistill.io import storage

JOB_TIMEOUT_S = 240
HEAD_START_TIMEOUT_S = 90
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
           "AWS_DEFAULT_REGION", "AWS_PROFILE")


@dataclass
class Head:
    gcs_address: str
    dashboard_url: str
    token: str
    temp_dir: str

    def client(self):
        from ray.job_submission import JobSubmissionClient

        # an explicit Authorization header: this process may have its own Ray (the in-process
        # ray_session) with another token, and the SDK would otherwise send that one
        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})


def _head_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AWS_ENV and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    return env


def _wait_for_dashboard(head: Head, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            head.client().list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                pytest.fail(f"Ray head not ready after {HEAD_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to the blocking `ray start` makes it stop the processes it started; then sweep up."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session `ray start` leads: only our head's processes
            proc.wait(timeout=10)
    # workers outlive the raylet for a moment; any process naming our temp dir is ours
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
            leftovers.append(p)
    for p in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(leftovers, timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with free ports, 4 CPUs and token auth; stopped after the module."""
    temp_dir = str(tmp_path_factory.mktemp("rayhead"))
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = free_port(), free_port()
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", "--num-cpus=4", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=_head_env(token), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    head = Head(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", token, temp_dir)
    try:
        _wait_for_dashboard(head, proc, log_path)
        yield head
    finally:
        _stop_head(proc, temp_dir)


@dataclass
class Job:
    """A finished (or never submitted) job: what ran, how it ended, what it printed."""

    entrypoint: str
    status: str
    logs: str = ""

    def result(self) -> dict:
        """Assert SUCCEEDED and return the JSON line the command prints last."""
        assert self.status == "SUCCEEDED", f"job `{self.entrypoint}` ended {self.status}:\n{self.logs[-6000:]}"
        return json.loads([line for line in self.logs.splitlines() if line.startswith("{")][-1])


def run_pipelines(head: Head, pipelines: dict[str, list[tuple[list[str], dict[str, str]]]]) -> dict[str, list[Job]]:
    """Run each pipeline's `python -m raydistill ARGS` jobs (with their env_vars) one after the other,
    the pipelines side by side; a pipeline stops at its first job that does not succeed."""
    client = head.client()

    def submit(args: list[str], env_vars: dict[str, str]) -> tuple[str, str]:
        entrypoint = " ".join([sys.executable, "-m", "raydistill", *args])
        return entrypoint, client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env_vars})

    done: dict[str, list[Job]] = {name: [] for name in pipelines}
    running = {name: submit(*steps[0]) for name, steps in pipelines.items()}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while running:
        time.sleep(0.5)
        for name, (entrypoint, job_id) in list(running.items()):
            status = client.get_job_status(job_id)
            if not status.is_terminal() and time.monotonic() < deadline:
                continue
            if not status.is_terminal():
                client.stop_job(job_id)
            label = str(status.value) if status.is_terminal() else f"still {status.value} after {JOB_TIMEOUT_S} s"
            done[name].append(Job(entrypoint, label, client.get_job_logs(job_id)))
            del running[name]
            if label == "SUCCEEDED" and len(done[name]) < len(pipelines[name]):
                running[name] = submit(*pipelines[name][len(done[name])])
    return done


def write_yaml(path: Path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


JOB_UNIT_BYTES = 6000  # the tiny corpus (16.9 kB) in 3 units


def capture_yaml(path: Path, teacher: str, corpus: str, output: str) -> str:
    return write_yaml(path, dict(
        teacher=teacher, output=output, corpus={"source": corpus, "split": "all"}, draws=16, max_length=64,
        unit_bytes=JOB_UNIT_BYTES, batch_tokens=512, num_actors=1))


def train_yaml(path: Path, shards: str, output: str) -> str:
    return write_yaml(path, dict(
        shards=shards, output=output, name="job-student", student={"size": "micro"}, seq_len=32,
        micro_batch_size=2, steps=4, warmup_steps=1, log_every=2, checkpoint_every=0, num_workers=2))


def check_student(model_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    logits = model(torch.tensor([tokenizer("Submitted as a Ray job.")["input_ids"]])).logits
    assert logits.shape[-1] >= 384 and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def s3_env():
    """The moto S3 server's variables are set in this process (for the checks) for the module's
    duration, and handed to jobs in their runtime_env."""
    with moto_s3() as env:
        yield env


@dataclass
class Pipeline:
    shards: str
    student: str
    capture: Job
    train: Job


@pytest.fixture(scope="module")
def pipelines(ray_head, s3_env, tiny_teacher, tiny_corpus, tmp_path_factory) -> dict[str, Pipeline]:
    """Capture, then train, as Ray jobs: to local disk and to S3, the two pipelines side by side.

    The head was started without AWS variables, so the S3 jobs get them from their runtime_env only.
    """
    storage.makedirs("s3://raydistill-test")  # the bucket
    where = {"local": (str(tmp_path_factory.mktemp("jobs-local")), {}),
             "s3": ("s3://raydistill-test/run", s3_env)}
    configs = tmp_path_factory.mktemp("job-configs")
    steps = {}
    for name, (root, env) in where.items():
        shards, student = storage.join(root, "shards"), storage.join(root, "student")
        steps[name] = [
            (["precompute", capture_yaml(configs / f"capture-{name}.yaml", tiny_teacher, tiny_corpus, shards)], env),
            (["train", train_yaml(configs / f"train-{name}.yaml", shards, student)], env),
        ]
    jobs = run_pipelines(ray_head, steps)
    out = {}
    for name, (root, _) in where.items():
        capture, *rest = jobs[name]
        train = rest[0] if rest else Job("(not submitted: the capture failed)", "NOT SUBMITTED")
        out[name] = Pipeline(storage.join(root, "shards"), storage.join(root, "student"), capture, train)
    return out


def test_capture_and_train_as_ray_jobs(pipelines):
    p = pipelines["local"]
    captured = p.capture.result()
    manifest = json.loads(Path(p.shards, "manifest.json").read_text())
    assert captured["units"] == manifest["plan"]["num_units"] == len(manifest["shards"]) == 3
    assert captured["tokens"] == manifest["stats"]["tokens"] > 0
    assert manifest["sparsify"]["mode"] == "sampled" and manifest["sparsify"]["k"] == 16  # the default mode: k = draws

    trained = p.train.result()
    assert trained["steps"] == 4 and trained["tokens"] == 4 * 2 * 2 * 32
    assert json.loads(Path(p.student, "summary.json").read_text())["shards"] == p.shards
    assert list(Path(p.student, "ray", "job-student").glob("checkpoint_*"))
    check_student(str(Path(p.student, "model")))


def test_capture_and_train_to_s3_as_ray_jobs(pipelines, tmp_path):
    from raydistill.contracts.shards.verify import verify_shard_set

    p = pipelines["s3"]
    captured = p.capture.result()
    manifest = json.loads(storage.read_text(storage.join(p.shards, "manifest.json")))
    assert captured["units"] == len(manifest["shards"]) == 3
    assert verify_shard_set(p.shards) == []  # every shard read back from S3 matches its checksum
    assert storage.exists(storage.join(p.shards, "tokenizer", "tokenizer.json"))

    trained = p.train.result()
    assert trained["steps"] == 4
    fs, student = storage.filesystem(p.student)
    assert fs.glob(f"{student}/ray/job-student/checkpoint_*/step/*"), fs.find(student)  # Ray Train wrote to S3
    assert storage.list_files(storage.join(p.student, "model"), ".safetensors")
    assert json.loads(storage.read_text(storage.join(p.student, "summary.json")))["shards"] == p.shards
    fs.get(f"{student}/model/", str(tmp_path / "model"), recursive=True)
    check_student(str(tmp_path / "model"))


def test_s3_listings_see_files_that_other_processes_write(s3_env):
    """The driver lists completion records that actors write: s3fs's listing cache must not hide them."""
    import s3fs

    other_process = s3fs.S3FileSystem(skip_instance_cache=True)  # stands in for a teacher actor
    storage.makedirs("s3://raydistill-test")
    root = "s3://raydistill-test/listing"
    storage.atomic_write_text(f"{root}/done/unit-000000.json", "{}")
    assert storage.list_files(f"{root}/done") == ["unit-000000.json"]
    assert not storage.exists(f"{root}/manifest.json")
    other_process.pipe(f"{root}/done/unit-000001.json", b"{}")
    other_process.pipe(f"{root}/manifest.json", b'{"v": 2}')
    assert storage.list_files(f"{root}/done", ".json") == ["unit-000000.json", "unit-000001.json"]
    assert storage.exists(f"{root}/manifest.json")
    assert storage.read_text(f"{root}/manifest.json") == '{"v": 2}'


# --- addresses ------------------------------------------------------------------------------


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, err


def test_wrong_address_fails_fast_with_one_line(tiny_teacher, tiny_corpus, tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    capture = capture_yaml(tmp_path / "capture.yaml", tiny_teacher, tiny_corpus, str(tmp_path / "shards"))
    train = train_yaml(tmp_path / "train.yaml", str(tmp_path / "shards"), str(tmp_path / "student"))
    t0 = time.monotonic()
    runs = {  # side by side: each is mostly Python start-up
        "--address": subprocess.Popen([sys.executable, "-m", "raydistill", "precompute", capture, "--address", dead],
                                      env=base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "RAY_ADDRESS": subprocess.Popen([sys.executable, "-m", "raydistill", "train", train],
                                        env={**base, "RAY_ADDRESS": dead}, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    }
    results = {how: _finish(proc, 30) for how, proc in runs.items()}
    assert time.monotonic() - t0 < 30
    for how, (code, err) in results.items():
        assert code == 2, (how, err)
        assert "Traceback" not in err, (how, err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (how, err)
        assert f"cannot connect to a Ray cluster at '{dead}'" in errors[0] and "nothing answers" in errors[0]
    assert not (tmp_path / "shards").exists()  # refused before any work, not after loading the teacher






def test_ray_address_joins_the_running_head(ray_head):
    """RAY_ADDRESS (as `ray job submit` sets it, or a user exports it) joins that cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray_head.gcs_address, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": ray_head.token}
    code = ("from raydistill.runtime.cluster import init_ray; import ray; init_ray(); "
            "print('CPUS', ray.cluster_resources()['CPU'], ray.get_runtime_context().gcs_address)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    cpus_line = next(line for line in out.stdout.splitlines() if line.startswith("CPUS"))
    assert cpus_line.split()[1] == "4.0"  # the head's --num-cpus, not this machine's count
