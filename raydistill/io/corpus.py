"""A corpus as a whole: its description, where its outputs may go, and all its documents read here.

Documents themselves (ids, split, the embedded corpus) are ``io.documents``; planning and reading
slices is ``io.slices``. :func:`read_documents` reads every slice in this process, for small
corpora (evaluation, tests, tools); a capture's driver never calls it.
"""

from __future__ import annotations

import logging

from raydistill.config.sections import CorpusConfig
from raydistill.errors import ConfigError
from raydistill.io import storage
from raydistill.io.documents import (
    Document,
    SkippedDocuments,
    default_documents,
    display_url,
    document_id,
    protocol_of,
    python_version,
    split_of,
)
from raydistill.io.slices import plan_slices, read_slice

__all__ = [
    "Document",
    "SkippedDocuments",
    "check_output_outside",
    "default_documents",
    "describe",
    "document_id",
    "read_documents",
    "read_documents_counted",
    "split_of",
]

log = logging.getLogger(__name__)


def describe(cfg: CorpusConfig) -> str:
    """Short description for logs and plans, e.g. ``default(py3.11)/train``."""
    if cfg.source == "default":
        base = f"default(py{python_version()})"
    else:
        base = f"{storage.redact_url(cfg.source)}:{cfg.text_field}"  # plans and manifests store it
    cap = f"[:{cfg.max_documents}]" if cfg.max_documents else ""
    chosen = f"[selected by {storage.redact_url(cfg.selection)}]" if cfg.selection else ""
    return f"{base}/{cfg.split}{cap}{chosen}"


def read_documents(cfg: CorpusConfig) -> list[Document]:
    """The documents ``cfg`` selects, in corpus order: what the capture's units together hold."""
    return read_documents_counted(cfg)[0]


def read_documents_counted(cfg: CorpusConfig) -> tuple[list[Document], SkippedDocuments]:
    """:func:`read_documents`, plus how many records were dropped and why: the slices of
    ``io.slices.plan_slices`` read one after the other, in this process. For small corpora (evaluation,
    tests, tools); a capture's driver never calls it, its workers read their own slices."""
    if cfg.selection is not None:  # a stage's output: contracts.selection.read_documents applies it
        raise ValueError("io.corpus reads no selection; use raydistill.contracts.selection.read_documents")
    docs, skipped = [], SkippedDocuments()
    for piece in plan_slices(cfg):
        found, dropped = read_slice(piece, cfg)
        docs += found
        skipped.add(dropped)
    return docs, skipped


# --- files over fsspec -----------------------------------------------------------------------


def check_output_outside(output: str, corpus: CorpusConfig, field: str = "output") -> None:
    """Refuse an output folder inside the corpus folder: a directory source (read recursively) or a
    glob's folder (the part before its first wildcard). A rerun would read what the stage wrote there
    (completion records, plan.json, a refined corpus) as documents. A single-file source has no folder."""
    if corpus.source == "default":
        return
    out_fs, out_path = storage.filesystem(output)
    src_fs, src_path = storage.filesystem(corpus.source)
    if protocol_of(out_fs) != protocol_of(src_fs):
        return
    parts = src_path.split("/")
    magic = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), None)
    if magic is not None:
        folder = "/".join(parts[:magic]) or "/"
    elif src_fs.isdir(src_path):
        folder = src_path
    else:
        return
    inner, outer = out_path.rstrip("/") + "/", folder.rstrip("/") + "/"
    if inner.startswith(outer):
        raise ConfigError(f"{field} '{storage.redact_url(output)}' lies inside the corpus folder "
                          f"'{storage.redact_url(display_url(src_fs, folder))}' (corpus.source "
                          f"'{storage.redact_url(corpus.source)}'), so a rerun would read the files it writes as "
                          "documents; choose an output outside that folder")


