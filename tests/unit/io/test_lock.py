"""One run per output (io/lock.py): acquire, refuse naming the holder, take over a dead holder's lock, release."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from support import moto_s3, wait_for

from raydistill.io import lock as lock_module
from raydistill.io.lock import LOCK_NAME, STALE_AFTER_S, LockHolder, OutputLockedError, hold_output


def record(tmp_out, **fields) -> dict:
    """Write a lock record into ``tmp_out`` as another run would have left it."""
    me = psutil.Process()
    data = {"host": socket.gethostname(), "pid": me.pid, "process_started": me.create_time(),
            "started_at": "2026-01-02T03:04:05Z", "command": "raydistill capture other.yaml", "what": "capture",
            "token": "f" * 32, **fields}
    os.makedirs(tmp_out, exist_ok=True)
    with open(os.path.join(tmp_out, LOCK_NAME), "w") as f:
        json.dump(data, f)
    return data


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_the_lock_is_held_for_the_block_and_removed_after(tmp_path):
    out = tmp_path / "out"
    with hold_output(str(out), "capture"):
        holder = LockHolder.from_bytes((out / LOCK_NAME).read_bytes())
        assert holder.pid == os.getpid() and holder.host == socket.gethostname() and holder.what == "capture"
        assert holder.process_started == pytest.approx(psutil.Process().create_time())
        (out / "plan.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["plan.json"]  # no lock, no temporary left


def test_a_refused_or_empty_run_leaves_no_folder_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(ValueError), hold_output(str(out), "capture"):
        raise ValueError("refused before any work")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_released_on_an_error_and_on_ctrl_c(tmp_path, interrupt):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(interrupt), hold_output(str(out), "train"):
        raise interrupt()
    assert os.listdir(out) == []
    with hold_output(str(out), "train"):  # and can be taken again at once
        pass


def test_a_live_holder_is_refused_with_its_host_pid_start_and_how_to_remove_it(tmp_path):
    out = tmp_path / "out"
    parent = psutil.Process().parent()  # alive for the whole test
    held = record(out, pid=parent.pid, process_started=parent.create_time())
    with pytest.raises(OutputLockedError) as err, hold_output(str(out), "capture"):
        pytest.fail("entered a held output")
    message = str(err.value)
    assert "\n" not in message
    for needle in (f"pid {parent.pid}", f"host {socket.gethostname()}", "started 2026-01-02T03:04:05Z",
                   "raydistill capture other.yaml", f"delete {out / LOCK_NAME}"):
        assert needle in message, (needle, message)
    assert json.loads((out / LOCK_NAME).read_text()) == held  # the holder's lock is left alone


def test_another_thread_of_the_same_process_is_refused_but_the_same_thread_may_nest(tmp_path):
    out = str(tmp_path / "out")
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with hold_output(out, "capture"):
                pass
        except OutputLockedError as err:
            errors.append(err)

    with hold_output(out, "capture"):
        with hold_output(out, "capture"):  # a stage inside another on the same output
            pass
        assert os.path.exists(os.path.join(out, LOCK_NAME))  # the inner block did not release it
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
    assert len(errors) == 1 and f"pid {os.getpid()}" in str(errors[0])


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    pid, started = dead_pid()
    record(out, pid=pid, process_started=started)
    with caplog.at_level(logging.WARNING, logger="raydistill.io.lock"), hold_output(str(out), "capture"):
        assert LockHolder.from_bytes((out / LOCK_NAME).read_bytes()).pid == os.getpid()
    assert any(f"process {pid} is gone" in r.getMessage() for r in caplog.records), caplog.text
    assert os.listdir(out) == []


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, caplog):
    out = tmp_path / "out"
    record(out, pid=os.getpid(), process_started=psutil.Process().create_time() - 3600)  # our pid, an older process
    with caplog.at_level(logging.WARNING, logger="raydistill.io.lock"), hold_output(str(out), "capture"):
        pass
    assert any("now belongs to another process" in r.getMessage() for r in caplog.records), caplog.text


def test_another_hosts_lock_is_refused_while_fresh_and_taken_over_once_stale(tmp_path, caplog):
    out = tmp_path / "out"
    record(out, host="node-7", pid=4242)
    with pytest.raises(OutputLockedError) as err, hold_output(str(out), "capture"):
        pass
    assert "host node-7" in str(err.value) and "refreshed" in str(err.value)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(out / LOCK_NAME, (old, old))  # its heartbeat stopped 11 minutes ago
    with caplog.at_level(logging.WARNING, logger="raydistill.io.lock"), hold_output(str(out), "capture"):
        pass
    assert any("not refreshed for 11 minutes" in r.getMessage() for r in caplog.records), caplog.text


def test_an_unreadable_lock_is_refused_until_stale(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("not json")
    with pytest.raises(OutputLockedError, match="cannot be read"), hold_output(str(out), "capture"):
        pass
    old = time.time() - STALE_AFTER_S - 60
    os.utime(out / LOCK_NAME, (old, old))
    with hold_output(str(out), "capture"):
        pass


def test_the_heartbeat_refreshes_the_lock_and_notices_when_it_is_taken(tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    with caplog.at_level(logging.ERROR, logger="raydistill.io.lock"), hold_output(str(out), "capture"):
        path = out / LOCK_NAME
        os.utime(path, (1, 1))
        deadline = time.monotonic() + 10
        while path.stat().st_mtime < 2 and time.monotonic() < deadline:  # wait for a beat
            time.sleep(0.01)
        assert path.stat().st_mtime > time.time() - 60
        record(out, token="e" * 32)  # another run replaced it
        while "no longer ours" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "no longer ours" in caplog.text
    assert json.loads(path.read_text())["token"] == "e" * 32  # the other run's lock is not deleted


CONTENDER = """
import os, sys, time
from raydistill.io.lock import OutputLockedError, hold_output
out, go = sys.argv[1], sys.argv[2]
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):  # all start together once the test creates this file
    time.sleep(0.001)
try:
    with hold_output(out, "capture"):
        print("held", flush=True)
        time.sleep(2.0)
except OutputLockedError as err:
    print(f"refused: {err}", flush=True)
"""


@pytest.mark.parametrize("stale", [False, True])
def test_of_processes_starting_at_once_exactly_one_holds_the_output(tmp_path, stale):
    out, go = str(tmp_path / "out"), tmp_path / "go"
    if stale:  # all of them find the same dead holder's lock and race to take it over
        pid, started = dead_pid()
        record(out, pid=pid, process_started=started)
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, out, str(go)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    wait_for(lambda: len(list(tmp_path.glob("go.ready-*"))) == len(procs), 60, "every contender to start")
    go.write_text("")
    outcomes = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outcomes.count("held") == 1, outcomes
    assert all("is in use" in o and "pid" in o for o in outcomes if o != "held"), outcomes
    assert not os.path.exists(out) or os.listdir(out) == []  # no lock left (nor the folder, if the holder made it)


def test_on_s3_the_lock_is_a_conditional_put(tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setattr(lock_module, "SETTLE_S", 0.0)
    with moto_s3():
        fs = s3fs.S3FileSystem()
        fs.mkdir("locks")
        out = "s3://locks/run"
        with hold_output(out, "train"):
            holder = LockHolder.from_bytes(fs.cat_file(f"locks/run/{LOCK_NAME}"))
            assert holder.pid == os.getpid()
            errors: list[BaseException] = []

            def second() -> None:
                try:
                    with hold_output(out, "train"):
                        pass
                except OutputLockedError as err:
                    errors.append(err)

            thread = threading.Thread(target=second)
            thread.start()
            thread.join()
            assert len(errors) == 1 and f"delete s3://locks/run/{LOCK_NAME}" in str(errors[0])
        assert not fs.exists(f"locks/run/{LOCK_NAME}")
        pid, started = dead_pid()
        me = psutil.Process()
        fs.pipe_file(f"locks/run/{LOCK_NAME}", json.dumps({
            "host": socket.gethostname(), "pid": pid, "process_started": started, "started_at": "x",
            "command": "c", "what": "train", "token": "d" * 32}).encode())
        with hold_output(out, "train"):  # a dead holder's lock: taken over with If-Match on its ETag
            assert LockHolder.from_bytes(fs.cat_file(f"locks/run/{LOCK_NAME}")).pid == me.pid
        assert not fs.exists(f"locks/run/{LOCK_NAME}")
