"""One fsspec layer for every read and write: local paths, s3://, gs://, memory:// alike.

All writes that other stages rely on go through :func:`atomic_write_bytes`, so a reader
never sees a half-written file: data goes to a temporary name next to the target and is
renamed into place only once complete. A directory of many files (an HF model) goes
through :func:`atomic_dir` and is read back only if :func:`dir_complete` says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from urllib.parse import unquote_plus

import fsspec
from fsspec.core import url_to_fs

from raydistill.errors import ConfigError, first_line


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem object and the path inside it for ``url``.

    Object-store filesystems (s3fs, gcsfs) cache directory listings per process, but our
    files are written by other processes (capture actors, training workers); a cached
    listing would hide them (a completion record "missing", a stale file size). So the
    cached entries for ``path`` and its parents are dropped on every call; local disks
    have no such cache.
    """
    try:
        fs, path = url_to_fs(url)
    except ImportError as err:  # fsspec knows the protocol; its package is not installed
        protocol = url.split("://", 1)[0]
        raise ConfigError(f"'{redact_url(url)}': the {protocol}:// filesystem needs a package that is not installed "
                          f"({first_line(err)}); e.g. pip install 'raydistill[s3]' for s3://") from None
    except ValueError as err:  # a protocol fsspec does not know
        raise ConfigError(f"'{redact_url(url)}': {redact_text(first_line(err))}; use a local path or an fsspec URL (s3://, gs://, "
                          "memory://, ...)") from None
    fs.invalidate_cache(path)
    return fs, path


def check_output(url: str, field: str) -> None:
    """Refuse, before any work, an output that cannot be a directory we write into: a file, a path
    under a file, or a local directory this process may not write. Object stores are checked by
    their first write."""
    fs, path = filesystem(url)
    url = redact_url(url)  # for the messages
    if fs.exists(path) and not fs.isdir(path):
        raise ConfigError(f"{field} '{url}' is a file, not a directory; choose a directory path")
    if not _is_local(fs):
        return
    parent, problem = local_write_problem(path)
    if problem == "file":
        raise ConfigError(f"{field} '{url}' lies under '{parent}', which is a file; choose another directory")
    if problem == "unwritable":
        raise ConfigError(f"{field} '{url}': this process may not write in '{parent}'; choose a writable "
                          "directory or fix its permissions")


def local_write_problem(path: str) -> tuple[str, str | None]:
    """The nearest existing folder of local ``path`` (or of a folder to be made there) and why this process
    cannot make the rest of it: ``"file"`` (that "folder" is a file), ``"unwritable"``, or None."""
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip("/"))
    if parent and not os.path.isdir(parent):
        return parent, "file"
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        return parent, "unwritable"
    return parent, None


# Query parameters whose values are credentials: presigned S3 (X-Amz-*), GCS (X-Goog-*), Azure SAS (sig),
# and the usual token / key / secret / password names.
_SECRET_PARAM = re.compile(r"^(x-amz-|x-goog-)|token|sig|secret|passw|pwd|key|credential|auth", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` safe to print or store: ``user:password@`` and credential query values become ``***``.

    ``https://u:p@host/c.jsonl?token=abc&n=1`` -> ``https://***@host/c.jsonl?token=***&n=1``. Strings
    without a scheme (local paths, hub ids) are returned unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or "/" in scheme:
        return url
    head, qmark, query = rest.partition("?")
    netloc, slash, path = head.partition("/")
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    out = f"{scheme}://{netloc}{slash}{path}"
    if not qmark:
        return out
    query, hashmark, fragment = query.partition("#")
    parts = []
    for part in query.split("&"):
        key, eq, _ = part.partition("=")
        parts.append(f"{key}={REDACTED}" if eq and _SECRET_PARAM.search(unquote_plus(key)) else part)
    return f"{out}?{'&'.join(parts)}{hashmark}{fragment}"


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URL in it passed through :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_values(obj):
    """A copy of a JSON-like value (dicts, lists, strings) with every string passed through :func:`redact_text`:
    what a config dump may hold before it is stored."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_values(v) for v in obj]
    return obj


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/', whatever the filesystem."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that the file appears whole or not at all."""
    fs, path = filesystem(url)
    _write_then_rename(fs, path, lambda tmp: fs.pipe_file(tmp, data))


def _write_then_rename(fs: fsspec.AbstractFileSystem, path: str, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it to ``path``; no temporary is left
    behind if either step fails."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        write(tmp)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode("utf-8"))


def remove(url: str) -> None:
    """Delete the file at ``url`` if it is there."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


COMPLETE_NAME = "COMPLETE.json"  # inside a directory written by atomic_dir: its files, sizes and sha256, last


@contextlib.contextmanager
def atomic_dir(url: str) -> Iterator[str]:
    """Yield a local directory to fill; when the block ends without an error it becomes ``url``, whole.

    Why: a directory of many files (an HF model) cannot be written in one step, and a crash
    halfway must never leave something under the final name that looks finished. Either way
    the directory gets :data:`COMPLETE_NAME` (each file's size and sha256), which
    :func:`dir_complete` checks.

    - Local disk: the block fills ``<url>.tmp-<id>`` beside ``url``, which is then renamed into
      place; an older ``url`` is renamed aside first and deleted after, so ``url`` holds the old
      version or the new one, never a mix. Temporaries of a killed writer are deleted by the next
      one (one writer per ``url`` at a time).
    - Object stores cannot rename a directory: the block fills a local temporary directory; then
      the old marker is deleted (from here on readers see no finished directory), the old files
      too, every file is uploaded (each atomically) and the marker is written last.

    If the block raises, nothing is published and an older ``url`` stays as it was.
    """
    fs, path = filesystem(url)
    if not _is_local(fs):
        with tempfile.TemporaryDirectory(prefix="raydistill-dir-") as staging:
            yield staging
            listing = _listing(staging)
            marker = f"{path}/{COMPLETE_NAME}"
            if fs.exists(marker):
                fs.rm(marker)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            for name in listing:
                local = os.path.join(staging, name)
                _write_then_rename(fs, f"{path}/{name}", lambda tmp, local=local: fs.put_file(local, tmp))
            atomic_write_text(join(url, COMPLETE_NAME), json.dumps({"files": listing}, indent=1))
        return
    _sweep_stale_dirs(path)
    staging = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    os.makedirs(staging)
    try:
        yield staging
        listing = _listing(staging)
        with open(os.path.join(staging, COMPLETE_NAME), "w", encoding="utf-8") as f:  # not yet under its final name
            json.dump({"files": listing}, f, indent=1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    aside = f"{path}.old-{uuid.uuid4().hex[:12]}" if os.path.lexists(path) else None
    if aside:
        os.rename(path, aside)
    os.rename(staging, path)
    if aside:
        shutil.rmtree(aside)


def dir_complete(url: str) -> bool:
    """Whether ``url`` is a directory that :func:`atomic_dir` finished: its marker is readable and every
    file it lists is there with the recorded size (sizes, not hashes: a check, not an audit)."""
    fs, path = filesystem(url)
    try:
        files = json.loads(read_text(join(url, COMPLETE_NAME)))["files"]
        return all(fs.size(f"{path}/{name}") == entry["size"] for name, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no marker, a bad one, a file missing
        return False


def _listing(local_dir: str) -> dict[str, dict]:
    """Every file under ``local_dir`` (relative '/' names, sorted) with its size and sha256."""
    out = {}
    for root, _, files in os.walk(local_dir):
        for file in files:
            full = os.path.join(root, file)
            name = os.path.relpath(full, local_dir).replace(os.sep, "/")
            digest = hashlib.sha256()
            with open(full, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            out[name] = {"size": os.path.getsize(full), "sha256": digest.hexdigest()}
    return dict(sorted(out.items()))


def _sweep_stale_dirs(path: str) -> None:
    """Delete what killed writers of ``path`` left beside it; an ``.old-`` copy is put back if it never got
    replaced (killed between atomic_dir's two renames)."""
    parent, base = os.path.split(path)
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        stale = os.path.join(parent, entry)
        if entry.startswith(f"{base}.old-") and not os.path.lexists(path):
            os.rename(stale, path)
        elif entry.startswith((f"{base}.tmp-", f"{base}.old-")):
            shutil.rmtree(stale, ignore_errors=True)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def list_files(url: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under ``url`` ending in ``suffix``, sorted."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
