"""Helpers the tests share (importable as ``support``; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import psutil
import pytest
import yaml

from raydistill.cli import main
from raydistill.config import build_config
from raydistill.errors import ConfigError

TINY_DOCS = 24
GGUF_NAME = "teacher-f32.gguf"  # the gguf_teacher fixture's file
OTHER_VOCAB = 512  # other_tokenizer's ids; the teacher's tokenizer (tiny_teacher) has 384
POLL_S = 0.02


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def write_config(tmp_path, **data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_error(model, **settings) -> str:
    """The one-line ConfigError message that building ``model`` from ``settings`` gives."""
    with pytest.raises(ConfigError) as err:
        build_config(model, settings, "in test")
    message = str(err.value)
    assert "\n" not in message
    return message


_SESSION_S3: dict[str, str] = {}  # the env of the test session's moto server, once started


def _start_moto() -> tuple[object, dict[str, str]]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                    "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1"}


def start_session_s3() -> tuple[object, dict[str, str]]:
    """A moto server for the whole test session, its AWS variables set in this process *before* the
    session's Ray starts, so every Ray worker (which reads its own slice of an S3 corpus) has them too."""
    server, env = _start_moto()
    os.environ.update(env)
    _SESSION_S3.update(env)
    return server, env


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on 127.0.0.1 with the standard AWS variables pointing at it (yields them): the
    session's server when one runs (its variables reach the Ray workers), else one of its own.

    fsspec caches S3 clients, so the cache is cleared on both sides: no client may outlive its server.
    """
    import s3fs

    server, env = (None, dict(_SESSION_S3)) if _SESSION_S3 else _start_moto()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            yield env
    finally:
        if server is not None:
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


def capture_config(teacher: str, corpus: str, output: str, **overrides):
    from raydistill.config import CaptureConfig

    # top-k: these tests compare with the teacher's own top-k; the budget default runs in test_demo
    settings = dict(teacher=teacher, output=output, corpus={"source": corpus, "split": "all"}, mode="topk", k=16,
                    max_length=64, unit_bytes=3500, num_actors=2, batch_tokens=512)
    settings.update(overrides)
    return CaptureConfig(**settings)


def write_synthetic_set(root: str, per_unit: list, codec, *, tokenizer_sha256: str = "a" * 64,
                        max_length: int = 64, temperature: float = 1.0):
    """A complete shard set from given TargetWindows, as capture would leave it: vocab table,
    one shard and completion record per unit, manifest. Returns its ShardSet."""
    from raydistill.contracts.plan import PLAN_NAME, Plan, WorkUnit
    from raydistill.contracts.shards import (
        FORMAT_VERSION,
        Manifest,
        PlanInfo,
        ShardSet,
        TeacherInfo,
        TokenizerInfo,
        VocabTableInfo,
        token_dtype_for,
        utc_timestamp,
        write_manifest,
        write_shard,
        write_vocab_table,
    )
    from raydistill.contracts.shards.manifest import sparsify_info_for
    from raydistill.contracts.units import mark_done
    from raydistill.io import storage

    path, table_sha = write_vocab_table(root, codec.table)
    from raydistill.io.slices import Slice

    units = []
    for unit, windows in enumerate(per_unit):
        doc_ids = list(dict.fromkeys(w.doc_id for w in windows))
        units.append(WorkUnit.of(unit, Slice("synthetic.jsonl", "jsonl", "bytes", unit, unit + 1,
                                             storage.sha256_bytes("\n".join(doc_ids).encode()), 1)))
    plan = Plan.of_units(units, corpus="synthetic", settings={"synthetic": True})
    storage.atomic_write_text(storage.join(root, PLAN_NAME), plan.to_json())
    infos = []
    for unit, windows in zip(units, per_unit, strict=True):
        info = write_shard(root, windows, codec=codec, unit=unit_key(unit.unit, plan, unit.sha256))
        mark_done(root, info)
        infos.append(info)
    tokenizer_file = b'{"synthetic": true}'
    storage.atomic_write_bytes(storage.join(root, "tokenizer", "tokenizer.json"), tokenizer_file)
    write_manifest(root, Manifest(
        format_version=FORMAT_VERSION, created_at=utc_timestamp(),
        teacher=TeacherInfo(name_or_path="teacher", config_sha256="c" * 64, weights_sha256="d" * 64),
        tokenizer=TokenizerInfo(sha256=tokenizer_sha256, files={"tokenizer.json": storage.sha256_bytes(tokenizer_file)}),
        vocab_size=codec.vocab_size,
        padded_vocab_size=codec.vocab_size + 20, token_dtype=token_dtype_for(codec.vocab_size),
        sparsify=sparsify_info_for(codec, temperature=temperature, threshold=0.9, mean_ids=codec.k / 2),
        vocab_table=VocabTableInfo(path=path, sha256=table_sha, sample_tokens=int(codec.table.sample_tokens)),
        plan=PlanInfo(sha256=plan.sha256, num_units=len(infos), corpus="synthetic", max_length=max_length),
        shards=infos, stats={"capture_seconds": 1.5}))
    return ShardSet(root)


def unit_key(unit: int, plan=None, unit_sha256: str | None = None):
    """The ``UnitKey`` a worker is handed for ``unit`` of ``plan``, or of no plan (a test that writes one
    unit's output without planning a corpus)."""
    from raydistill.contracts.units import UnitKey, unplanned_unit

    if plan is None:
        return unplanned_unit(unit)
    return UnitKey(unit=unit, unit_sha256=unit_sha256, plan_sha256=plan.sha256)


def text_corpus(path, num_docs: int = 36) -> str:
    """A small jsonl corpus of real documents of varied lengths (the shape `raydistill select` writes)."""
    return write_jsonl_corpus(path, num_docs, base_chars=300, step_chars=50)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)


def teacher_processes(actor_class: str = "TeacherWorker") -> list[psutil.Process]:
    """This test process's Ray workers that host an ``actor_class`` actor (Ray titles them ``ray::<class>``)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if actor_class in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # exited while we looked
            pass
    return found


def die_after_first_upload(monkeypatch, fs, crash: type[BaseException]) -> list:
    """Make ``fs`` upload its first file, then raise ``crash`` (a writer killed mid-upload); returns the
    list of uploaded paths."""
    real_put, uploaded = type(fs).put_file, []

    def put_file(self, lpath, rpath, **kwargs):
        if uploaded:
            raise crash
        uploaded.append(rpath)
        return real_put(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(type(fs), "put_file", put_file)
    return uploaded
