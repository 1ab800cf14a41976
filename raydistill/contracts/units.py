"""Completion records of work units: the one helper every unit stage (capture, select) marks work done with.

A unit's output (a shard, a scores file) is written atomically first; only then is its record
``done/unit-NNNNNN.json`` written, also atomically. So a record always names a whole file, and
a crash between the two writes just redoes the unit. The record carries the output's size and
sha256, so a reader can check that the file it finds is the one the record describes, and the
plan's hash and the unit's content hash (:class:`UnitKey`), so a record is trusted only by the
plan that made it: one copied in from another capture, or one whose file is gone or of another
size, is set aside and its unit redone (:func:`trusted_completions`), never absorbed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from raydistill.errors import ShardError
from raydistill.io import storage

__all__ = [
    "DONE_DIR",
    "RelativePath",
    "UnitKey",
    "UnitRecord",
    "Untrusted",
    "completion_url",
    "describe_validation",
    "inside_root",
    "mark_done",
    "read_completions",
    "remove_stale_temporaries",
    "trusted_completions",
    "unplanned_unit",
    "write_unit_output",
]

log = logging.getLogger(__name__)

DONE_DIR = "done"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_UNIT_FILE = re.compile(r"^unit-(\d{6,})\.json$")


def inside_root(path: str) -> str:
    """``path`` if it names a file *inside* the root it is relative to, else ValueError: every path read
    from a stored file (a manifest, a plan, a completion record) is checked so, and none can reach
    outside the set (``../``, an absolute path, a URL, a Windows separator)."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "://" in path or "\\" in path or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"path {path!r} must be a relative path inside the set (no '..', no leading '/', no URL)")
    return path


RelativePath = Annotated[str, AfterValidator(inside_root)]


class UnitKey(BaseModel):
    """Which unit of which plan a worker is running: the unit's index, its content hash as the plan
    gives it (``WorkUnit.sha256``) and the plan's hash. Its output and record carry all three."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: int = Field(ge=0)
    unit_sha256: str = Field(pattern=SHA256_PATTERN)
    plan_sha256: str = Field(pattern=SHA256_PATTERN)


def unplanned_unit(unit: int) -> UnitKey:
    """The key of a unit run outside any plan (benchmarks, tests): all-zero hashes, which no real plan
    has, so no run ever trusts its output as one of its own units."""
    return UnitKey(unit=unit, unit_sha256="0" * 64, plan_sha256="0" * 64)


class UnitRecord(BaseModel):
    """One unit's output file: which unit of which plan made it and what a reader must find in it.

    ``plan_sha256`` / ``unit_sha256`` are None only in records written before format 1.2; a
    rerun never trusts those (their units are redone), readers of finished sets still accept them.
    """

    model_config = ConfigDict(extra="forbid")

    unit: int = Field(ge=0)
    plan_sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    unit_sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    path: RelativePath = Field(description="relative to the output's root, inside it")
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256_PATTERN)
    # What the worker read (format 1.3; None before): the documents its slice gave, the hash of their ids in
    # order (the unit's content, computed where it was read), and the records it dropped, by reason.
    documents: int | None = Field(None, ge=0)
    content_sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    skipped: dict[str, int] | None = None


def describe_validation(err: ValidationError) -> str:
    """Pydantic's report as one line: ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())


def completion_url(root: str, unit: int) -> str:
    return storage.join(root, DONE_DIR, f"unit-{unit:06d}.json")


def write_unit_output(root: str, relpath: str, data: bytes, *, unit: UnitKey, rows: int, tokens: int) -> UnitRecord:
    """Write one unit's output file atomically and describe it; the caller then calls :func:`mark_done`."""
    storage.atomic_write_bytes(storage.join(root, relpath), data)
    return UnitRecord(unit=unit.unit, plan_sha256=unit.plan_sha256, unit_sha256=unit.unit_sha256, path=relpath,
                      rows=rows, tokens=tokens, bytes=len(data), sha256=storage.sha256_bytes(data))


def mark_done(root: str, record: UnitRecord) -> None:
    """Mark ``record.unit`` done; call only after its output file is durably written."""
    storage.atomic_write_text(completion_url(root, record.unit), record.model_dump_json() + "\n")


def read_completions(root: str) -> dict[int, UnitRecord]:
    """Every completion record under ``root/done``, keyed by unit."""
    done = storage.join(root, DONE_DIR)
    out: dict[int, UnitRecord] = {}
    for name in storage.list_files(done, ".json"):
        match = _UNIT_FILE.match(name)
        if not match:
            continue
        url = storage.join(done, name)
        try:
            record = UnitRecord.model_validate_json(storage.read_bytes(url))
        except ValidationError as err:
            raise ShardError(
                f"completion record {url} is invalid ({describe_validation(err)}); delete it to redo the unit"
            ) from None
        if record.unit != int(match.group(1)):
            raise ShardError(f"completion record {url} is for unit {record.unit}; delete it to redo the unit")
        out[record.unit] = record
    return out


@dataclass(frozen=True)
class Untrusted:
    """A completion record a rerun sets aside (its unit is redone), and why."""

    url: str
    reason: str
    foreign: bool  # written for another plan (or a unit this plan does not have), not just stale


def _sizes(root: str, relpaths: set[str]) -> dict[str, int]:
    """Size of every file in the folders of ``relpaths``: one listing per folder, not one call per
    file, so checking ten thousand records on an object store costs a few requests."""
    sizes: dict[str, int] = {}
    for folder in sorted({p.rsplit("/", 1)[0] if "/" in p else "" for p in relpaths}):
        fs, path = storage.filesystem(storage.join(root, folder) if folder else root)
        if not fs.exists(path):
            continue
        for entry in fs.ls(path, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "file":
                sizes[f"{folder}/{name}" if folder else name] = int(entry["size"])
    return sizes


def _distrust(record: UnitRecord, plan_sha256: str, unit_sha256: dict[int, str], sizes: dict[str, int]
              ) -> tuple[str, bool] | None:
    """Why ``record`` cannot be trusted by this plan, and whether it is foreign (another plan's); None if it can."""
    if record.unit not in unit_sha256:
        return f"unit {record.unit} is not in this plan ({len(unit_sha256)} units)", True
    if record.plan_sha256 != plan_sha256:
        return (f"written for another plan ({(record.plan_sha256 or 'none, format < 1.2')[:12]}; this one is "
                f"{plan_sha256[:12]})"), True
    if record.unit_sha256 != unit_sha256[record.unit]:
        return "written for other documents than this plan's unit", True
    if record.path not in sizes:
        return f"its file {record.path} is missing", False
    if sizes[record.path] != record.bytes:
        return f"its file {record.path} has {sizes[record.path]} bytes, the record says {record.bytes}", False
    return None


def trusted_completions(root: str, plan_sha256: str, unit_sha256: dict[int, str]
                        ) -> tuple[dict[int, UnitRecord], list[Untrusted]]:
    """The completion records under ``root`` a run of this plan may skip units for, and the others.

    A record is trusted only when it was written for this plan (its plan hash), for this unit's
    documents (its unit hash, ``unit_sha256[unit]``), and its output file is on storage with the
    recorded size. Everything else (a record copied from another capture, one of an older format,
    one whose file was deleted or truncated) is returned with the reason, for the caller to redo.
    The recorded sha256 is checked by every reader of the file (``verify``, training, ``select``).
    """
    records = read_completions(root)
    sizes = _sizes(root, {r.path for r in records.values()})
    trusted, untrusted = {}, []
    for unit, record in sorted(records.items()):
        why = _distrust(record, plan_sha256, unit_sha256, sizes)
        if why is None:
            trusted[unit] = record
        else:
            untrusted.append(Untrusted(completion_url(root, unit), *why))
    return trusted, untrusted


def remove_stale_temporaries(root: str, subdirs: tuple[str, ...]) -> int:
    """Delete the ``*.tmp-*`` files a killed writer left in ``root``, its ``subdirs`` and ``done/``.

    A temporary is never valid data (the rename that would have made it a file never
    happened), and ``raydistill verify`` reports any it finds. Only safe while no other
    run writes to ``root``, hence called at the start and at the end of a run.
    """
    removed = 0
    for folder in (root, *(storage.join(root, d) for d in (*subdirs, DONE_DIR))):
        fs, path = storage.filesystem(folder)
        if not fs.exists(path):
            continue
        for entry in fs.ls(path, detail=False):
            if ".tmp-" in entry.rstrip("/").rsplit("/", 1)[-1]:
                fs.rm(entry)
                removed += 1
    if removed:
        log.warning("removed %d temporary files left by interrupted writes in %s", removed, root)
    return removed
