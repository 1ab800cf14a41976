"""The corruption matrix: a real captured set damaged one way at a time; ``raydistill verify`` names the file
and the reason, and ``raydistill train`` refuses to start on it with the same words, before any worker.

Every case copies the session's capture, damages the copy, and runs both commands through the CLI.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import run_cli, write_config, write_synthetic_set

from raydistill.contracts.shards import Codec, VocabTable, read_manifest


def _shard(root: str, unit: int) -> str:
    return os.path.join(root, "shards", f"unit-{unit:06d}.parquet")


def _truncate(root: str, seed: int) -> tuple[str, str]:
    path = _shard(root, 0)
    size = os.path.getsize(path)
    cut = random.Random(seed).randrange(1, size)
    with open(path, "r+b") as f:
        f.truncate(cut)
    return path, "truncated or replaced"


def _flip_page_byte(root: str) -> tuple[str, str]:
    """One byte flipped inside the first data page of the ``ids`` column: size unchanged."""
    path = _shard(root, 0)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    column = next(meta.column(c) for c in range(meta.num_columns) if meta.column(c).path_in_schema == "ids")
    offset = column.data_page_offset + column.total_compressed_size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))
    return path, "sha256 does not match"


def _delete_shard(root: str) -> tuple[str, str]:
    os.remove(_shard(root, 1))
    return _shard(root, 1), "missing"


def _extra_file(root: str) -> tuple[str, str]:
    path = os.path.join(root, "shards", "unit-999999.parquet")
    shutil.copy(_shard(root, 0), path)
    return path, "not listed in the manifest"


def _edit_manifest(root: str) -> tuple[str, str]:
    path = os.path.join(root, "manifest.json")
    data = json.load(open(path))
    data["shards"][0]["tokens"] += 1
    json.dump(data, open(path, "w"))
    return _shard(root, 0), "the manifest says"


def _edit_plan(root: str) -> tuple[str, str]:
    path = os.path.join(root, "plan.json")
    data = json.load(open(path))
    data["units"][0]["sha256"] = "0" * 64
    json.dump(data, open(path, "w"))
    return path, "does not hash to its own sha256"


def _delete_plan(root: str) -> tuple[str, str]:
    os.remove(os.path.join(root, "plan.json"))
    return os.path.join(root, "plan.json"), "missing"


def _mix_another_capture(root: str, other: str) -> tuple[str, str]:
    """Unit 0's shard and record replaced by another set's (its record and the manifest entry then differ)."""
    shutil.copy(_shard(other, 0), _shard(root, 0))
    shutil.copy(os.path.join(other, "done", "unit-000000.json"), os.path.join(root, "done", "unit-000000.json"))
    return _shard(root, 0), "manifest"


def _swap_vocab_table(root: str, other: str) -> tuple[str, str]:
    shutil.copy(os.path.join(other, "vocab.parquet"), os.path.join(root, "vocab.parquet"))
    return os.path.join(root, "vocab.parquet"), "sha256"


def _delete_tokenizer(root: str) -> tuple[str, str]:
    shutil.rmtree(os.path.join(root, "tokenizer"))
    return os.path.join(root, "tokenizer"), "missing"


def _edit_tokenizer(root: str) -> tuple[str, str]:
    path = os.path.join(root, "tokenizer", "tokenizer_config.json")
    with open(path, "a") as f:
        f.write(" ")
    return path, "sha256 does not match"


def _delete_record(root: str) -> tuple[str, str]:
    os.remove(os.path.join(root, "done", "unit-000001.json"))
    return _shard(root, 1), "has no completion record"


CASES = {
    "truncated-shard-a": lambda root, other: _truncate(root, 1),
    "truncated-shard-b": lambda root, other: _truncate(root, 2),
    "truncated-shard-c": lambda root, other: _truncate(root, 3),
    "flipped-byte-in-a-column-page": lambda root, other: _flip_page_byte(root),
    "deleted-shard": lambda root, other: _delete_shard(root),
    "extra-unknown-file": lambda root, other: _extra_file(root),
    "manifest-edited": lambda root, other: _edit_manifest(root),
    "plan-edited": lambda root, other: _edit_plan(root),
    "plan-deleted": lambda root, other: _delete_plan(root),
    "shards-of-two-captures-mixed": _mix_another_capture,
    "vocab-table-swapped": _swap_vocab_table,
    "tokenizer-deleted": lambda root, other: _delete_tokenizer(root),
    "tokenizer-file-edited": lambda root, other: _edit_tokenizer(root),
    "completion-record-deleted": lambda root, other: _delete_record(root),
}


@pytest.fixture(scope="module")
def other_set(captured, tmp_path_factory) -> str:
    """Another shard set over the same vocabulary (other documents, other counts): what gets mixed in."""
    manifest = read_manifest(captured)
    rng = np.random.default_rng(5)
    vocab = manifest.vocab_size
    codec = Codec("topk", manifest.sparsify.k, vocab, VocabTable(rng.integers(0, 50, vocab)))
    from raydistill.contracts.shards import TargetWindow

    def window(doc: str) -> TargetWindow:
        n, k = 12, manifest.sparsify.k
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
        probs = np.full((n, k), 0.5 / k, np.float32)
        return TargetWindow(doc_id=doc, window=0, tokens=rng.integers(0, vocab, n), ids=ids, probs=probs,
                            tail=np.full(n, 0.5, np.float32))

    root = str(tmp_path_factory.mktemp("other") / "set")
    write_synthetic_set(root, [[window("other-a")], [window("other-b")]], codec)
    return root


QUICK = {"flipped-byte-in-a-column-page", "shards-of-two-captures-mixed", "plan-edited"}  # tools/chaos.py --quick


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.quick) if c in QUICK else c for c in CASES])
def test_verify_and_train_name_the_damage(case, captured, other_set, tmp_path, capsys, chaos_record):
    root = str(tmp_path / "set")
    shutil.copytree(captured, root)
    damaged, reason = CASES[case](root, other_set)

    code, out, _ = run_cli(capsys, "verify", root)
    failures = [line for line in out.splitlines() if line.startswith("FAIL ")]
    named = [line for line in failures if damaged in line and reason in line]

    student = str(tmp_path / "student")
    config = write_config(tmp_path, shards=root, output=student, student={"size": "micro"}, seq_len=32,
                          micro_batch_size=2, steps=2, num_workers=1)
    train_code, _, train_err = run_cli(capsys, "train", config)
    lines = [line for line in train_err.strip().splitlines() if line.strip()]
    refused = (train_code == 2 and len(lines) == 1 and damaged in lines[0] and reason in lines[0]
               and "Traceback" not in train_err and not os.path.exists(os.path.join(student, "ray")))
    chaos_record("corruption", case, code == 1 and bool(named) and refused)

    assert code == 1, out
    assert named, (damaged, reason, out)
    assert refused, train_err
