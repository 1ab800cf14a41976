"""What a run left behind, next to an uninterrupted reference run: the figures every reliability case records.

A capture is deterministic on CPU (same corpus, teacher and settings: same bytes), so a faulted
capture, once rerun, must equal its reference shard for shard. :func:`compare_capture` measures how
far it is from that (tokens lost, units duplicated, shards differing, leftovers, ``verify``'s
problems); :func:`torn_files` finds any file visible under its final name that is not whole (the
promise that holds *between* the fault and the rerun); :func:`compare_training` does the same for a
training run's per-step log.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CaptureComparison", "TrainingComparison", "compare_capture", "compare_training", "is_temporary",
           "torn_files"]


def is_temporary(relpath: str) -> bool:
    """A writer's temporary (``x.tmp-<id>``, or anything inside a ``dir.tmp-<id>/``): never valid data."""
    return any(".tmp-" in part for part in Path(relpath).parts)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> list[str]:
    """Every file under ``root`` as a relative '/' path, sorted."""
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*") if p.is_file())


@dataclass
class CaptureComparison:
    tokens_reference: int
    tokens_present: int = 0
    manifest: bool = False
    units_missing: list[int] = field(default_factory=list)
    units_duplicated: int = 0
    shards_differing: list[int] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # raydistill verify's

    @property
    def tokens_lost(self) -> int:
        return max(0, self.tokens_reference - self.tokens_present)

    @property
    def intact(self) -> bool:
        """Every unit and token present exactly once, the same bytes as the reference, verify clean."""
        return (self.manifest and self.tokens_lost == 0 and self.units_duplicated == 0 and not self.units_missing
                and not self.shards_differing and not self.leftovers and not self.problems)

    def figures(self) -> dict:
        return {"tokens_lost": self.tokens_lost, "units_duplicated": self.units_duplicated,
                "units_missing": len(self.units_missing), "shards_differing": len(self.shards_differing),
                "leftovers": len(self.leftovers), "verify_problems": len(self.problems)}


def compare_capture(out: str, reference: str) -> CaptureComparison:
    """How the shard set at ``out`` differs from the uninterrupted ``reference`` (both local paths).

    A unit's tokens count as present only if the manifest lists it and its shard on disk has the
    listed sha256; a unit is duplicated if the manifest lists it twice, or if a shard file on disk
    holds a document window that an earlier shard file also holds.
    """
    import pyarrow.parquet as pq

    from raydistill.contracts.shards.manifest import read_manifest
    from raydistill.contracts.shards.verify import verify_shard_set
    from raydistill.errors import RaydistillError

    ref = read_manifest(reference)
    ref_sha = {s.unit: s.sha256 for s in ref.shards}
    result = CaptureComparison(tokens_reference=sum(s.tokens for s in ref.shards))
    root = Path(out)
    result.leftovers = [p for p in _files(root) if is_temporary(p)] if root.exists() else []
    result.problems = [str(p) for p in verify_shard_set(out)]
    try:
        manifest = read_manifest(out)
    except RaydistillError:
        manifest = None
    present: dict[int, str] = {}
    if manifest is not None:
        result.manifest = True
        counts = Counter(s.unit for s in manifest.shards)
        result.units_duplicated += sum(c - 1 for c in counts.values())
        for s in manifest.shards:
            shard = root / s.path
            if s.unit not in present and shard.is_file() and _sha256(shard) == s.sha256:
                present[s.unit] = s.sha256
                result.tokens_present += s.tokens
    result.units_missing = sorted(set(ref_sha) - set(present))
    result.shards_differing = sorted(u for u, sha in ref_sha.items() if present.get(u, sha) != sha)
    seen: set[tuple[str, int]] = set()
    shards = root / "shards"
    for name in sorted(os.listdir(shards)) if shards.is_dir() else []:
        if is_temporary(name) or not name.endswith(".parquet"):
            continue
        try:
            table = pq.read_table(shards / name, columns=["doc_id", "window"])
        except Exception:  # not a readable shard: verify reports it; it holds no window we can count
            continue
        windows = set(zip(table.column("doc_id").to_pylist(), table.column("window").to_pylist(), strict=True))
        if windows & seen:
            result.units_duplicated += 1
        seen |= windows
    return result


def torn_files(out: str, reference: str) -> list[str]:
    """Files under ``out`` visible under their final name that are not whole; [] is the promise.

    A whole shard, plan or vocabulary table has the reference's bytes (capture is deterministic); a
    whole completion record parses and names a shard of the recorded size and sha256; a whole
    manifest parses; a tokenizer file equals the reference's. Temporaries are skipped: they are
    never read, and the next run deletes them.
    """
    from raydistill.contracts.units import UnitRecord

    root, ref = Path(out), Path(reference)
    torn = []
    for rel in _files(root) if root.exists() else []:
        if is_temporary(rel):
            continue
        path = root / rel
        if rel.startswith("done/"):
            # whole: it parses, and the shard it names, if there, has the recorded bytes (a record whose
            # shard is gone is a state some cases make on purpose, not a torn write)
            try:
                record = UnitRecord.model_validate_json(path.read_bytes())
            except ValueError:
                whole = False
            else:
                shard = root / record.path
                whole = not shard.exists() or (shard.stat().st_size == record.bytes
                                               and _sha256(shard) == record.sha256)
        elif rel == "manifest.json":
            try:
                json.loads(path.read_text())
                whole = True
            except ValueError:
                whole = False
        elif (ref / rel).is_file():
            whole = path.read_bytes() == (ref / rel).read_bytes()
        else:
            whole = True  # not in the reference (e.g. a driver log beside the set): not ours to judge
        if not whole:
            torn.append(rel)
    return torn


@dataclass
class TrainingComparison:
    steps_reference: int
    tokens_reference: int
    tokens_trained: int = 0
    steps_missing: list[int] = field(default_factory=list)
    steps_duplicated: int = 0
    losses_differing: list[int] = field(default_factory=list)

    @property
    def tokens_lost(self) -> int:
        return max(0, self.tokens_reference - self.tokens_trained)

    @property
    def intact(self) -> bool:
        return (self.tokens_lost == 0 and not self.steps_missing and self.steps_duplicated == 0
                and not self.losses_differing)

    def figures(self) -> dict:
        return {"tokens_lost": self.tokens_lost, "units_duplicated": self.steps_duplicated,
                "steps_missing": len(self.steps_missing), "losses_differing": len(self.losses_differing)}


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def compare_training(out: str | Path, reference: list[dict], *, tolerance: float = 1e-4) -> TrainingComparison:
    """A resumed run's metrics.csv against an uninterrupted run's rows: the same steps once each, the same
    tokens seen at the end, the same loss at every step (the unit of training work is the step)."""
    rows = read_metrics(out)
    result = TrainingComparison(steps_reference=len(reference), tokens_reference=int(reference[-1]["tokens"]))
    steps = Counter(int(r["step"]) for r in rows)
    result.steps_duplicated = sum(c - 1 for c in steps.values())
    result.steps_missing = [int(r["step"]) for r in reference if int(r["step"]) not in steps]
    result.tokens_trained = int(rows[-1]["tokens"]) if rows else 0
    by_step = {int(r["step"]): float(r["loss"]) for r in rows}
    result.losses_differing = [int(r["step"]) for r in reference if int(r["step"]) in by_step
                               and abs(by_step[int(r["step"])] - float(r["loss"])) >= tolerance]
    return result
