"""Shared fixtures: a tiny corpus file, a tiny teacher saved with save_pretrained, one local Ray.

Session-scoped so the expensive pieces (Ray start, a capture) happen once per test run.

The tree mirrors the package: ``unit/`` holds fast tests (no Ray, DeepSpeed or server),
``integration/`` the tests that start them. Every integration test is marked ``slow``, and so
is any other test that asks for a fixture that starts Ray or a server, so
``pytest -m "not slow"`` is the quick set.
"""

from __future__ import annotations

import json
import os

import pytest
from support import GGUF_NAME, OTHER_VOCAB, TINY_DOCS, capture_config, start_session_s3, write_jsonl_corpus

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Without a GPU, Triton's kernels (the capture's GPU head) run in its interpreter on CPU tensors. Triton reads
# this when a kernel is defined, so it is set before any test imports raydistill.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A jsonl corpus of a few real documents (truncated) from the embedded default corpus."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    return write_jsonl_corpus(path, TINY_DOCS, base_chars=200, step_chars=60)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_corpus) -> str:
    """A random-init 2-layer Llama + a 384-id BPE tokenizer, saved as an HF model directory."""
    from raydistill.models.sizes import build_llama
    from raydistill.models.tokenizers import train_tokenizer

    texts = [json.loads(line)["text"] for line in open(tiny_corpus)]
    tokenizer = train_tokenizer(texts * 4, vocab_size=384)
    model = build_llama(vocab_size=len(tokenizer), hidden=32, layers=2, heads=2, max_positions=256, seed=0)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> str:
    """A second byte-level BPE tokenizer with another vocabulary size, trained on the embedded corpus."""
    from raydistill.io.corpus import default_documents
    from raydistill.models.tokenizers import train_tokenizer

    tokenizer = train_tokenizer([d.text for d in default_documents()[:300]], vocab_size=OTHER_VOCAB)
    out = tmp_path_factory.mktemp("other-tokenizer")
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def gguf_teacher(tiny_teacher, tmp_path_factory) -> str:
    """A directory holding nothing but a GGUF file of the tiny teacher (weights, config, tokenizer)."""
    directory = tmp_path_factory.mktemp("gguf-teacher")
    import torch
    from support.gguf_writer import write_llama_gguf

    from raydistill.models.loading import load_causal_lm
    from raydistill.models.tokenizers import load_tokenizer

    model = load_causal_lm(tiny_teacher, dtype=torch.float32)
    write_llama_gguf(model, load_tokenizer(tiny_teacher), str(directory / GGUF_NAME))
    return str(directory)


@pytest.fixture(scope="session")
def session_s3():
    """The session's moto S3 server, started before its Ray (see ``support.start_session_s3``)."""
    server, env = start_session_s3()
    yield env
    server.stop()


@pytest.fixture(scope="session")
def ray_session(session_s3):
    import ray

    if ray.is_initialized():  # a private Ray a command started in this process (its corpus probe, say)
        ray.shutdown()

    ray.init(num_cpus=4, dashboard_host="127.0.0.1", logging_level="ERROR",
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def captured(tiny_teacher, tiny_corpus, ray_session, tmp_path_factory) -> str:
    """A shard set captured by 2 Ray actors from the tiny teacher."""
    from raydistill.stages.capture.run import run_capture

    out = str(tmp_path_factory.mktemp("shards") / "set")
    run_capture(capture_config(tiny_teacher, tiny_corpus, out), progress=False)
    return out


SLOW_FIXTURES = {"ray_session", "captured"}  # start Ray (and, for captured, run a capture)


def pytest_collection_modifyitems(config, items):
    for item in items:
        integration = "integration" in item.path.parts
        if integration or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    import torch

    if not torch.cuda.is_available():  # GPU tests are deselected, never reported as passed or skipped, without one
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]


CHAOS_LOG_ENV = "RAYDISTILL_CHAOS_LOG"  # tools/chaos.py sets it: one JSON line per reliability case


@pytest.fixture
def chaos_record(request):
    """``chaos_record(kind, case, ok, **figures)``: with $RAYDISTILL_CHAOS_LOG set, append one JSON line
    ``{"kind", "case", "ok", "test", ...figures}`` to that file (tools/chaos.py reads them); else nothing.
    Call it before the test's asserts, so a case that then fails is still counted (as failed, by its test)."""

    def record(kind: str, case: str, ok: bool, **figures) -> None:
        path = os.environ.get(CHAOS_LOG_ENV)
        if not path:
            return
        line = {"kind": kind, "case": case, "ok": bool(ok), "test": request.node.nodeid, **figures}
        with open(path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")

    return record
