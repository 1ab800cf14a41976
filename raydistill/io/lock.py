"""One run per output: :func:`hold_output` keeps a lock file in an output while a command writes there.

Two captures (or selects, or trainings) writing one output at once would each sweep the other's
temporaries and race on the completion records; this refuses the second one, naming the first.

The lock is ``<output>/.raydistill-lock``, a small JSON record of its holder (host, pid, the
process's start time, when and by which command it was taken, a random token). It is not named
``*.json``: a corpus folder read recursively never takes it for a document, and ``raydistill
verify`` looks for unknown files under ``shards/`` only. It is deleted when the block ends, on an
error or Ctrl-C too; a process killed outright leaves it behind, and the next run takes it over:

- **same host**: the holder is dead if its pid is gone or now belongs to a process started at
  another time (pid reuse), checked with psutil;
- **another host** (a shared filesystem or an object store): the holder's pid cannot be checked
  from here, so the holder refreshes the lock every :data:`HEARTBEAT_S` seconds (a daemon thread)
  and a lock not refreshed for :data:`STALE_AFTER_S` seconds is taken over. Until then the run is
  refused with the command that deletes the lock, for when the holder is known to be dead.

Taking the lock is atomic where the storage allows it:

- **local disks and NFS / Lustre**: the record is written to a temporary file and hard-linked to
  the lock name, which fails if the name exists (atomic on local disks and on NFS). Taking over a
  stale lock goes through a second exclusive file (``.raydistill-lock.break``), so of two runs
  that find the same stale lock only one replaces it;
- **S3** (s3fs): a conditional put (``If-None-Match: *``) creates the lock, a put conditional on
  the stale lock's ETag (``If-Match``) takes one over, and heartbeats are conditional on our own
  ETag, so a holder whose lock was taken over hears of it;
- **other object stores** (gs://, ...): write if absent, wait :data:`SETTLE_S`, read back and
  compare tokens; two runs starting within that window of each other could both pass (a small
  race; the heartbeat notices a lost lock and logs an error). S3 gets the same read-back, which
  also catches S3-compatible stores that ignore conditional headers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import fsspec
import psutil

from raydistill.errors import RaydistillError
from raydistill.io import storage

__all__ = ["HEARTBEAT_S", "LOCK_NAME", "STALE_AFTER_S", "LockHolder", "OutputLockedError", "hold_output",
           "lock_url"]

log = logging.getLogger(__name__)

LOCK_NAME = ".raydistill-lock"
HEARTBEAT_S = 60.0  # how often a holder refreshes its lock
STALE_AFTER_S = 600.0  # a lock of another host not refreshed for this long is taken over
SETTLE_S = 1.0  # object stores: wait this long after writing the lock before reading it back
BREAKER_STALE_S = 30.0  # a takeover marker older than this was left by a killed taker
PID_START_TOLERANCE_S = 1.0  # process start times are recorded to about 10 ms; pid reuse differs by far more
_ATTEMPTS = 6


class OutputLockedError(RaydistillError):
    """Another live command holds the output."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output: the record in the lock file."""

    host: str
    pid: int
    process_started: float  # the holder's process start time (epoch s): tells pid reuse apart
    started_at: str  # when the lock was taken, UTC ISO 8601
    command: str
    what: str
    token: str

    @classmethod
    def me(cls, what: str) -> LockHolder:
        return cls(host=socket.gethostname(), pid=os.getpid(), process_started=psutil.Process().create_time(),
                   started_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   command=storage.redact_text(" ".join([_program(), *sys.argv[1:]]))[:300],
                   what=what, token=uuid.uuid4().hex)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> LockHolder | None:
        """The record, or None if the bytes are not one (empty, truncated, another tool's file)."""
        try:
            record = json.loads(data.decode("utf-8"))
            return cls(host=str(record["host"]), pid=int(record["pid"]),
                       process_started=float(record["process_started"]), started_at=str(record["started_at"]),
                       command=str(record["command"]), what=str(record["what"]), token=str(record["token"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def describe(self) -> str:
        return f"{self.what} by pid {self.pid} on host {self.host}, started {self.started_at} (`{self.command}`)"


def _program() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return "raydistill" if name in ("__main__.py", "cli.py") else name  # `python -m raydistill ...`


def lock_url(output: str) -> str:
    return storage.join(output, LOCK_NAME)


# Outputs this process holds, per thread, with their depth: a stage called inside another holding the
# same output (same thread) goes through; any other thread of this process is refused like any process.
_held: dict[tuple[str, int], int] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def hold_output(output: str, what: str) -> Iterator[None]:
    """Hold ``output`` for the block: refuse (:class:`OutputLockedError`, one line naming the holder)
    if another live command holds it, take it over with a warning if its holder is dead.

    Re-entrant in one thread (a stage run inside another on the same output); sequential use is
    fine (the lock is gone when the block ends)."""
    fs, path = storage.filesystem(output)
    key = (fs.unstrip_protocol(path) if not _is_local(fs) else os.path.abspath(path), threading.get_ident())
    with _held_guard:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    lock = _lock_for(fs, path, output)
    lock.acquire(what)
    with _held_guard:
        _held[key] = 1
    beat = _Heartbeat(lock)
    beat.start()
    try:
        yield
    finally:
        beat.stop()
        with _held_guard:
            _held.pop(key, None)
        lock.release()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _lock_for(fs: fsspec.AbstractFileSystem, path: str, output: str) -> _Lock:
    if _is_local(fs):
        return _LocalLock(fs, path, output)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if {"s3", "s3a"} & set(protocols):
        return _S3Lock(fs, path, output)
    return _StoreLock(fs, path, output)


def _this_host() -> str:
    return socket.gethostname()


def _why_stale(holder: LockHolder | None, age_s: float) -> str | None:
    """Why the lock's holder is dead (a reason for the warning), or None if it may be alive."""
    if holder is not None and holder.host == _this_host():
        try:
            process = psutil.Process(holder.pid)
            started = process.create_time()
            if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent
                return f"process {holder.pid} is gone"
        except psutil.NoSuchProcess:  # ZombieProcess included
            return f"process {holder.pid} is gone"
        except psutil.Error:  # exists but cannot be inspected (another user's): alive
            return None
        if abs(started - holder.process_started) > PID_START_TOLERANCE_S:
            return f"pid {holder.pid} now belongs to another process"
        return None
    if age_s > STALE_AFTER_S:
        return f"not refreshed for {age_s / 60:.0f} minutes"
    return None


class _Lock:
    """The protocol every storage kind implements; ``acquire`` loops until it holds or refuses."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, output: str):
        self.fs, self.output = fs, output
        self.dir = path.rstrip("/")
        self.path = f"{self.dir}/{LOCK_NAME}"
        self.url = lock_url(output)
        self.me: LockHolder | None = None
        self.lost = False
        self.made: list[str] = []  # directories the lock made (local disks), outermost first

    def acquire(self, what: str) -> None:
        self.me = LockHolder.me(what)
        self._makedirs()
        for _ in range(_ATTEMPTS):
            if self._create():
                return
            found = self._read()
            if found is None:  # released between our try and our look: try again
                continue
            holder, age_s, version = found
            why = _why_stale(holder, age_s)
            if why is None:
                raise self._refusal(holder, age_s)
            if self._take_over(holder, version):
                who = holder.describe() if holder else "an unreadable lock record"
                log.warning("took over %s: its holder (%s) is dead (%s)", storage.redact_url(self.url), who, why)
                return
            time.sleep(0.05)  # another run is taking it over: look again
        raise OutputLockedError(f"could not take the lock {storage.redact_url(self.url)} after {_ATTEMPTS} "
                                "attempts (other runs are starting on this output); run one command at a time")

    def _refusal(self, holder: LockHolder | None, age_s: float) -> OutputLockedError:
        url = storage.redact_url(self.url)
        who = holder.describe() if holder else "a run whose lock record cannot be read"
        remote = holder is None or holder.host != _this_host()
        when = (f"; its lock was refreshed {age_s:.0f} s ago, and is taken over once {STALE_AFTER_S / 60:.0f} "
                "minutes pass without a refresh") if remote else ""
        return OutputLockedError(f"output {storage.redact_url(self.output)} is in use: {who}{when}; wait for it "
                                 f"to finish, or, if that process is dead, delete {url} and run again")

    # --- storage-specific -----------------------------------------------------------------------

    def _makedirs(self) -> None:
        self.fs.makedirs(self.dir, exist_ok=True)

    def _remove_made_dirs(self) -> None:
        """After release: the directories the lock itself made, if nothing else was written there."""

    def _create(self) -> bool:
        """Create the lock with our record if there is none; True if we hold it now."""
        raise NotImplementedError

    def _read(self) -> tuple[LockHolder | None, float, object] | None:
        """(holder, seconds since last refreshed, version for a conditional takeover), or None if absent."""
        raise NotImplementedError

    def _take_over(self, holder: LockHolder | None, version: object) -> bool:
        raise NotImplementedError

    def refresh(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


class _LocalLock(_Lock):
    """Local disk or a shared POSIX filesystem: hard links make creation atomic."""

    def _makedirs(self) -> None:
        missing, parent = [], self.dir
        while parent and not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        self.made = missing[::-1]
        os.makedirs(self.dir, exist_ok=True)

    def _remove_made_dirs(self) -> None:
        # a command refused before it wrote anything leaves no empty output folder behind
        for directory in reversed(self.made):
            try:
                os.rmdir(directory)
            except OSError:  # not empty (the stage wrote there), or gone
                return

    def _create(self) -> bool:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as f:
            f.write(self.me.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        holder = LockHolder.from_bytes(data)
        return holder, max(0.0, time.time() - mtime), holder.token if holder else data

    def _take_over(self, holder, version) -> bool:
        breaker = f"{self.path}.break"
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(breaker).st_mtime > BREAKER_STALE_S:
                    os.unlink(breaker)  # left by a taker killed mid-takeover
            return False
        try:
            os.close(fd)
            now = self._read()
            if now is None or now[2] != version:
                return False  # changed since we looked: look again
            os.unlink(self.path)
            return self._create()
        finally:
            os.unlink(breaker)

    def _mine(self) -> bool:
        now = self._read()
        return now is not None and now[0] is not None and now[0].token == self.me.token

    def refresh(self) -> None:
        if not self._mine():
            raise _LockLost
        os.utime(self.path)

    def release(self) -> None:
        if self._mine():
            os.unlink(self.path)
        self._remove_made_dirs()


class _LockLost(Exception):
    """Our lock file is gone or holds another run's record."""


class _StoreLock(_Lock):
    """An object store without conditional writes that we use: write if absent, settle, read back."""

    def _makedirs(self) -> None:
        with contextlib.suppress(OSError):  # object stores have no directories; some refuse to make them
            self.fs.makedirs(self.dir, exist_ok=True)

    def _put(self, mode: str = "overwrite", **kwargs) -> None:
        self.fs.pipe_file(self.path, self.me.to_bytes(), mode=mode, **kwargs)
        self.fs.invalidate_cache(self.path)

    def _create(self) -> bool:
        try:
            self._put(mode="create")
        except FileExistsError:
            return False
        return self._confirmed()

    def _confirmed(self) -> bool:
        time.sleep(SETTLE_S)
        return self._mine()

    def _read(self):
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return None
        holder = LockHolder.from_bytes(data)
        try:
            age = max(0.0, time.time() - self.fs.modified(self.path).timestamp())
        except (NotImplementedError, OSError, AttributeError):
            age = 0.0
        return holder, age, self._version(holder, data, info)

    def _version(self, holder, data, info) -> object:
        return holder.token if holder else data

    def _mine(self) -> bool:
        now = self._read()
        return now is not None and now[0] is not None and now[0].token == self.me.token

    def _take_over(self, holder, version) -> bool:
        now = self._read()
        if now is None or now[2] != version:
            return False
        self._put()
        return self._confirmed()

    def refresh(self) -> None:
        if not self._mine():
            raise _LockLost
        self._put()

    def release(self) -> None:
        if self._mine():
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)


class _S3Lock(_StoreLock):
    """S3: conditional puts (If-None-Match to create, If-Match to take over and refresh)."""

    def _version(self, holder, data, info) -> object:
        return info.get("ETag")

    def _conditional(self, **kwargs) -> bool:
        try:
            self._put(**kwargs)
        except FileExistsError:
            return False
        except OSError as err:  # 412 Precondition Failed: someone else wrote it first
            if "pre-condition" in str(err).lower() or "precondition" in str(err).lower():
                return False
            raise
        return True

    def _create(self) -> bool:
        return self._conditional(mode="create") and self._confirmed()

    def _take_over(self, holder, version) -> bool:
        return bool(version) and self._conditional(IfMatch=version) and self._confirmed()

    def refresh(self) -> None:
        now = self._read()
        if now is None or now[0] is None or now[0].token != self.me.token or not self._conditional(IfMatch=now[2]):
            raise _LockLost


class _Heartbeat:
    """Refreshes a held lock every HEARTBEAT_S seconds in a daemon thread, so runs on other hosts can
    tell a live holder from a dead one; logs an error once if the lock was lost (taken over)."""

    def __init__(self, lock: _Lock, every: float | None = None):
        self.lock, self.every = lock, HEARTBEAT_S if every is None else every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydistill-lock-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.lock.refresh()
            except _LockLost:
                self.lock.lost = True
                log.error("the lock %s is no longer ours (another run took it over); two runs may now be "
                          "writing %s", storage.redact_url(self.lock.url), storage.redact_url(self.lock.output))
                return
            except Exception as err:  # a storage hiccup: try again next beat
                log.warning("could not refresh the lock %s: %s", storage.redact_url(self.lock.url), err)
