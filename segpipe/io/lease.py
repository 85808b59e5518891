"""One segment run at a time per OUTPUT: a lease file naming its holder, renewed while the run
works, and checked by every prediction file before it is committed.

``OUTPUT/.segpipe-lease.json`` holds the run's id, host, pid, command and the time it was last
renewed (every ``RENEW_EVERY_S``). A second run (or a ``--resume``) refuses an OUTPUT whose
lease is live, naming the holder. A lease is stale, and is taken over, when it was not renewed
for ``STALE_AFTER_S`` or when its holder was on this host and its process is gone (a killed
driver). On a local disk the lease is created with ``O_EXCL``; on an object store, where
pyarrow has no conditional write, it is written, left to settle for ``SETTLE_S`` and read back:
of two runs started together, only the last writer finds its own id and goes on.

Fencing: the write tasks commit a prediction file only while the lease still names their run
(``check_holder``), so a write that lands after its driver was killed and the OUTPUT taken over
by a ``--resume`` is dropped instead of being counted twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import pyarrow.fs as pafs

from segpipe.config import ConfigError
from segpipe.io import storage

LEASE_NAME = ".segpipe-lease.json"
RENEW_EVERY_S = 20.0
STALE_AFTER_S = 120.0
SETTLE_S = 2.0


class LeaseHeld(ConfigError):
    """OUTPUT is in use by another live segpipe run."""


class LeaseLost(RuntimeError):
    """This run's lease now names another run: its writes must not be committed."""


def lease_path(output: str) -> tuple[pafs.FileSystem, str]:
    fs, root = storage.resolve(output)
    return fs, storage.join(root, LEASE_NAME)


#: What ``read_lease`` returns for a lease file that is there but holds no valid record (a
#: full disk's 0 bytes, garbage): judged by the file's age alone (``is_stale``).
UNREADABLE = "unreadable"


def read_lease(fs: pafs.FileSystem, path: str) -> Optional[dict]:
    """The lease record at ``path``; None when there is no lease file; for a file that holds
    no valid record, ``{"unreadable": why, "renewed": its modification time}``."""
    try:
        data = storage.read_bytes(fs, path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _unreadable(fs, path, f"cannot be read ({exc.strerror or exc})")
    try:
        record = json.loads(data)
        if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
            raise ValueError("no run id")
        renewed = float(record.get("renewed", "nan"))
        if not math.isfinite(renewed):
            raise ValueError("bad renewal time")
        return {**record, "renewed": renewed}
    except (ValueError, TypeError, OverflowError):
        what = f"{len(data)} bytes" if data else "empty"
        return _unreadable(fs, path, f"holds no valid lease ({what})")


def _unreadable(fs: pafs.FileSystem, path: str, why: str) -> Optional[dict]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    changed = info.mtime_ns / 1e9 if info.mtime_ns is not None else 0.0
    return {UNREADABLE: why, "renewed": changed}


def _alive_here(holder: dict) -> bool:
    """False when the holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def is_stale(holder: dict, now: float) -> bool:
    return now - float(holder.get("renewed", 0)) > STALE_AFTER_S or not _alive_here(holder)


def describe(holder: dict, now: float) -> str:
    seen = max(0, int(now - float(holder.get("renewed", 0))))
    if UNREADABLE in holder:
        return f"a lease file that {holder[UNREADABLE]}, last changed {seen} s ago"
    return (f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')}, last renewed {seen} s ago: "
            f"{holder.get('command', '')[:200]})")


def check_holder(output: str, run_id: str) -> None:
    """Raise ``LeaseLost`` unless OUTPUT's lease names ``run_id`` (the write tasks' fence)."""
    fs, path = lease_path(output)
    holder = read_lease(fs, path)
    # only a lease naming another run is a take-over: a lease deleted or damaged under a live
    # run is not (its renewal writes it again)
    if holder is not None and UNREADABLE not in holder and holder.get("run_id") != run_id:
        raise LeaseLost(f"OUTPUT's lease names run {holder.get('run_id')}, not this run "
                        f"{run_id}: another run took OUTPUT over, so this write is dropped")


@dataclass
class Lease:
    """A held lease; ``release`` deletes it. A thread renews it until then."""

    output: str
    run_id: str
    record: dict
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None
    lost: Optional[str] = None

    def start_renewing(self, every_s: float = RENEW_EVERY_S) -> None:
        def renew() -> None:
            fs, path = lease_path(self.output)
            while not self._stop.wait(every_s):
                holder = read_lease(fs, path)
                if holder is not None and UNREADABLE not in holder and \
                        holder.get("run_id") != self.run_id:
                    self.lost = describe(holder, time.time())
                    return
                # ours, or deleted or damaged under this live run: (re)write it
                self.record["renewed"] = time.time()
                try:
                    storage.write_bytes_atomic(fs, path, json.dumps(self.record).encode())
                except OSError:
                    continue   # try again at the next tick; stale only after STALE_AFTER_S

        self._thread = threading.Thread(target=renew, name="segpipe-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        fs, path = lease_path(self.output)
        holder = read_lease(fs, path)
        if holder is not None and holder.get("run_id") == self.run_id:
            try:
                fs.delete_file(path)
            except OSError:
                pass


def acquire(output: str, command: Optional[str] = None,
            clock: Callable[[], float] = time.time, what: str = "OUTPUT") -> Lease:
    """Take OUTPUT's lease for a new run, or raise ``LeaseHeld`` naming the live holder;
    ``what`` names the folder in messages (an export's ``--to`` holds a lease too)."""
    fs, path = lease_path(output)
    now = clock()
    run_id = uuid.uuid4().hex[:16]
    record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
              "command": storage.redact(command if command is not None else " ".join(sys.argv)),
              "started": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(
                  timespec="seconds"),
              "renewed": now}
    data = json.dumps(record).encode()
    holder = read_lease(fs, path)
    if holder is not None and not is_stale(holder, now):
        raise _held(output, holder, now, what)
    if holder is None and isinstance(fs, pafs.LocalFileSystem):
        try:   # the one atomic "create if absent" every local disk has
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_lease(fs, path) or {UNREADABLE: "appeared meanwhile", "renewed": now}
            raise _held(output, holder, now, what) from None
        try:
            with os.fdopen(descriptor, "wb") as f:
                f.write(data)
        except BaseException:   # a full disk: leave no empty lease behind
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return Lease(output, run_id, record)
    # A stale lease to take over, or an object store: write, let concurrent writers land,
    # and go on only if the lease still names this run.
    storage.write_bytes_atomic(fs, path, data)
    time.sleep(SETTLE_S)
    holder = read_lease(fs, path)
    if holder is None or holder.get("run_id") != run_id:
        raise _held(output, holder or {}, clock(), what)
    return Lease(output, run_id, record)


def _live_holder(folder: str, now: float) -> Optional[dict]:
    """Who holds ``folder``'s lease now, or None (no lease, or a stale one)."""
    fs, path = lease_path(folder)
    if fs.get_file_info(posixpath.dirname(path)).type == pafs.FileType.NotFound:
        return None
    holder = read_lease(fs, path)
    return holder if holder is not None and not is_stale(holder, now) else None


def check_free(output: str, clock: Callable[[], float] = time.time, what: str = "OUTPUT") -> None:
    """Raise ``LeaseHeld`` when a live run holds OUTPUT's lease (the early check; ``acquire``
    decides)."""
    holder = _live_holder(output, clock())
    if holder is not None:
        raise _held(output, holder, clock(), what)


def check_not_being_written(output: str, clock: Callable[[], float] = time.time) -> None:
    """Raise ``LeaseHeld`` when a live command holds OUTPUT's lease: its predictions are still
    being written, so export, review, eval and render cannot read them yet."""
    now = clock()
    holder = _live_holder(output, now)
    if holder is not None:
        left = max(0, int(STALE_AFTER_S - (now - float(holder.get("renewed", now)))))
        raise LeaseHeld(
            f"OUTPUT {storage.redact(output)} is being written now by {describe(holder, now)}: "
            "its predictions are not finished, so nothing can be read from them yet. Run "
            "this when that command has finished (if it was killed, its lease goes stale "
            f"{left} s from now, or at once once its process is gone, on the same host)")


@contextlib.contextmanager
def holding(folder: str, what: str) -> Iterator[Lease]:
    """Hold ``folder``'s lease (renewed) while the block runs: one writer at a time for the
    folders export, review and render write, as for a segment OUTPUT."""
    lease = acquire(folder, what=what)
    lease.start_renewing()
    try:
        yield lease
    finally:
        lease.release()


def _held(output: str, holder: dict, now: float, what: str = "OUTPUT") -> LeaseHeld:
    left = max(0, int(STALE_AFTER_S - (now - float(holder.get("renewed", now)))))
    segment = what == "OUTPUT"
    if UNREADABLE in holder:
        fs, path = lease_path(output)
        return LeaseHeld(
            f"{what} {storage.redact(output)} has {describe(holder, now)} ({path}). A command "
            f"may be starting there; if none is, the lease goes stale {left} s from now and the "
            f"next one takes it over, or delete {path} now and rerun"
            + (" (with --resume to keep what is in predictions/)" if segment else ""))
    return LeaseHeld(
        f"{what} {storage.redact(output)} is in use by another segpipe command: "
        f"{describe(holder, now)}. Two commands must not write one folder; wait for it to "
        f"finish. If it was killed, its lease goes stale {left} s from now (or at once once "
        f"its process is gone, on the same host); then rerun"
        + (" with --resume" if segment else "") + f". The lease is {LEASE_NAME} in {what}")
