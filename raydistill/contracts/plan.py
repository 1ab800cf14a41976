"""Deterministic work units: the corpus cut into slices (``io.slices``) before any capture.

A unit is the smallest piece of work that is done, written and marked complete as a whole
(one shard per unit): one slice of one corpus file, planned from storage metadata. A unit's
hash covers its file's identity (size, mtime / ETag / version) and its range, so the plan is a
pure function of the corpus files as they are and of the settings: a rerun of the same command
finds the same units and only does the missing ones; a rerun after a corpus file changed, or
with other settings, is detected by the plan hash and refused, naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from raydistill.errors import PlanMismatchError, ShardError
from raydistill.io import storage
from raydistill.io.slices import Slice

PLAN_NAME = "plan.json"


@dataclass(frozen=True)
class WorkUnit:
    unit: int
    slice: Slice  # what the unit's worker reads
    sha256: str  # the slice's hash (file, identity, range): what a completion record must carry

    @classmethod
    def of(cls, unit: int, piece: Slice) -> WorkUnit:
        return cls(unit, piece, piece.sha256)


@dataclass(frozen=True)
class Plan:
    corpus: str
    settings: dict
    units: list[WorkUnit]
    sha256: str

    @property
    def bytes(self) -> int:
        return sum(u.slice.bytes for u in self.units)

    @classmethod
    def of_units(cls, units: list[WorkUnit], *, corpus: str, settings: dict) -> Plan:
        """The plan of already cut ``units``; its hash covers their content hashes and the settings."""
        return cls(corpus=corpus, settings=settings, units=units, sha256=_plan_sha256(settings, units))

    def unit_hashes(self) -> dict[int, str]:
        """Each unit's content hash, by unit: what a completion record must carry to be trusted."""
        return {u.unit: u.sha256 for u in self.units}

    def to_json(self) -> str:
        data = {"sha256": self.sha256, "corpus": self.corpus, "settings": self.settings,
                "units": [{"unit": u.unit, "sha256": u.sha256, "slice": u.slice.stored()} for u in self.units]}
        return json.dumps(data, indent=1, sort_keys=True)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plan_sha256(settings: dict, units: list[WorkUnit]) -> str:
    return _sha256(json.dumps({"settings": settings, "units": [u.sha256 for u in units]}, sort_keys=True))


def make_plan(slices: list[Slice], *, corpus: str, settings: dict) -> Plan:
    """One unit per slice, in corpus order; the hash covers every slice (file identity, range) and the settings."""
    return Plan.of_units([WorkUnit.of(i, piece) for i, piece in enumerate(slices)], corpus=corpus, settings=settings)


def read_plan(root: str) -> Plan | None:
    """``root/plan.json``, checked: its hash must be the hash of what it holds (an edited plan is
    refused); None when there is none. Raises ShardError naming the file otherwise."""
    url = storage.join(root, PLAN_NAME)
    if not storage.exists(url):
        return None
    try:
        data = json.loads(storage.read_text(url))
        units = [WorkUnit(int(u["unit"]), Slice.from_dict(u["slice"]), str(u["sha256"])) for u in data["units"]]
        plan = Plan(corpus=str(data["corpus"]), settings=dict(data["settings"]), units=units,
                    sha256=str(data["sha256"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise _unreadable(url, err) from None
    if ([u.unit for u in units] != list(range(len(units))) or any(u.slice.sha256 != u.sha256 for u in units)
            or _plan_sha256(plan.settings, units) != plan.sha256):
        raise ShardError(f"{url} does not hash to its own sha256 {plan.sha256[:12]} (edited by hand or damaged); "
                         "use a new output directory or delete this one to start over")
    return plan


def _unreadable(url: str, err: Exception) -> ShardError:
    return ShardError(f"{url} is not a readable plan ({type(err).__name__}: {err}); the output is damaged, "
                      "use a new output directory or delete this one to start over")


def read_plan_sha(root: str) -> str | None:
    """The hash ``root/plan.json`` names (None without one); one ShardError line if it cannot be read."""
    url = storage.join(root, PLAN_NAME)
    if not storage.exists(url):
        return None
    try:
        sha = json.loads(storage.read_text(url))["sha256"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise _unreadable(url, err) from None
    return str(sha)


def write_or_check_plan(root: str, plan: Plan) -> bool:
    """Write the plan, or check that the one already in ``root`` is the same.

    Returns True when an earlier plan was found (the run is a resume). A different plan in
    the same directory is refused so two captures are never mixed in one shard set.
    """
    existing = read_plan_sha(root)
    url = storage.join(root, PLAN_NAME)
    if existing is None:
        storage.atomic_write_text(url, plan.to_json())
        return False
    if existing != plan.sha256:
        raise PlanMismatchError(
            f"output {root} already holds a capture with a different {_what_differs(root, plan)} "
            f"(plan {existing[:12]} there, {plan.sha256[:12]} now); "
            "use a new output directory, or delete the old one to start over"
        )
    if storage.read_text(url) != plan.to_json():  # same hash, other contents: edited by hand; put it back
        storage.atomic_write_text(url, plan.to_json())
    return True


def _what_differs(root: str, plan: Plan) -> str:
    """What makes ``plan`` another plan than the one in ``root``, named for a person: a corpus file that
    changed, appeared or went since that plan was made, else the settings, else the corpus's cut."""
    try:
        old = read_plan(root)
    except ShardError:
        old = None
    if old is None:
        return "corpus or settings"
    then = {u.slice.stored()["url"]: u.slice.identity for u in old.units}
    now = {u.slice.stored()["url"]: u.slice.identity for u in plan.units}
    changed = [url for url in now if url in then and now[url] != then[url]]
    if changed:
        return (f"corpus: file '{changed[0]}' changed since that capture was planned "
                f"({then[changed[0]]} then, {now[changed[0]]} now)"
                + (f", and {len(changed) - 1} more files" if len(changed) > 1 else ""))
    added, gone = sorted(set(now) - set(then)), sorted(set(then) - set(now))
    if added or gone:
        first = f"file '{added[0]}' is new" if added else f"file '{gone[0]}' is gone"
        return f"corpus: {first} since that capture was planned ({len(added)} new, {len(gone)} gone)"
    if old.settings != plan.settings:
        keys = sorted(k for k in set(old.settings) | set(plan.settings) if old.settings.get(k) != plan.settings.get(k))
        return f"settings ({', '.join(keys)})"
    return "cut of the corpus (unit_bytes or max_documents)"
