"""Completion records are trusted only by the plan that wrote them; plans hash to themselves."""

from __future__ import annotations

import json

import pytest

from raydistill.contracts.plan import PLAN_NAME, Plan, WorkUnit, read_plan, write_or_check_plan
from raydistill.contracts.units import (
    UnitKey,
    mark_done,
    read_completions,
    trusted_completions,
    unplanned_unit,
    write_unit_output,
)
from raydistill.errors import PlanMismatchError, ShardError
from raydistill.io import storage
from raydistill.io.slices import Slice


def _plan(units: int = 3, salt: str = "") -> Plan:
    return Plan.of_units([WorkUnit.of(u, Slice("mem/c.jsonl", "jsonl", "bytes", 2 * u, 2 * u + 2, f"salt={salt}", 2))
                          for u in range(units)], corpus="c", settings={"k": 4})


def _complete(root: str, plan: Plan, unit: int, data: bytes = b"shard bytes") -> None:
    key = UnitKey(unit=unit, unit_sha256=plan.units[unit].sha256, plan_sha256=plan.sha256)
    mark_done(root, write_unit_output(root, f"shards/unit-{unit:06d}.parquet", data, unit=key, rows=1, tokens=3))


def _trusted(root: str, plan: Plan):
    return trusted_completions(root, plan.sha256, {u.unit: u.sha256 for u in plan.units})


def test_records_of_this_plan_with_their_files_are_trusted(tmp_path):
    root, plan = str(tmp_path), _plan()
    for unit in range(3):
        _complete(root, plan, unit)
    trusted, untrusted = _trusted(root, plan)
    assert sorted(trusted) == [0, 1, 2] and untrusted == []
    assert trusted[1].plan_sha256 == plan.sha256 and trusted[1].unit_sha256 == plan.units[1].sha256


def test_another_plans_record_is_set_aside_as_foreign(tmp_path):
    root, plan, other = str(tmp_path), _plan(), _plan(salt="other corpus ")
    _complete(root, plan, 0)
    _complete(root, other, 1)  # a shard and record copied in from another capture
    trusted, untrusted = _trusted(root, plan)
    assert sorted(trusted) == [0]
    assert [(u.url.rsplit("/", 1)[-1], u.foreign) for u in untrusted] == [("unit-000001.json", True)]
    assert "another plan" in untrusted[0].reason


def test_a_record_for_other_documents_of_the_same_plan_hash_is_foreign(tmp_path):
    root, plan = str(tmp_path), _plan()
    key = UnitKey(unit=2, unit_sha256=plan.units[0].sha256, plan_sha256=plan.sha256)  # unit 0's documents
    mark_done(root, write_unit_output(root, "shards/unit-000002.parquet", b"x", unit=key, rows=1, tokens=1))
    _, untrusted = _trusted(root, plan)
    assert untrusted[0].foreign and "other documents" in untrusted[0].reason


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_record_whose_file_is_gone_or_shorter_is_set_aside_not_foreign(tmp_path, damage):
    root, plan = str(tmp_path), _plan()
    _complete(root, plan, 0)
    path = tmp_path / "shards" / "unit-000000.parquet"
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"shard")
    trusted, untrusted = _trusted(root, plan)
    assert trusted == {} and not untrusted[0].foreign
    assert ("missing" if damage == "deleted" else "the record says 11") in untrusted[0].reason


def test_records_outside_any_plan_are_never_trusted(tmp_path):
    root, plan = str(tmp_path), _plan()
    mark_done(root, write_unit_output(root, "shards/unit-000000.parquet", b"x", unit=unplanned_unit(0), rows=1,
                                      tokens=1))
    record = json.loads((tmp_path / "done" / "unit-000000.json").read_text())
    del record["plan_sha256"], record["unit_sha256"]  # a record written before format 1.2
    (tmp_path / "done" / "unit-000001.json").write_text(json.dumps({**record, "unit": 1}))
    trusted, untrusted = _trusted(root, plan)
    assert trusted == {} and len(untrusted) == 2 and all(u.foreign for u in untrusted)
    assert sorted(read_completions(root)) == [0, 1]  # still readable: verify and old readers accept them


def test_a_plan_hashes_to_itself_and_an_edited_one_is_refused(tmp_path):
    root, plan = str(tmp_path), _plan()
    assert write_or_check_plan(root, plan) is False and read_plan(root) == plan
    url = storage.join(root, PLAN_NAME)
    data = json.loads(storage.read_text(url))
    data["units"][1]["slice"]["stop"] = 7  # a slice edited under its old unit hash
    storage.atomic_write_text(url, json.dumps(data))
    with pytest.raises(ShardError, match="does not hash to its own sha256"):
        read_plan(root)
    data = json.loads(plan.to_json())
    data["units"][2]["sha256"] = "0" * 64  # a unit hash edited
    storage.atomic_write_text(url, json.dumps(data))
    with pytest.raises(ShardError, match="does not hash to its own sha256"):
        read_plan(root)
    assert write_or_check_plan(root, plan) is True  # same hash named: the rerun puts the true plan back
    assert read_plan(root) == plan


def test_a_different_plan_is_refused_and_an_unreadable_one_is_one_line(tmp_path):
    root = str(tmp_path)
    write_or_check_plan(root, _plan())
    with pytest.raises(PlanMismatchError, match=r"different corpus: file 'mem/c.jsonl' changed since that capture "
                       r"was planned \(salt= then, salt=b now\)"):
        write_or_check_plan(root, _plan(salt="b"))
    with pytest.raises(PlanMismatchError, match=r"different corpus: file 'mem/d.jsonl' is new since that capture was "
                       r"planned \(1 new, 1 gone\)"):
        write_or_check_plan(root, Plan.of_units([WorkUnit.of(0, Slice("mem/d.jsonl", "jsonl", "bytes", 0, 2, "", 2))],
                                                corpus="c", settings={"k": 4}))
    with pytest.raises(PlanMismatchError, match=r"different settings \(k\)"):
        write_or_check_plan(root, Plan.of_units(_plan().units, corpus="c", settings={"k": 5}))
    (tmp_path / PLAN_NAME).write_text("{not json")
    with pytest.raises(ShardError, match="is not a readable plan") as err:
        write_or_check_plan(root, _plan())
    assert "\n" not in str(err.value)
