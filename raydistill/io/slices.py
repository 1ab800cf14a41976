"""A corpus cut into slices from storage metadata alone, and one slice read by whoever runs it.

Planning (:func:`plan_slices`) lists the corpus files once (sizes and a per-file identity: size
plus mtime / ETag / version id, as the filesystem gives them), reads Parquet footers (row
groups and their row counts) and cuts uncompressed JSON lines into byte ranges of about
``unit_bytes``; compressed files, ``.json`` arrays, ``.txt`` files (one document each) and
Arrow files are whole slices. It reads no document text, so the driver's memory and start-up
time do not grow with the corpus.

Reading (:func:`read_slice`) is the worker's half: it checks that the file is still the one
planned (else one error naming it), reads only its own bytes or rows, decodes, drops what is
not usable text, de-duplicates *within the slice* and keeps its split. A byte range owns
every line that *starts* inside it (the line a range boundary cuts belongs to the range it
started in), so consecutive ranges read every line exactly once without the planner ever
looking for a newline.

Exact de-duplication is per slice on purpose: a corpus-wide pass would put every document's
hash in one place before any work could start. Duplicates across slices are kept (a corpus
de-duplicated upstream, e.g. by datatrove, has none); since the held-out split is a function
of a document's content hash, a repeated document always lands in the same split and never
leaks from train into held-out. docs/operations.md says so to users.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import fsspec
from fsspec.core import url_to_fs

from raydistill.config.sections import CorpusConfig
from raydistill.errors import ConfigError, RaydistillError, first_line
from raydistill.io import documents, storage
from raydistill.io.documents import Document, SkippedDocuments, dedup, display_url, protocol_of, split_of

__all__ = ["DEFAULT_UNIT_BYTES", "CorpusFile", "Slice", "list_corpus_files", "plan_slices", "read_slice",
           "text_bytes_read"]

log = logging.getLogger("raydistill.io.corpus")  # one logger for everything a corpus reader says

DEFAULT_UNIT_BYTES = 32 << 20  # ≈ 8M tokens of English: minutes per unit on one GPU, seconds to redo
SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".arrow")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_IDENTITY_KEYS = ("mtime", "ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "blob_id",
                  "LastModified", "created")  # what local, S3, GCS, HF and memory filesystems report
_WHOLE_FILE_PROTOCOLS = ("http", "https")  # a web server need not serve byte ranges: read files whole
_FOOTER_THREADS = 16  # Parquet footers are small reads; on an object store their latency adds up

Format = Literal["jsonl", "json", "parquet", "txt", "arrow", "default"]
Span = Literal["bytes", "rows", "file"]

_text_bytes = 0  # document bytes this process has read (tools/bench_scale.py reads it in the driver)


def text_bytes_read() -> int:
    """Bytes of document text (and the records around it) read by this process so far."""
    return _text_bytes


def _count_text(n: int) -> None:
    global _text_bytes
    _text_bytes += n


@dataclass(frozen=True)
class CorpusFile:
    """One corpus file as listed: where, how big, and what says it has not changed since."""

    url: str  # as a user would write it (local path, or protocol://...)
    size: int
    identity: str  # "size=…;mtime=…" and the like: compared before a worker reads the file
    format: Format
    compressed: bool


@dataclass(frozen=True)
class Slice:
    """What one work unit reads: rows ``[start, stop)`` of a Parquet file or of the embedded corpus,
    the lines starting in bytes ``[start, stop)`` of a JSON-lines file, or a whole file."""

    url: str
    format: Format
    span: Span
    start: int
    stop: int
    identity: str
    bytes: int  # of the file this slice covers (estimated for Parquet rows): sizes progress and scheduling
    limit: int | None = None  # keep at most this many documents (the last slice of a max_documents cap)

    def as_dict(self) -> dict:
        return asdict(self)

    def stored(self) -> dict:
        """What ``plan.json`` keeps: the slice with any credentials in its URL replaced by ``***``. Workers
        get the slice itself from the driver, never from the stored plan."""
        return {**self.as_dict(), "url": storage.redact_url(self.url)}

    @classmethod
    def from_dict(cls, data: dict) -> Slice:
        return cls(url=str(data["url"]), format=data["format"], span=data["span"], start=int(data["start"]),
                   stop=int(data["stop"]), identity=str(data["identity"]), bytes=int(data["bytes"]),
                   limit=None if data.get("limit") is None else int(data["limit"]))

    @property
    def sha256(self) -> str:
        """Hash of what the slice is (file, identity, range), as stored: a unit's identity in the plan."""
        return hashlib.sha256(json.dumps(self.stored(), sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        where = {"bytes": f"bytes {self.start}-{self.stop}", "rows": f"rows {self.start}-{self.stop}",
                 "file": "whole file"}[self.span]
        return f"{self.url} ({where})"


# --- listing ---------------------------------------------------------------------------------------


def _strip_compression(path: str) -> str:
    for suffix in _COMPRESSED:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _format_of(path: str) -> Format:
    base = _strip_compression(path)
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".txt", "txt"),
                        (".arrow", "arrow")):
        if base.endswith(suffix):
            return fmt  # type: ignore[return-value]
    raise AssertionError(path)


def _identity(info: dict) -> str:
    parts = [f"size={int(info.get('size') or 0)}"]
    parts += [f"{key}={_plain(info[key])}" for key in _IDENTITY_KEYS if info.get(key) not in (None, "")]
    return ";".join(parts)


def _plain(value: object) -> str:
    """One spelling per value: a listing and a single-file lookup may give a time as a datetime or a number."""
    if hasattr(value, "timestamp"):
        value = value.timestamp()
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _arrow_dataset_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str] | None:
    """The data files of a ``datasets.save_to_disk`` folder (its ``state.json``), or None if it is not one."""
    state = f"{path.rstrip('/')}/state.json"
    if fs.exists(f"{path.rstrip('/')}/dataset_dict.json"):
        raise ConfigError(f"corpus source '{display_url(fs, path)}' is a saved DatasetDict; point corpus.source at one "
                          "split's folder inside it (e.g. .../train)")
    if not fs.exists(state):
        return None
    try:
        names = [entry["filename"] for entry in json.loads(fs.cat_file(state))["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"corpus file '{display_url(fs, state)}' is not a datasets state.json ({first_line(err)}); "
                          "save the dataset again with save_to_disk") from None
    for name in names:
        corpus_name_inside(name, display_url(fs, state))
    return [f"{path.rstrip('/')}/{name}" for name in names]


def corpus_name_inside(name: str, where: str) -> str:
    """A file name read from a stored file must stay inside its folder."""
    if not name or name.startswith("/") or "://" in name or "\\" in name or ".." in name.split("/"):
        raise ConfigError(f"{where} names data file {name!r} outside its folder; save the dataset again")
    return name


def list_corpus_files(source: str) -> tuple[fsspec.AbstractFileSystem, list[CorpusFile]]:
    """The sorted files a path, directory, glob or ``datasets`` folder names, from one listing; an
    unsupported name, or nothing at all, is one ConfigError."""
    fs, path = url_to_fs(source)
    if any(ch in path for ch in "*?["):
        infos = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") != "directory"}
    elif fs.isdir(path):
        arrow = _arrow_dataset_files(fs, path)
        if arrow is not None:
            infos = {p: fs.info(p) for p in arrow}
        else:
            infos = {p: i for p, i in fs.find(path, detail=True).items()
                     if _strip_compression(p).endswith(SUFFIXES)}
    else:
        infos = {path: fs.info(path)} if fs.exists(path) else {}
    if not infos:
        raise ConfigError(f"corpus source '{source}' matches no files")
    files = []
    for p in sorted(infos):
        if not _strip_compression(p).endswith(SUFFIXES):
            raise ConfigError(f"corpus file '{display_url(fs, p)}' has an unsupported extension; use "
                              f"{', '.join(SUFFIXES)} (optionally compressed: {', '.join(_COMPRESSED)})")
        info = infos[p]
        files.append(CorpusFile(url=display_url(fs, p), size=int(info.get("size") or 0), identity=_identity(info),
                                format=_format_of(p), compressed=_strip_compression(p) != p))
    return fs, files


# --- planning --------------------------------------------------------------------------------------


def plan_slices(cfg: CorpusConfig, unit_bytes: int = DEFAULT_UNIT_BYTES) -> list[Slice]:
    """The corpus as slices of about ``unit_bytes``, in corpus order, from metadata only (see the module
    docstring); ``cfg.max_documents`` is the one setting that reads text here, up to the cap."""
    if cfg.source == "default":
        return _default_slices(cfg, unit_bytes)
    fs, files = list_corpus_files(cfg.source)
    footers = _parquet_footers(fs, [f for f in files if f.format == "parquet" and not f.compressed], cfg.text_field)
    slices: list[Slice] = []
    for f in files:
        if f.url in footers:
            slices += _row_slices(f, footers[f.url], unit_bytes)
        elif f.format == "jsonl" and not f.compressed and protocol_of(fs) not in _WHOLE_FILE_PROTOCOLS:
            slices += [Slice(f.url, "jsonl", "bytes", start, min(start + unit_bytes, f.size), f.identity,
                             min(start + unit_bytes, f.size) - start) for start in range(0, f.size, unit_bytes)]
        else:
            slices.append(Slice(f.url, f.format, "file", 0, f.size, f.identity, f.size))
    return _capped(slices, cfg) if cfg.max_documents else slices


def _parquet_footers(fs: fsspec.AbstractFileSystem, files: list[CorpusFile], field: str
                     ) -> dict[str, list[tuple[int, int]]]:
    """(rows, bytes) of each row group of each file, from the footers, read in parallel; a file without
    the text column is one error naming it and the columns it has."""
    import pyarrow.parquet as pq

    def footer(f: CorpusFile) -> list[tuple[int, int]]:
        try:
            with fs.open(url_to_fs(f.url)[1], "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                names = meta.schema.to_arrow_schema().names
        except Exception as err:
            raise ConfigError(f"corpus file '{f.url}' cannot be read as Parquet ({type(err).__name__}: "
                              f"{first_line(err, 160)}); replace or remove the file") from None
        if field not in names:
            raise ConfigError(f"corpus file '{f.url}' has no column '{field}' (columns: {', '.join(names)}); "
                              "set corpus.text_field")
        return [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]

    if not files:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(_FOOTER_THREADS, len(files))) as pool:
        return dict(zip((f.url for f in files), pool.map(footer, files), strict=True))


def _row_slices(f: CorpusFile, groups: list[tuple[int, int]], unit_bytes: int) -> list[Slice]:
    """Consecutive rows of about ``unit_bytes`` each (small row groups together, a big one cut by rows)."""
    slices, start, acc_rows, acc_bytes, row = [], 0, 0, 0, 0
    for rows, size in groups:
        per_row = size / max(rows, 1)
        while rows > 0:
            take = min(rows, max(1, math.ceil((unit_bytes - acc_bytes) / max(per_row, 1e-9))))
            acc_rows, acc_bytes, rows, row = acc_rows + take, acc_bytes + take * per_row, rows - take, row + take
            if acc_bytes >= unit_bytes:
                slices.append(Slice(f.url, "parquet", "rows", start, row, f.identity, round(acc_bytes)))
                start, acc_rows, acc_bytes = row, 0, 0
    if acc_rows:
        slices.append(Slice(f.url, "parquet", "rows", start, row, f.identity, round(acc_bytes)))
    return slices


def _default_slices(cfg: CorpusConfig, unit_bytes: int) -> list[Slice]:
    """The embedded corpus (built from this Python install, not read from storage) as index ranges."""
    docs = documents.default_documents()
    identity = f"default(py{documents.python_version()});" + hashlib.sha256(
        "\n".join(d.id for d in docs).encode()).hexdigest()[:16]
    slices, start, size, kept = [], 0, 0, 0
    for i, doc in enumerate(docs):
        size += len(doc.text.encode("utf-8"))
        kept += cfg.split == "all" or split_of(doc.id, cfg.heldout_fraction) == cfg.split
        capped = cfg.max_documents is not None and kept >= cfg.max_documents
        if size >= unit_bytes or capped or i == len(docs) - 1:
            slices.append(Slice("default", "default", "rows", start, i + 1, identity, size))
            start, size = i + 1, 0
        if capped:
            break
    return slices


def _capped(slices: list[Slice], cfg: CorpusConfig) -> list[Slice]:
    """The first slices holding ``cfg.max_documents`` documents, the last one limited: a quick run's cap,
    the only planning that reads text (up to the cap, never past it)."""
    out, left = [], cfg.max_documents or 0
    for piece in slices:
        found = len(read_slice(piece, cfg)[0])
        if found >= left:
            out.append(Slice(**{**piece.as_dict(), "limit": left}))
            return out
        out.append(piece)
        left -= found
    return out


# --- reading ---------------------------------------------------------------------------------------


class _Skip:
    """Marker yielded by a reader for a record that could not be used (bad JSON, not a string)."""


_SKIP = _Skip()


def read_slice(piece: Slice, cfg: CorpusConfig) -> tuple[list[Document], SkippedDocuments]:
    """The documents of one slice: usable text, de-duplicated within the slice, of ``cfg.split``, at most
    ``piece.limit``; and the records dropped, by reason. The file must be the one planned."""
    skipped = SkippedDocuments()
    if piece.format == "default":
        docs = documents.default_documents()[piece.start : piece.stop]
    else:
        fs, path = url_to_fs(piece.url)
        _check_unchanged(fs, path, piece)
        docs = dedup((Document.from_text(t) for t in _count_skips(piece.url, _texts(fs, path, piece, cfg.text_field),
                                                                    skipped)), skipped)
    if cfg.split != "all":
        docs = (d for d in docs if split_of(d.id, cfg.heldout_fraction) == cfg.split)
    docs = list(docs)
    return (docs[: piece.limit] if piece.limit is not None else docs), skipped


def _check_unchanged(fs: fsspec.AbstractFileSystem, path: str, piece: Slice) -> None:
    try:
        now = _identity(fs.info(path))
    except FileNotFoundError:
        now = "missing"
    if now != piece.identity:
        raise ConfigError(f"corpus file '{piece.url}' changed since the plan was made ({piece.identity} then, {now} "
                          "now); restore it, or capture the changed corpus into a new output")


def _texts(fs: fsspec.AbstractFileSystem, path: str, piece: Slice, field: str) -> Iterator[str | _Skip]:
    readers = {"jsonl": _jsonl_texts, "json": _jsonl_texts, "parquet": _parquet_texts, "txt": _txt_texts,
               "arrow": _arrow_texts}
    kind = {"jsonl": "JSON lines", "json": "JSON", "parquet": "Parquet", "txt": "text", "arrow": "Arrow"}[piece.format]
    try:
        yield from readers[piece.format](fs, path, piece, field)
    except RaydistillError:
        raise
    except Exception as err:
        what = f"compressed {kind}" if _strip_compression(path) != path else kind
        raise ConfigError(f"corpus file '{piece.url}' cannot be read as {what} ({type(err).__name__}: "
                          f"{first_line(err, 160)}); replace or remove the file") from None


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


def _range_bytes(fs: fsspec.AbstractFileSystem, path: str, start: int, stop: int) -> tuple[bytes, int]:
    """The lines that start in ``[start, stop)``, and the line number (1-based) of the first one when
    ``start`` is 0 (else 0: unknown without reading what comes before)."""
    with fs.open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that started before this range: the range before owns it
        begin = f.tell()
        data = f.read(max(0, stop - begin)) if begin < stop else b""
        if data and not data.endswith(b"\n"):
            data += f.readline()  # the last line started inside the range: read it to its end
    return data, 1 if start == 0 else 0


def _jsonl_texts(fs: fsspec.AbstractFileSystem, path: str, piece: Slice, field: str) -> Iterator[str | _Skip]:
    if piece.span == "bytes":
        data, first = _range_bytes(fs, path, piece.start, piece.stop)
    else:
        with fs.open(path, "rb", compression="infer") as f:
            data, first = f.read(), 1
    _count_text(len(data))
    if piece.span == "file" and data.lstrip()[:1] == b"[":  # a .json file holding one array of objects
        try:
            records = json.loads(data)
        except ValueError:
            records = None
        if isinstance(records, list):
            for i, rec in enumerate(records):
                yield _field_text(rec, piece.url, field, f"item {i}")
            return
    for n, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # includes UnicodeDecodeError
            yield _SKIP
            continue
        where = f"line {first + n}" if first else f"a line after byte {piece.start}"
        yield _field_text(rec, piece.url, field, where)


def _field_text(rec: object, name: str, field: str, where: str) -> str | _Skip:
    if not isinstance(rec, dict):
        return _SKIP
    if field not in rec:
        fields = ", ".join(sorted(map(str, rec))) or "none"
        raise ConfigError(f"corpus file '{name}' {where} has no field '{field}' (fields: {fields}); "
                          "set corpus.text_field")
    value = rec[field]
    return value if isinstance(value, str) else _SKIP


def _parquet_texts(fs: fsspec.AbstractFileSystem, path: str, piece: Slice, field: str) -> Iterator[str | _Skip]:
    """Rows ``[start, stop)`` of the text column, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if field not in names:
            raise ConfigError(f"corpus file '{piece.url}' has no column '{field}' (columns: {', '.join(names)}); "
                              "set corpus.text_field")
        first = 0
        stop = piece.stop if piece.span == "rows" else pf.metadata.num_rows
        start = piece.start if piece.span == "rows" else 0
        for group in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                column = pf.read_row_group(group, columns=[field]).column(0).slice(lo - first, hi - lo)
                _count_text(column.nbytes)
                for value in column.to_pylist():
                    yield value if isinstance(value, str) else _SKIP
            first += rows
            if first >= stop:
                break


def _arrow_texts(fs: fsspec.AbstractFileSystem, path: str, piece: Slice, field: str) -> Iterator[str | _Skip]:
    """A whole Arrow file: the IPC stream ``datasets.save_to_disk`` writes, or the IPC file format."""
    import pyarrow as pa

    with fs.open(path, "rb") as f:
        data = f.read()
    _count_text(len(data))
    try:
        table = pa.ipc.open_stream(data).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(data).read_all()
    if field not in table.column_names:
        raise ConfigError(f"corpus file '{piece.url}' has no column '{field}' (columns: "
                          f"{', '.join(table.column_names)}); set corpus.text_field")
    for value in table.column(field).to_pylist():
        yield value if isinstance(value, str) else _SKIP


def _txt_texts(fs: fsspec.AbstractFileSystem, path: str, piece: Slice, field: str) -> Iterator[str | _Skip]:
    with fs.open(path, "rb", compression="infer") as f:
        data = f.read()
    _count_text(len(data))
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError:
        yield _SKIP
