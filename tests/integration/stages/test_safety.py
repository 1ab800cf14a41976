"""Reading never runs code, and URL credentials are never written down.

- A capture and a training run read a corpus over HTTP with ``user:password@`` in its URL (the server
  insists on them): the password is in no file either writes (plan, manifest, summary, checkpoints,
  metrics) and not on stdout or stderr.
- A checkpoint planted in the run's storage (a pickle that creates a file when unpickled) is refused
  with one line and never unpickled: a zip checkpoint by the driver before any worker starts, a legacy
  one by the workers' weights-only load (real checkpoints resume: test_resume.py).
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from support import assert_one_error_line, text_corpus

USER, PASSWORD = "reader", "s3cr3t-pw-8271"
SECRETS = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())


class _AuthHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder to requests with the right basic-auth header only (so the URL's credentials are used)."""

    def log_message(self, *args) -> None:
        pass

    def _allowed(self) -> bool:
        if self.headers.get("Authorization") == f"Basic {SECRETS[1]}":
            return True
        self.send_response(401)
        self.end_headers()
        return False

    def do_GET(self) -> None:
        if self._allowed():
            super().do_GET()

    def do_HEAD(self) -> None:
        if self._allowed():
            super().do_HEAD()


@pytest.fixture(scope="module")
def corpus_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    text_corpus(root / "corpus.jsonl")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_AuthHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{USER}:{PASSWORD}@127.0.0.1:{server.server_port}/corpus.jsonl"
    server.shutdown()


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "raydistill", *args], env=env, text=True, capture_output=True,
                          timeout=timeout)


def _assert_no_secret(root: Path, *texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, text[-2000:]
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in SECRETS:
                assert secret.encode() not in data, path


def test_a_capture_from_a_url_with_credentials_writes_and_prints_none(corpus_url, tiny_teacher, tmp_path):
    out = tmp_path / "shards"
    config = tmp_path / "capture.yaml"
    config.write_text(yaml.safe_dump(dict(
        teacher=tiny_teacher, output=str(out), corpus={"source": corpus_url, "split": "all", "max_documents": 10},
        mode="topk", k=16, max_length=64, unit_bytes=3500, num_actors=1, batch_tokens=512)))
    run = _cli("capture", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["corpus"].startswith("http://***@127.0.0.1:")  # where the documents came from, minus the secret
    _assert_no_secret(out, run.stdout, run.stderr)

    missing = corpus_url.replace("corpus.jsonl", "missing.jsonl")
    config.write_text(yaml.safe_dump(dict(teacher=tiny_teacher, output=str(tmp_path / "other"),
                                          corpus={"source": missing})))
    run = _cli("capture", str(config))
    assert_one_error_line(run.returncode, run.stderr, "missing.jsonl", "***@127.0.0.1")
    _assert_no_secret(tmp_path / "other", run.stdout, run.stderr)


class _Payload:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.extended  # CI runs the capture case here and the planted checkpoints in tests/unit/stages/train
def test_training_writes_no_credentials_and_resumes_only_from_its_own_checkpoints(corpus_url, tiny_teacher,
                                                                                  tmp_path):
    out = tmp_path / "student"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(dict(
        corpus={"source": corpus_url, "split": "all"}, loss="ce", tokenizer=tiny_teacher, output=str(out),
        name="safety", student={"size": "micro"}, seq_len=32, micro_batch_size=2, steps=2, warmup_steps=1,
        log_every=1, checkpoint_every=1, num_workers=1)))
    first = _cli("train", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["corpus"]["source"].startswith("http://***@127.0.0.1:")
    states = sorted(out.glob("ray/safety/checkpoint_*/step/*model_states.pt"))
    assert states and all((p.parent.parent / "train_config.json").exists() for p in states)
    _assert_no_secret(out, first.stdout, first.stderr)

    marker = tmp_path / "owned"
    for path in states:  # every checkpoint a resume could pick
        torch.save({"module": _Payload(str(marker))}, path)
    planted = _cli("train", str(config))
    assert_one_error_line(planted.returncode, planted.stderr, "holds more than tensors and plain data",
                          "io.open", "model_states.pt", "is not loaded")
    assert not marker.exists()

    for path in states:  # legacy (not zip) pickles: the driver's opcode scan skips them, the workers refuse
        torch.save({"module": _Payload(str(marker))}, path, _use_new_zipfile_serialization=False)
    planted = _cli("train", str(config))
    assert_one_error_line(planted.returncode, planted.stderr, "holds more than tensors and plain data",
                          "is not loaded")
    assert not marker.exists()

