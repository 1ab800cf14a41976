"""Documents over fsspec, and the embedded default corpus that needs no download.

A document's id is a hash of its text, so the plan, the shards and the held-out split all
agree on "which document" across machines and runs, whatever order files are listed in.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import fsspec
from fsspec.core import url_to_fs

from raydistill.config.sections import CorpusConfig
from raydistill.errors import ConfigError, RaydistillError, first_line
from raydistill.io import storage

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

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
# Standard-library folders that are tests, tooling or tables rather than documented modules.
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "encodings"})
_MIN_DOCSTRING_CHARS = 200  # shorter modules are mostly one-line stubs: noise for a language model
_DEFAULT_CHAR_CAP = 2_500_000  # keeps the demo teacher's epoch short on newer Pythons with more docs


def document_id(text: str) -> str:
    """First 16 hex chars of sha256(text): the content hash the manifest and split use."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Document:
    id: str
    text: str

    @classmethod
    def from_text(cls, text: str) -> Document:
        return cls(document_id(text), text)


def split_of(doc_id: str, heldout_fraction: float) -> Literal["train", "heldout"]:
    """Held out iff the id, read as a fraction of 16**16, falls below ``heldout_fraction``.

    Depends only on the content hash, so it is the same on every machine and run, and a
    document never moves between splits when others are added or removed.
    """
    return "heldout" if int(doc_id[:16], 16) / 16**16 < heldout_fraction else "train"


def describe(cfg: CorpusConfig) -> str:
    """Short description for logs and plans, e.g. ``default(py3.11)/train``."""
    if cfg.source == "default":
        base = f"default(py{sys.version_info.major}.{sys.version_info.minor})"
    else:
        base = f"{storage.redact_url(cfg.source)}:{cfg.text_field}"  # plans and manifests store it
    cap = f"[:{cfg.max_documents}]" if cfg.max_documents else ""
    chosen = f"[selected by {storage.redact_url(cfg.selection)}]" if cfg.selection else ""
    return f"{base}/{cfg.split}{cap}{chosen}"


@dataclass
class SkippedDocuments:
    """Records of a corpus source the reader dropped, by reason; a capture reports them.

    Counted over the whole source, before the split and ``max_documents``: documents of the
    other split, or past the cap, are not skipped, just not selected. The embedded default
    corpus is curated and reports zeros.
    """

    empty: int = 0  # blank or whitespace-only text
    undecodable: int = 0  # bad JSON or UTF-8, or a text field that is not a string
    duplicate: int = 0  # exact repeat of an earlier document's text (the first one is kept)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def read_documents(cfg: CorpusConfig) -> list[Document]:
    """The documents ``cfg`` selects: deduplicated, split, then capped, in a stable order."""
    return read_documents_counted(cfg)[0]


def read_documents_counted(cfg: CorpusConfig) -> tuple[list[Document], SkippedDocuments]:
    """:func:`read_documents`, plus how many records were dropped and why."""
    skipped = SkippedDocuments()
    if cfg.source == "default":
        docs: Iterable[Document] = default_documents()
    else:
        texts = _read_source(cfg.source, cfg.text_field, skipped)
        docs = _dedup((Document.from_text(t) for t in texts), skipped)
    if cfg.split != "all":
        docs = [d for d in docs if split_of(d.id, cfg.heldout_fraction) == cfg.split]
    docs = list(docs)
    docs = docs[: cfg.max_documents] if cfg.max_documents else docs
    if cfg.selection is not None:  # a stage's output: contracts.selection.read_documents applies it
        raise ValueError("io.corpus reads no selection; use raydistill.contracts.selection.read_documents")
    return docs, skipped


def _dedup(docs: Iterable[Document], skipped: SkippedDocuments | None = None) -> Iterator[Document]:
    """Drop blank documents and exact repeats (first one wins), keyed by content hash."""
    skipped = skipped if skipped is not None else SkippedDocuments()
    seen: set[str] = set()
    for doc in docs:
        if not doc.text.strip():
            skipped.empty += 1
        elif doc.id in seen:
            skipped.duplicate += 1
        else:
            seen.add(doc.id)
            yield doc


# --- the embedded default corpus -------------------------------------------------------------


def default_documents() -> list[Document]:
    """English prose present on every Python install: pydoc topics + stdlib docstrings."""
    return list(_default_documents())


@functools.lru_cache(maxsize=1)
def _default_documents() -> tuple[Document, ...]:
    docs, total = [], 0
    for doc in _dedup(Document.from_text(t) for t in _default_texts()):
        if total >= _DEFAULT_CHAR_CAP:
            break
        docs.append(doc)
        total += len(doc.text)
    return tuple(docs)


def _default_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key].strip()
    root = sysconfig.get_paths()["stdlib"]
    for path in _stdlib_sources(root):
        text = _module_docstrings(path)
        if text is not None and len(text) >= _MIN_DOCSTRING_CHARS:
            yield text


def _stdlib_sources(root: str) -> list[str]:
    """Standard-library .py files in sorted relative-path order (never imported)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        found += [
            (f"{rel}/{f}".removeprefix("./"), os.path.join(folder, f)) for f in files if f.endswith(".py")
        ]
    return [path for _, path in sorted(found)]


def _module_docstrings(path: str) -> str | None:
    """Module, class and function docstrings in source order, cleaned, blank-line separated."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    stack: list[ast.AST] = [tree]
    while stack:  # depth-first, children in source order
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)  # clean = inspect.cleandoc
            if doc and doc.strip():
                parts.append(doc.strip())
        stack.extend(reversed([c for c in ast.iter_child_nodes(node) if _may_hold_docstrings(c)]))
    return "\n\n".join(parts)


def _may_hold_docstrings(node: ast.AST) -> bool:
    return isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try))


# --- files over fsspec -----------------------------------------------------------------------


def check_output_outside(output: str, corpus: CorpusConfig, field: str = "output") -> None:
    """Refuse an output folder inside the corpus folder: a directory source (read recursively) or a
    glob's folder (the part before its first wildcard). A rerun would read what the stage wrote there
    (completion records, plan.json, a refined corpus) as documents. A single-file source has no folder."""
    if corpus.source == "default":
        return
    out_fs, out_path = storage.filesystem(output)
    src_fs, src_path = storage.filesystem(corpus.source)
    if _protocol(out_fs) != _protocol(src_fs):
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
                          f"'{storage.redact_url(_display(src_fs, folder))}' (corpus.source "
                          f"'{storage.redact_url(corpus.source)}'), so a rerun would read the files it writes as "
                          "documents; choose an output outside that folder")


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if protocol == "local" else protocol


def _read_source(source: str, text_field: str, skipped: SkippedDocuments) -> Iterator[str]:
    fs, paths = _match_files(source)
    for path in paths:
        name = _display(fs, path)
        base = _strip_compression(path)
        if base.endswith(".parquet"):
            texts, kind = _parquet_texts(fs, path, name, text_field), "Parquet"
        elif base.endswith((".jsonl", ".json")):
            texts, kind = _jsonl_texts(fs, path, name, text_field), "JSON lines"
        else:
            texts, kind = _txt_texts(fs, path), "text"
        yield from _count_skips(name, _unreadable_as_config_error(texts, name, kind, path != base), skipped)


def _unreadable_as_config_error(texts: Iterator[str | _Skip], name: str, kind: str, compressed: bool
                                ) -> Iterator[str | _Skip]:
    """A corpus file that cannot be opened, decompressed or decoded (truncated, corrupt, not the format
    its name says) is one ConfigError naming it, not a library traceback."""
    try:
        yield from texts
    except RaydistillError:
        raise
    except Exception as err:
        what = f"compressed {kind}" if compressed else kind
        raise ConfigError(f"corpus file '{name}' cannot be read as {what} ({type(err).__name__}: "
                          f"{first_line(err, 160)}); replace or remove the file") from None


def _match_files(source: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Sorted files named by a path, directory or glob; unsupported names are an error."""
    fs, path = url_to_fs(source)
    if any(ch in path for ch in "*?["):
        paths = fs.glob(path)
        paths = [p for p in paths if fs.isfile(p)]
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if _strip_compression(p).endswith(SUFFIXES)]
    else:
        paths = [path] if fs.exists(path) else []
    if not paths:
        raise ConfigError(f"corpus source '{source}' matches no files")
    for p in paths:
        if not _strip_compression(p).endswith(SUFFIXES):
            raise ConfigError(
                f"corpus file '{_display(fs, p)}' has an unsupported extension; use {', '.join(SUFFIXES)}"
                " (optionally gzip'd, e.g. .jsonl.gz)"
            )
    return fs, sorted(paths)


def _strip_compression(path: str) -> str:
    for suffix in _COMPRESSED:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


class _Skip:
    """Marker yielded by a reader for a record that could not be used (bad JSON, not a string)."""


_SKIP = _Skip()


def _count_skips(name: str, items: Iterator[str | _Skip], counts: SkippedDocuments) -> Iterator[str]:
    skipped = 0
    for item in items:
        if isinstance(item, _Skip):
            skipped += 1
        else:
            yield item
    counts.undecodable += skipped
    if skipped:
        log.warning("corpus file %s: skipped %d records that were not decodable text", name, skipped)


def _jsonl_texts(fs: fsspec.AbstractFileSystem, path: str, name: str, field: str) -> Iterator[str | _Skip]:
    with fs.open(path, "rb", compression="infer") as f:
        data = f.read()
    if data.lstrip()[:1] == b"[":  # a .json file holding one array of objects
        try:
            records = json.loads(data)
        except ValueError:
            records = None
        if isinstance(records, list):
            for i, rec in enumerate(records):
                yield _field_text(rec, name, field, f"item {i}")
            return
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # includes UnicodeDecodeError
            yield _SKIP
            continue
        yield _field_text(rec, name, field, f"line {lineno}")


def _field_text(rec: object, name: str, field: str, where: str) -> str | _Skip:
    if not isinstance(rec, dict):
        return _SKIP
    if field not in rec:
        fields = ", ".join(sorted(map(str, rec))) or "none"
        raise ConfigError(
            f"corpus file '{name}' {where} has no field '{field}' (fields: {fields}); set corpus.text_field"
        )
    value = rec[field]
    return value if isinstance(value, str) else _SKIP


def _parquet_texts(fs: fsspec.AbstractFileSystem, path: str, name: str, field: str) -> Iterator[str | _Skip]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if field not in names:
            raise ConfigError(
                f"corpus file '{name}' has no column '{field}' (columns: {', '.join(names)}); set corpus.text_field"
            )
        for batch in pf.iter_batches(columns=[field]):
            for value in batch.column(0).to_pylist():
                yield value if isinstance(value, str) else _SKIP


def _txt_texts(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str | _Skip]:
    with fs.open(path, "rb", compression="infer") as f:
        data = f.read()
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError:
        yield _SKIP
