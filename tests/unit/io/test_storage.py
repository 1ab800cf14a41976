"""Atomic writes: a crash mid-write never leaves a partial file or directory under the final name."""

from __future__ import annotations

import json
import os

import fsspec
import pytest
from support import die_after_first_upload

from raydistill.io import storage


class Crash(Exception):
    """Stands in for a process dying mid-write."""


def _fill(directory: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


OLD = {"config.json": b"{}", "model.safetensors": b"old weights"}
NEW = {"config.json": b'{"new": 1}', "model.safetensors": b"new weights!", "sub/tokenizer.json": b"tok"}


def _read_all(fs, root: str) -> dict[str, bytes]:
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root) if not p.endswith(storage.COMPLETE_NAME)}


def test_atomic_write_bytes_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    url = str(tmp_path / "results.csv")
    storage.atomic_write_text(url, "old")
    fs, _ = storage.filesystem(url)
    monkeypatch.setattr(type(fs), "mv", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        storage.atomic_write_text(url, "new")
    assert os.listdir(tmp_path) == ["results.csv"] and storage.read_text(url) == "old"


def test_local_dir_appears_whole_with_its_marker(tmp_path):
    dest = str(tmp_path / "out" / "model")
    with storage.atomic_dir(dest) as staging:
        assert not os.path.exists(dest)  # filled beside the final name, not under it
        _fill(staging, NEW)
    marker = json.loads(open(os.path.join(dest, storage.COMPLETE_NAME)).read())
    assert sorted(marker["files"]) == sorted(NEW)
    assert marker["files"]["model.safetensors"]["size"] == len(NEW["model.safetensors"])
    assert storage.dir_complete(dest) and os.listdir(tmp_path / "out") == ["model"]


def test_local_crash_mid_fill_keeps_the_earlier_version(tmp_path):
    dest = str(tmp_path / "model")
    with storage.atomic_dir(dest) as staging:
        _fill(staging, OLD)
    with pytest.raises(Crash), storage.atomic_dir(dest) as staging:
        _fill(staging, {"config.json": NEW["config.json"]})  # the first file lands, then the writer dies
        raise Crash
    fs, root = storage.filesystem(dest)
    assert _read_all(fs, root) == OLD and storage.dir_complete(dest)
    assert os.listdir(tmp_path) == ["model"]  # no temporary left beside it


def test_local_kill_between_the_renames_is_repaired_by_the_next_writer(tmp_path, monkeypatch):
    dest = str(tmp_path / "model")
    with storage.atomic_dir(dest) as staging:
        _fill(staging, OLD)
    real_rename, calls = os.rename, []

    def rename(src, dst):  # the old version goes aside, then the process is killed
        calls.append(src)
        if len(calls) == 2:
            raise Crash
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash), storage.atomic_dir(dest) as staging:
        _fill(staging, NEW)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not os.path.exists(dest) and not storage.dir_complete(dest)  # absent, never half there

    with pytest.raises(Crash), storage.atomic_dir(dest):  # the next writer puts the old one back first
        assert storage.dir_complete(dest)
        raise Crash
    fs, root = storage.filesystem(dest)
    assert _read_all(fs, root) == OLD and os.listdir(tmp_path) == ["model"]


def test_object_store_crash_mid_upload_leaves_no_finished_dir(monkeypatch):
    dest = "memory://atomic-dir-test/run/model"
    fs, root = storage.filesystem(dest)
    with storage.atomic_dir(dest) as staging:
        _fill(staging, OLD)
    assert storage.dir_complete(dest) and _read_all(fs, root) == OLD

    uploaded = die_after_first_upload(monkeypatch, fs, Crash)
    with pytest.raises(Crash), storage.atomic_dir(dest) as staging:
        _fill(staging, NEW)
    assert len(uploaded) == 1
    assert not storage.dir_complete(dest)  # no marker: readers treat it as absent
    assert not [p for p in fs.find(root) if ".tmp-" in p]

    monkeypatch.undo()  # the writer is back to normal
    with storage.atomic_dir(dest) as staging:
        _fill(staging, NEW)
    assert storage.dir_complete(dest) and _read_all(fs, root) == NEW
    fs.rm(root.rsplit("/", 2)[0], recursive=True)


def test_dir_complete_refuses_a_missing_marker_or_a_file_of_another_size(tmp_path):
    dest = str(tmp_path / "model")
    _fill(dest, OLD)  # written the old way: no marker
    assert not storage.dir_complete(dest) and not storage.dir_complete(str(tmp_path / "absent"))
    with storage.atomic_dir(dest) as staging:
        _fill(staging, OLD)
    assert storage.dir_complete(dest)
    _fill(dest, {"model.safetensors": b"truncated"})
    assert not storage.dir_complete(dest)
    fsspec.filesystem("file").pipe_file(os.path.join(dest, storage.COMPLETE_NAME), b"not json")
    assert not storage.dir_complete(dest)
