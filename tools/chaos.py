"""Reliability run: the fault, corruption and bad-input cases of tests/reliability/, injected and counted.

Usage: python tools/chaos.py [--quick] [--log FILE] [--timeout S] [-- extra pytest arguments]

Runs ``python -m pytest tests/reliability -q -p no:cacheprovider`` (under --quick with ``-m "quick or not
slow"``: the cases marked ``quick`` plus those that start no Ray, a few minutes; by default every case,
the slow ones included) with
``RAYDISTILL_CHAOS_LOG`` pointing at a file where every case appends one JSON line through the
``chaos_record`` fixture: ``{"kind": "fault" | "corruption" | "bad_input", "case", "ok", "test", ...figures}``.

Counting is honest: a record's ``ok`` counts only if its test also passed (pytest's JUnit XML is
read back), and a test that failed or errored before recording anything still counts, as one case
tried and not ok, of the kind its file names (test_faults → fault, test_corruption → corruption,
test_bad_inputs → bad_input); if a test that recorded several cases fails, all of them count as
failed. Skipped tests are listed, not counted. Prints a table of the cases by kind and, as its last
line, one JSON object: faults_injected, faults_survived, corruptions_tried, corruptions_caught,
bad_inputs_tried, clear_errors, tokens_lost, units_duplicated (summed over the fault cases that
measured them), cases_unmeasured (fault cases that failed before measuring), skipped,
pytest_exit_code, seconds, quick, and targets_met (every target of docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_ENV = "RAYDISTILL_CHAOS_LOG"
KINDS = ("fault", "corruption", "bad_input")
KIND_OF_FILE = {"test_faults": "fault", "test_corruption": "corruption", "test_bad_inputs": "bad_input",
                "test_bad_input": "bad_input"}
MIN_BAD_INPUTS = 40  # the target: clear_errors = bad_inputs_tried >= 40
QUICK = "quick or not slow"  # --quick: the marked cheap cases, and every case that starts no Ray


@dataclass
class Case:
    kind: str
    case: str
    test: str
    ok: bool
    outcome: str  # the test's: passed, failed, error, skipped, missing (no result at all)
    figures: dict = field(default_factory=dict)
    note: str = ""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="only the cases marked `quick` and those not `slow` (for CI; a few minutes)")
    p.add_argument("--log", default=None, help="keep the JSON-lines case log here (default: a temporary file)")
    p.add_argument("--timeout", type=float, default=None, help="stop pytest after this many seconds")
    args, extra = p.parse_known_args(argv)
    return args, [a for a in extra if a != "--"]


def nodeid_key(nodeid: str) -> tuple[str, str]:
    """A pytest node id as JUnit XML names it: (classname, name)."""
    path, *rest = nodeid.split("::")
    module = path.removesuffix(".py").replace("/", ".")
    return ".".join([module, *rest[:-1]]), rest[-1] if rest else ""


def kind_of(classname: str) -> str:
    module = classname.split(".")
    for part in reversed(module):
        if part in KIND_OF_FILE:
            return KIND_OF_FILE[part]
    return "other"


def read_junit(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(classname, name) → (outcome, message) for every test case pytest reported."""
    if not path.exists() or path.stat().st_size == 0:
        return {}
    out = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or (child.text or "")).strip().splitlines()[0:1]
                message = message[0][:160] if message else ""
                break
        out[(tc.get("classname", ""), tc.get("name", ""))] = (outcome, message)
    return out


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a case killed mid-line: its test's result still counts it
                continue
    return records


def collect(records: list[dict], junit: dict[tuple[str, str], tuple[str, str]]) -> tuple[list[Case], list[Case]]:
    """The cases (records checked against their tests' results, plus tests that failed without recording)
    and the skipped tests."""
    cases, recorded = [], set()
    for r in records:
        key = nodeid_key(str(r.get("test", "")))
        recorded.add(key)
        outcome, message = junit.get(key, ("missing", "no result from pytest")) if junit else ("missing", "")
        figures = {k: v for k, v in r.items() if k not in ("kind", "case", "ok", "test")}
        ok = bool(r.get("ok")) and outcome == "passed"
        note = "" if outcome == "passed" else f"test {outcome}: {message}"
        cases.append(Case(str(r.get("kind")), str(r.get("case")), str(r.get("test")), ok, outcome, figures, note))
    skipped = []
    for key, (outcome, message) in sorted(junit.items()):
        if key in recorded:
            continue
        classname, name = key
        test = f"{classname}::{name}" if name else classname
        if outcome == "skipped":
            skipped.append(Case(kind_of(classname), name, test, False, outcome, note=message))
        elif outcome in ("failed", "error"):  # failed before it could record: tried, not ok
            # a collection error is reported with an empty classname and the module as its name
            cases.append(Case(kind_of(f"{classname}.{name}"), name, test, False, outcome,
                              note=f"test {outcome} before recording: {message}"))
    return cases, skipped


def _count(value) -> int | None:
    """A figure as a count, or None when it was not measured (absent, negative, not a number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def summarize(cases: list[Case], skipped: list[Case], *, exit_code: int, seconds: float, quick: bool) -> dict:
    by_kind = defaultdict(list)
    for c in cases:
        by_kind[c.kind].append(c)
    faults = by_kind["fault"]
    measured = [c for c in faults if _count(c.figures.get("tokens_lost")) is not None
                and _count(c.figures.get("units_duplicated")) is not None]
    result = {
        "faults_injected": len(faults),
        "faults_survived": sum(c.ok for c in faults),
        "corruptions_tried": len(by_kind["corruption"]),
        "corruptions_caught": sum(c.ok for c in by_kind["corruption"]),
        "bad_inputs_tried": len(by_kind["bad_input"]),
        "clear_errors": sum(c.ok for c in by_kind["bad_input"]),
        "tokens_lost": sum(_count(c.figures["tokens_lost"]) for c in measured),
        "units_duplicated": sum(_count(c.figures["units_duplicated"]) for c in measured),
        "cases_unmeasured": len(faults) - len(measured),
        "other_cases": sum(len(v) for k, v in by_kind.items() if k not in KINDS),
        "skipped": len(skipped),
        "pytest_exit_code": exit_code,
        "seconds": round(seconds, 1),
        "quick": quick,
    }
    result["targets_met"] = (
        exit_code == 0 and result["faults_injected"] > 0 and result["faults_survived"] == result["faults_injected"]
        and result["corruptions_caught"] == result["corruptions_tried"]
        and result["clear_errors"] == result["bad_inputs_tried"]
        and (quick or result["bad_inputs_tried"] >= MIN_BAD_INPUTS)
        and result["tokens_lost"] == 0 and result["units_duplicated"] == 0 and result["cases_unmeasured"] == 0
    )
    return result


FIGURE_COLUMNS = ("tokens_lost", "units_duplicated", "torn_files")


def print_table(cases: list[Case], skipped: list[Case]) -> None:
    rows = [(c.kind, c.case, "ok" if c.ok else "FAILED", *(str(c.figures.get(k, "")) for k in FIGURE_COLUMNS),
             c.note) for c in sorted(cases, key=lambda c: (KINDS.index(c.kind) if c.kind in KINDS else 9, c.case))]
    rows += [(c.kind, c.case, "skipped", "", "", "", c.note) for c in skipped]
    header = ("kind", "case", "result", *FIGURE_COLUMNS, "note")
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        return
    table = Table(title="reliability cases")
    for name in header:
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(*(Text(str(v)) for v in r))  # plain text: a test id's "[param]" is not rich markup
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raydistill-chaos-") as tmp:
        log = Path(args.log) if args.log else Path(tmp) / "cases.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "junit_family=xunit2", "-m", QUICK if args.quick else "", *extra]  # "": every case, also the `extended` ones plain pytest leaves out
        print("$ " + shlex.join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        try:
            code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, LOG_ENV: str(log)}, timeout=args.timeout,
                                  stdout=sys.stderr).returncode  # pytest's own report goes to stderr
        except subprocess.TimeoutExpired:
            code = 124
        seconds = time.perf_counter() - t0
        cases, skipped = collect(read_records(log), read_junit(junit))
    print_table(cases, skipped)
    print(json.dumps(summarize(cases, skipped, exit_code=code, seconds=seconds, quick=args.quick)))


if __name__ == "__main__":
    main()
