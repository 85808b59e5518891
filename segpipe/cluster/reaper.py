"""End the processes of a local Ray whose driver died without shutting it down.

``ray.init()`` without an address starts a Ray of the driver's own (GCS, raylet, dashboard,
agents, workers). A driver that dies by SIGKILL (or the OOM killer) cannot shut it down; most
of its processes end with the raylet, but the DashboardAgent and RuntimeEnvAgent then wait up
to a minute on a report to the dead GCS and ignore SIGTERM meanwhile. So while segpipe holds
a local Ray, ``watch_local_ray`` runs this module as a small process of its own session: it
notes the Ray processes the driver names and their descendants every ``POLL_S`` seconds, as
``(pid, start time)``, and when the pipe from the driver closes without the word ``done``
(the driver is gone), it gives them
``GRACE_S`` seconds to end, then SIGKILLs those still there. It kills nothing else: a pid is
killed only while its start time is still the one noted. Linux only (``/proc``); elsewhere
it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from typing import Iterator

POLL_S = 1.0
GRACE_S = 3.0
DONE = b"done"
WATCH = b"watch "


def _processes() -> dict[int, tuple[int, int]]:
    """Every process of this machine: pid → (parent pid, start time in clock ticks)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(entry)] = (int(fields[1]), int(fields[19]))   # ppid, starttime
    return found


def descendants(root: int, processes: dict[int, tuple[int, int]]) -> set[tuple[int, int]]:
    """``(pid, start time)`` of every descendant of ``root`` among ``processes``."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.add((pid, processes[pid][1]))
        todo.extend(children.get(pid, []))
    return found


def reap(stream=None) -> int:
    """Read the pids of a local Ray's own processes from ``stream`` (stdin: a line ``watch
    PID...``), note them and their descendants until the pipe says ``done`` or closes; on a
    close, end what it noted (module docstring). Returns how many it killed."""
    stream = stream or sys.stdin.buffer
    roots: set[int] = set()
    noted: set[tuple[int, int]] = set()
    heard = b""
    while True:
        processes = _processes()
        for root in roots:
            if root in processes:
                noted.add((root, processes[root][1]))
            noted |= descendants(root, processes)
        ready, _, _ = select.select([stream], [], [], POLL_S)
        if not ready:
            continue
        said = os.read(stream.fileno(), 4096)
        if not said:   # the driver is gone
            break
        heard += said
        *lines, heard = heard.split(b"\n")
        for line in lines:
            if line == DONE:
                return 0
            if line.startswith(WATCH):
                roots |= {int(pid) for pid in line[len(WATCH):].split()}
    deadline = time.monotonic() + GRACE_S
    alive = noted
    while time.monotonic() < deadline:
        alive = {p for p in noted if _processes().get(p[0], (0, -1))[1] == p[1]}
        if not alive:
            return 0
        time.sleep(0.2)
    killed = 0
    for pid, started in alive:
        if _processes().get(pid, (0, -1))[1] == started:   # still the process noted
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


class LocalRayWatch:
    """The pipe to a reaper process (``watch_local_ray``)."""

    def __init__(self, reaper: "subprocess.Popen | None"):
        self._reaper = reaper

    def watch(self, pids: list[int]) -> None:
        """Have the reaper watch these processes (a local Ray's own) and their children."""
        self._say(WATCH + " ".join(str(p) for p in pids).encode() + b"\n")

    def _say(self, text: bytes) -> None:
        if self._reaper is not None and self._reaper.stdin is not None:
            with contextlib.suppress(OSError):
                self._reaper.stdin.write(text)
                self._reaper.stdin.flush()


@contextlib.contextmanager
def watch_local_ray(package_parent: str) -> Iterator[LocalRayWatch]:
    """While the block runs, a reaper process ends the processes it is told to ``watch`` (a
    local Ray of this process's own) should this process die without shutting them down.
    It is told ``done`` when the block ends, however it ends. ``package_parent``: the folder
    holding the segpipe package the reaper runs from (first on its import path)."""
    if not os.path.isdir("/proc/self"):
        yield LocalRayWatch(None)
        return
    path = os.pathsep.join([package_parent, *filter(None, [os.environ.get("PYTHONPATH")])])
    reaper = subprocess.Popen([sys.executable, "-m", "segpipe.cluster.reaper"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": path})
    watch = LocalRayWatch(reaper)
    try:
        yield watch
    finally:
        watch._say(DONE + b"\n")
        with contextlib.suppress(OSError):
            assert reaper.stdin is not None
            reaper.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(timeout=5)


if __name__ == "__main__":
    reap()
