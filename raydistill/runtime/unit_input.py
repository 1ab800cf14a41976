"""A unit worker's own input: its slice of the corpus, read where the unit runs, never on the driver.

Every unit stage (capture, select) reads the same way: the slice's usable documents
(``io.slices.read_slice``: decoded, filtered, de-duplicated within the slice, of the split),
then those a selection kept, then those within ``max_document_tokens``. The worker also hashes
the ids of what it read, in order: the unit's content hash, which its completion record keeps.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass, field

from raydistill.config.sections import UnitInputConfig
from raydistill.contracts.selection import KeptDocuments
from raydistill.io.corpus import Document
from raydistill.io.slices import Slice, read_slice
from raydistill.models.windows import drop_oversize

__all__ = ["UnitDocuments", "read_unit_documents"]


@dataclass
class UnitDocuments:
    documents: list[Document]
    skipped: dict[str, int] = field(default_factory=dict)  # by reason: empty, undecodable, duplicate, oversize

    @property
    def content_sha256(self) -> str:
        return hashlib.sha256("\n".join(d.id for d in self.documents).encode()).hexdigest()

    def record_fields(self) -> dict:
        """What a completion record keeps of the read (``contracts.units.UnitRecord``)."""
        return {"documents": len(self.documents), "content_sha256": self.content_sha256, "skipped": self.skipped}


@functools.lru_cache(maxsize=2)
def _kept(selection: str) -> KeptDocuments:
    return KeptDocuments.load(selection)  # once per actor process: every unit it runs uses the same one


def read_unit_documents(piece: Slice, cfg: UnitInputConfig, tokenizer, tokenizer_lock: threading.Lock | None = None
                        ) -> UnitDocuments:
    """The documents unit ``piece`` captures or scores, and the records it left out, by reason."""
    docs, skipped = read_slice(piece, cfg.corpus)
    counts = skipped.as_dict()
    if cfg.corpus.selection is not None:
        docs = _kept(cfg.corpus.selection).filter(docs, piece)
    with tokenizer_lock or threading.Lock():
        docs, counts["oversize"] = drop_oversize(docs, tokenizer, cfg.max_document_tokens)
    return UnitDocuments(docs, counts)
