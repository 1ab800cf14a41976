"""One fsspec layer for every read and write: local paths, s3://, gs://, memory:// alike.

All writes that other stages rely on go through :func:`atomic_write_bytes`, so a reader
never sees a half-written file: data goes to a temporary name next to the target and is
renamed into place only once complete.
"""

from __future__ import annotations

import hashlib
import os
import uuid

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
        raise ConfigError(f"'{url}': the {protocol}:// filesystem needs a package that is not installed "
                          f"({first_line(err)}); e.g. pip install 'raydistill[s3]' for s3://") from None
    except ValueError as err:  # a protocol fsspec does not know
        raise ConfigError(f"'{url}': {first_line(err)}; use a local path or an fsspec URL (s3://, gs://, "
                          "memory://, ...)") from None
    fs.invalidate_cache(path)
    return fs, path


def check_output(url: str, field: str) -> None:
    """Refuse, before any work, an output that cannot be a directory we write into: a file, a path
    under a file, or a local directory this process may not write. Object stores are checked by
    their first write."""
    fs, path = filesystem(url)
    if fs.exists(path) and not fs.isdir(path):
        raise ConfigError(f"{field} '{url}' is a file, not a directory; choose a directory path")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local"):
        return
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip("/"))
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"{field} '{url}' lies under '{parent}', which is a file; choose another directory")
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{field} '{url}': this process may not write in '{parent}'; choose a writable "
                          "directory or fix its permissions")


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
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    try:
        fs.mv(tmp, path)
    except Exception:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode("utf-8"))


def list_files(url: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under ``url`` ending in ``suffix``, sorted."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
