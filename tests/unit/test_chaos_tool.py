"""tools/chaos.py counts honestly: a record counts only if its test passed, and a test that failed
before recording still counts as a case tried and not ok."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("chaos_tool", ROOT / "tools" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.reliability.test_faults" name="test_a[x]"/>
<testcase classname="tests.reliability.test_faults" name="test_b"><failure message="AssertionError: tokens">x</failure></testcase>
<testcase classname="tests.reliability.test_faults" name="test_c"><error message="fixture broke">x</error></testcase>
<testcase classname="tests.reliability.test_faults" name="test_d"><skipped message="needs root"/></testcase>
<testcase classname="tests.reliability.test_bad_inputs" name="test_many"/>
<testcase classname="" name="tests.reliability.test_corruption"><error message="collection failure"/></testcase>
</testsuite></testsuites>"""


def test_records_are_checked_against_the_tests_and_silent_failures_count(tmp_path):
    chaos = load_tool()
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    log = tmp_path / "cases.jsonl"
    lines = [
        {"kind": "fault", "case": "a", "ok": True, "test": "tests/reliability/test_faults.py::test_a[x]",
         "tokens_lost": 0, "units_duplicated": 0},
        # ok as recorded, but its test then failed an assert: not survived
        {"kind": "fault", "case": "b", "ok": True, "test": "tests/reliability/test_faults.py::test_b",
         "tokens_lost": 3, "units_duplicated": 1},
        *({"kind": "bad_input", "case": f"in{i}", "ok": i != 2, "test": "tests/reliability/test_bad_inputs.py::test_many"}
          for i in range(5)),
    ]
    log.write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"kind\": \"fau")  # a line cut by a kill
    cases, skipped = chaos.collect(chaos.read_records(log), chaos.read_junit(junit))
    result = chaos.summarize(cases, skipped, exit_code=1, seconds=2.0, quick=True)
    assert result["faults_injected"] == 3  # a, b, and c (errored before recording)
    assert result["faults_survived"] == 1
    assert result["cases_unmeasured"] == 1  # c measured nothing
    assert result["tokens_lost"] == 3 and result["units_duplicated"] == 1
    assert result["bad_inputs_tried"] == 5 and result["clear_errors"] == 4
    assert result["corruptions_tried"] == 1 and result["corruptions_caught"] == 0  # the module did not import
    assert result["skipped"] == 1 and [c.case for c in skipped] == ["test_d"]
    assert result["targets_met"] is False


def test_without_any_pytest_result_nothing_counts_as_ok(tmp_path):
    chaos = load_tool()
    records = [{"kind": "fault", "case": "a", "ok": True, "test": "tests/reliability/test_faults.py::test_a",
                "tokens_lost": 0, "units_duplicated": 0}]
    cases, skipped = chaos.collect(records, chaos.read_junit(tmp_path / "absent.xml"))
    result = chaos.summarize(cases, skipped, exit_code=2, seconds=1.0, quick=False)
    assert result["faults_injected"] == 1 and result["faults_survived"] == 0 and not result["targets_met"]
