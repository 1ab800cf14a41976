"""Deterministic work units: the corpus cut into fixed slices of documents before any capture.

A unit is the smallest piece of work that is done, written and marked complete as a whole
(one shard per unit). Because the plan is a pure function of the corpus and the capture
settings, a rerun of the same command finds the same units and only does the missing ones;
a rerun with a different corpus or settings is detected by the plan hash and refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from raydistill.errors import PlanMismatchError, ShardError
from raydistill.io import storage
from raydistill.io.corpus import Document

PLAN_NAME = "plan.json"


@dataclass(frozen=True)
class WorkUnit:
    unit: int
    first_doc: int
    num_docs: int
    sha256: str  # hash of the unit's document ids, which are content hashes


@dataclass(frozen=True)
class Plan:
    corpus: str
    settings: dict
    units: list[WorkUnit]
    sha256: str

    def documents_of(self, unit: WorkUnit, documents: list[Document]) -> list[Document]:
        return documents[unit.first_doc : unit.first_doc + unit.num_docs]

    @classmethod
    def of_units(cls, units: list[WorkUnit], *, corpus: str, settings: dict) -> Plan:
        """The plan of already cut ``units``; its hash covers their content hashes and the settings."""
        return cls(corpus=corpus, settings=settings, units=units, sha256=_plan_sha256(settings, units))

    def unit_hashes(self) -> dict[int, str]:
        """Each unit's content hash, by unit: what a completion record must carry to be trusted."""
        return {u.unit: u.sha256 for u in self.units}

    def to_json(self) -> str:
        data = {"sha256": self.sha256, "corpus": self.corpus, "settings": self.settings,
                "units": [asdict(u) for u in self.units]}
        return json.dumps(data, indent=1, sort_keys=True)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plan_sha256(settings: dict, units: list[WorkUnit]) -> str:
    return _sha256(json.dumps({"settings": settings, "units": [u.sha256 for u in units]}, sort_keys=True))


def make_plan(documents: list[Document], *, docs_per_unit: int, corpus: str, settings: dict) -> Plan:
    """Cut ``documents`` into units of ``docs_per_unit``; the hash covers content and settings."""
    units = []
    for unit, first in enumerate(range(0, len(documents), docs_per_unit)):
        chunk = documents[first : first + docs_per_unit]
        units.append(WorkUnit(unit, first, len(chunk), _sha256("\n".join(d.id for d in chunk))))
    return Plan.of_units(units, corpus=corpus, settings=settings)


def read_plan(root: str) -> Plan | None:
    """``root/plan.json``, checked: its hash must be the hash of what it holds (an edited plan is
    refused); None when there is none. Raises ShardError naming the file otherwise."""
    url = storage.join(root, PLAN_NAME)
    if not storage.exists(url):
        return None
    try:
        data = json.loads(storage.read_text(url))
        units = [WorkUnit(int(u["unit"]), int(u["first_doc"]), int(u["num_docs"]), str(u["sha256"]))
                 for u in data["units"]]
        plan = Plan(corpus=str(data["corpus"]), settings=dict(data["settings"]), units=units,
                    sha256=str(data["sha256"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise _unreadable(url, err) from None
    if [u.unit for u in units] != list(range(len(units))) or _plan_sha256(plan.settings, units) != plan.sha256:
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
            f"output {root} already holds a capture with a different corpus or settings "
            f"(plan {existing[:12]} there, {plan.sha256[:12]} now); "
            "use a new output directory, or delete the old one to start over"
        )
    if storage.read_text(url) != plan.to_json():  # same hash, other contents: edited by hand; put it back
        storage.atomic_write_text(url, plan.to_json())
    return True
