"""A rerun trusts a completion record only when it belongs to its plan and its shard is there: the cases a
user meets by copying, deleting or pointing one capture at another's output.

Each case copies the session's capture, changes it as a user might, reruns the same capture (or another
one) and checks what the rerun did: redid exactly the units it could not trust, refused what it must not
mix, and left a set that verifies with shards byte-identical to the original capture's.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from support import capture_config, run_cli, write_config, write_jsonl_corpus

from raydistill.contracts.shards import read_manifest, verify_shard_set
from raydistill.stages.capture.run import run_capture


def _shard_bytes(root: str) -> dict[str, bytes]:
    folder = os.path.join(root, "shards")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture
def copy_of(captured, tmp_path):
    root = str(tmp_path / "set")
    shutil.copytree(captured, root)
    return root


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory) -> str:
    return write_jsonl_corpus(tmp_path_factory.mktemp("other") / "other.jsonl", 10, base_chars=200, step_chars=40)


@pytest.fixture(scope="module")
def other_capture(tiny_teacher, other_corpus, ray_session, tmp_path_factory) -> str:
    """A capture of another corpus with the same teacher and settings: its records are foreign to ours."""
    out = str(tmp_path_factory.mktemp("other-set") / "set")
    run_capture(capture_config(tiny_teacher, other_corpus, out), progress=False)
    return out


def _rerun(tiny_teacher, tiny_corpus, root: str) -> dict:
    return run_capture(capture_config(tiny_teacher, tiny_corpus, root), progress=False).stats


def test_a_record_and_shard_copied_from_another_capture_are_redone(copy_of, captured, other_capture, tiny_teacher,
                                                                    tiny_corpus, chaos_record):
    for name in ("shards/unit-000001.parquet", "done/unit-000001.json"):
        shutil.copy(os.path.join(other_capture, name), os.path.join(copy_of, name))
    stats = _rerun(tiny_teacher, tiny_corpus, copy_of)
    ok = (stats["units_this_run"] == 1 and verify_shard_set(copy_of) == []
          and _shard_bytes(copy_of) == _shard_bytes(captured))
    chaos_record("fault", "record-copied-from-another-capture", ok, tokens_lost=0 if ok else -1, units_duplicated=0)
    assert stats["units_this_run"] == 1
    assert verify_shard_set(copy_of) == []
    assert _shard_bytes(copy_of) == _shard_bytes(captured)


def test_a_deleted_shard_is_redone_and_the_manifest_lists_it_again(copy_of, captured, tiny_teacher, tiny_corpus,
                                                                   capsys):
    os.remove(os.path.join(copy_of, "shards", "unit-000000.parquet"))
    code, _, err = run_cli(capsys, "inspect", copy_of)  # its advice must be what repairs the set
    assert code == 2 and "missing; re-run capture to rewrite unit 0" in err
    stats = _rerun(tiny_teacher, tiny_corpus, copy_of)
    assert stats["units_this_run"] == 1
    assert verify_shard_set(copy_of) == [] and _shard_bytes(copy_of) == _shard_bytes(captured)
    assert read_manifest(copy_of).total_tokens == read_manifest(captured).total_tokens


def test_a_lost_plan_is_rebuilt_when_the_records_are_this_captures(copy_of, captured, tiny_teacher, tiny_corpus):
    """The plan is a pure function of corpus and settings: records of the same plan stay trusted."""
    os.remove(os.path.join(copy_of, "plan.json"))
    stats = _rerun(tiny_teacher, tiny_corpus, copy_of)
    assert stats["units_this_run"] == 0 and verify_shard_set(copy_of) == []
    assert open(os.path.join(copy_of, "plan.json")).read() == open(os.path.join(captured, "plan.json")).read()


def test_another_corpus_into_an_output_that_lost_its_plan_is_refused(copy_of, other_corpus, tiny_teacher, tmp_path,
                                                                     capsys, chaos_record):
    """Corpus B captured into A's output after A's plan.json was deleted: refused before any work, nothing changed."""
    os.remove(os.path.join(copy_of, "plan.json"))
    before = _shard_bytes(copy_of)
    config = write_config(tmp_path, **capture_config(tiny_teacher, other_corpus, copy_of).model_dump(mode="json"))
    code, _, err = run_cli(capsys, "capture", config)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    ok = (code == 2 and len(lines) == 1 and "has no plan.json but holds" in lines[0]
          and not os.path.exists(os.path.join(copy_of, "plan.json")) and _shard_bytes(copy_of) == before)
    chaos_record("bad_input", "capture-into-another-captures-output-without-plan", ok)
    assert code == 2 and len(lines) == 1, err
    assert "has no plan.json but holds" in lines[0] and "done/unit-" in lines[0]
    assert not os.path.exists(os.path.join(copy_of, "plan.json")) and _shard_bytes(copy_of) == before


def test_records_of_an_older_format_are_not_trusted(copy_of, captured, tiny_teacher, tiny_corpus):
    """Records without a plan hash (before format 1.2) say nothing about which plan wrote them: redone."""
    record = os.path.join(copy_of, "done", "unit-000000.json")
    data = json.load(open(record))
    del data["plan_sha256"], data["unit_sha256"]
    json.dump(data, open(record, "w"))
    stats = _rerun(tiny_teacher, tiny_corpus, copy_of)
    assert stats["units_this_run"] == 1 and verify_shard_set(copy_of) == []
    assert _shard_bytes(copy_of) == _shard_bytes(captured)
