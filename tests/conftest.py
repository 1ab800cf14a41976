"""Shared fixtures: a tiny corpus file, a tiny teacher saved with save_pretrained, one local Ray.

Session-scoped so the expensive pieces (Ray start, a capture) happen once per test run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TINY_DOCS = 24


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on 127.0.0.1 with the standard AWS variables pointing at it (yields them).

    fsspec caches S3 clients, so the cache is cleared on both sides: no client may outlive its server.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            yield env
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def write_jsonl_corpus(path, num_docs: int, *, base_chars: int, step_chars: int) -> str:
    """The first ``num_docs`` train documents of the embedded corpus, document i cut to base + i·step chars.

    Varied lengths, some longer than the 64-token windows the tests use.
    """
    from raydistill.config import CorpusConfig
    from raydistill.io.corpus import read_documents

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
    from raydistill.models.loading import build_llama
    from raydistill.models.tokenizers import train_tokenizer

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

    # top-k: these tests compare with the teacher's own top-k; the budget default runs in test_demo
    settings = dict(teacher=teacher, output=output, corpus={"source": corpus, "split": "all"}, mode="topk", k=16,
                    max_length=64, docs_per_unit=5, num_actors=2, batch_tokens=512)
    settings.update(overrides)
    return CaptureConfig(**settings)


@pytest.fixture(scope="session")
def captured(tiny_teacher, tiny_corpus, ray_session, tmp_path_factory) -> str:
    """A shard set captured by 2 Ray actors from the tiny teacher."""
    from raydistill.stages.capture.run import run_capture

    out = str(tmp_path_factory.mktemp("shards") / "set")
    run_capture(capture_config(tiny_teacher, tiny_corpus, out), progress=False)
    return out


def write_synthetic_set(root: str, per_unit: list, codec, *, tokenizer_sha256: str = "a" * 64,
                        max_length: int = 64, temperature: float = 1.0):
    """A complete shard set from given TargetWindows, as capture would leave it: vocab table,
    one shard and completion record per unit, manifest. Returns its ShardSet."""
    from raydistill.contracts.shards import (
        FORMAT_VERSION,
        Manifest,
        PlanInfo,
        ShardSet,
        TeacherInfo,
        TokenizerInfo,
        VocabTableInfo,
        shard_relpath,
        token_dtype_for,
        utc_timestamp,
        write_completion,
        write_manifest,
        write_shard,
        write_vocab_table,
    )
    from raydistill.contracts.shards.manifest import sparsify_info_for
    from raydistill.io import storage

    path, table_sha = write_vocab_table(root, codec.table)
    infos = []
    for unit, windows in enumerate(per_unit):
        info = write_shard(storage.join(root, shard_relpath(unit)), windows, codec=codec, unit=unit,
                           relpath=shard_relpath(unit))
        write_completion(root, info)
        infos.append(info)
    write_manifest(root, Manifest(
        format_version=FORMAT_VERSION, created_at=utc_timestamp(),
        teacher=TeacherInfo(name_or_path="teacher", config_sha256="c" * 64, weights_sha256="d" * 64),
        tokenizer=TokenizerInfo(sha256=tokenizer_sha256), vocab_size=codec.vocab_size,
        padded_vocab_size=codec.vocab_size + 20, token_dtype=token_dtype_for(codec.vocab_size),
        sparsify=sparsify_info_for(codec, temperature=temperature, threshold=0.9, mean_ids=codec.k / 2),
        vocab_table=VocabTableInfo(path=path, sha256=table_sha, sample_tokens=int(codec.table.sample_tokens)),
        plan=PlanInfo(sha256="e" * 64, num_units=len(infos), corpus="synthetic", max_length=max_length),
        shards=infos, stats={"capture_seconds": 1.5}))
    return ShardSet(root)
