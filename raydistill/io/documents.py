"""What a document is: its text and content-hash id, its split, and the embedded default corpus.

A document's id is a hash of its text, so the plan, the shards and the held-out split all
agree on "which document" across machines and runs, whatever order files are listed in.
The default corpus (pydoc topics and standard-library docstrings) is built from the Python
install itself, so it needs no download and every worker builds the same one.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import fsspec

__all__ = ["Document", "SkippedDocuments", "dedup", "default_documents", "display_url", "document_id", "protocol_of",
           "python_version", "split_of"]

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

    def add(self, other: SkippedDocuments) -> None:
        for key, value in other.as_dict().items():
            setattr(self, key, getattr(self, key) + value)


def dedup(docs: Iterable[Document], skipped: SkippedDocuments | None = None) -> Iterator[Document]:
    """Drop blank documents and exact repeats (first one wins), keyed by content hash; counted in
    ``skipped`` when given."""
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


def python_version() -> str:
    """``3.11``: the embedded corpus is built from this Python's own files, so its version names it."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


# --- the embedded default corpus -------------------------------------------------------------


def default_documents() -> list[Document]:
    """English prose present on every Python install: pydoc topics + stdlib docstrings."""
    return list(_default_documents())


@functools.lru_cache(maxsize=1)
def _default_documents() -> tuple[Document, ...]:
    docs, total = [], 0
    for doc in dedup(Document.from_text(t) for t in _default_texts()):
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


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if protocol == "local" else protocol


def display_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A filesystem path as a user would write it: local paths bare, others with their protocol."""
    return path if protocol_of(fs) == "file" else fs.unstrip_protocol(path)
