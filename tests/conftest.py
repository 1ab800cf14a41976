"""Shared fixtures: a tiny corpus file, a tiny teacher saved with save_pretrained, one local Ray.

Session-scoped so the expensive pieces (Ray start, a capture) happen once per test run.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TINY_DOCS = 24


def write_jsonl_corpus(path, num_docs: int, *, base_chars: int, step_chars: int) -> str:
    """The first ``num_docs`` train documents of the embedded corpus, document i cut to base + i·step chars.

    Varied lengths, some longer than the 64-token windows the tests use.
    """
    from raydistill.config import CorpusConfig
    from raydistill.corpus import read_documents

    docs = read_documents(CorpusConfig(split="train", max_documents=num_docs))
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d.text[: base_chars + step_chars * i]}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A jsonl corpus of a few real documents (truncated) from the embedded default corpus."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    return write_jsonl_corpus(path, TINY_DOCS, base_chars=200, step_chars=60)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_corpus) -> str:
    """A random-init 2-layer Llama + a 384-id BPE tokenizer, saved as an HF model directory."""
    from raydistill.models import build_llama
    from raydistill.tokenization import train_tokenizer

    texts = [json.loads(line)["text"] for line in open(tiny_corpus)]
    tokenizer = train_tokenizer(texts * 4, vocab_size=384)
    model = build_llama(vocab_size=len(tokenizer), hidden=32, layers=2, heads=2, max_positions=256, seed=0)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=4, dashboard_host="127.0.0.1", logging_level="ERROR",
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def capture_config(teacher: str, corpus: str, output: str, **overrides):
    from raydistill.config import CaptureConfig

    settings = dict(teacher=teacher, output=output, corpus={"source": corpus, "split": "all"}, k=16,
                    max_length=64, docs_per_unit=5, num_actors=2, batch_tokens=512)
    settings.update(overrides)
    return CaptureConfig(**settings)


@pytest.fixture(scope="session")
def captured(tiny_teacher, tiny_corpus, ray_session, tmp_path_factory) -> str:
    """A shard set captured by 2 Ray actors from the tiny teacher."""
    from raydistill.capture import run_capture

    out = str(tmp_path_factory.mktemp("shards") / "set")
    run_capture(capture_config(tiny_teacher, tiny_corpus, out), progress=False)
    return out
