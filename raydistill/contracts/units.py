"""Completion records of work units: the one helper every unit stage (capture, select) marks work done with.

A unit's output (a shard, a scores file) is written atomically first; only then is its record
``done/unit-NNNNNN.json`` written, also atomically. So a record always names a whole file, and
a crash between the two writes just redoes the unit. The record carries the output's size and
sha256, so a reader can check that the file it finds is the one the record describes.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from raydistill.errors import ShardError
from raydistill.io import storage

__all__ = [
    "DONE_DIR",
    "RelativePath",
    "UnitRecord",
    "completion_url",
    "describe_validation",
    "inside_root",
    "mark_done",
    "read_completions",
    "remove_stale_temporaries",
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


class UnitRecord(BaseModel):
    """One unit's output file: which unit made it and what a reader must find in it."""

    model_config = ConfigDict(extra="forbid")

    unit: int = Field(ge=0)
    path: RelativePath = Field(description="relative to the output's root, inside it")
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256_PATTERN)


def describe_validation(err: ValidationError) -> str:
    """Pydantic's report as one line: ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())


def completion_url(root: str, unit: int) -> str:
    return storage.join(root, DONE_DIR, f"unit-{unit:06d}.json")


def write_unit_output(root: str, relpath: str, data: bytes, *, unit: int, rows: int, tokens: int) -> UnitRecord:
    """Write one unit's output file atomically and describe it; the caller then calls :func:`mark_done`."""
    storage.atomic_write_bytes(storage.join(root, relpath), data)
    return UnitRecord(unit=unit, path=relpath, rows=rows, tokens=tokens, bytes=len(data),
                      sha256=storage.sha256_bytes(data))


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
