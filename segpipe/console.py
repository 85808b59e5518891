"""What a command shows: segpipe's own lines on the terminal, everything Ray says in a log file.

Ray writes to the process's stderr from Python loggers, from its C++ core (glog lines such as
``core_worker.cc``) and from worker output it forwards. None of that is meant for the user of
a finished tool, and none of it can be silenced from Python alone. ``output_to_log`` points file
descriptor 2 at a log file while Ray runs (so every writer is caught, C++ included) and restores
it afterwards; segpipe's own lines go to stdout and are not touched. ``RunLog`` places the log
in ``OUTPUT/logs/`` (a local file first when OUTPUT is a bucket, copied there at the end), and
``translate`` turns the few things in it that a user must know into segpipe's words.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, TextIO

import pyarrow.fs as pafs

from segpipe.io import storage
from segpipe.names import printable
from segpipe.output.run_folder import LOGS_DIR

#: Things Ray logs that change what a user should do, and what segpipe says about them.
TRANSLATIONS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"(killed|kill) .{0,80}(memory|OOM)|OutOfMemoryError|memory monitor", re.I),
     "WARNING: Ray killed worker processes because a node ran low on memory; the work was "
     "retried, but lower --batch-size or --actors (or give the nodes more memory) to avoid it"),
    (re.compile(r"Spilled \d+ MiB"),
     "NOTE: Ray spilled objects to disk because its object store was full; nothing was lost, "
     "but the run was slower (more memory for Ray's object store avoids it)"),
    (re.compile(r"ActorDiedError|RayActorError|actor died|Worker exit type: (SYSTEM_ERROR|"
                r"NODE_OUT_OF_MEMORY)", re.I),
     "NOTE: a Ray worker process died during the run and Ray restarted it; the image counts "
     "above show whether any image was lost"),
)


def translate(log_text: str) -> list[str]:
    """segpipe's lines for the things in ``log_text`` that a user must know, once each."""
    return [f"segpipe: {message}" for pattern, message in TRANSLATIONS
            if pattern.search(log_text)]


@contextlib.contextmanager
def output_to_log(path: Path) -> Iterator[None]:
    """Send everything written to stderr (fd 2) to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class RedactedStream(io.TextIOBase):
    """A text stream whose writes pass through ``storage.redact`` and ``names.printable``: no
    line segpipe prints (messages, errors, tracebacks, the resume command) shows a credential
    from a URI, or lets a name from a file (a class, an image, a path) act on the terminal
    (an escape sequence, a control character: shown escaped, ``\\x1b``)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(printable(storage.redact(text), keep="\n\r\t"))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        try:   # a library may ask long after (Ray's colorama, at exit), the stream closed
            return self.stream.isatty()
        except ValueError:
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """Redact credentials from everything written to ``sys.stdout`` and ``sys.stderr``."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactedStream(sys.stdout), RedactedStream(sys.stderr)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = saved


class RunLog:
    """The log file of one command run: ``OUTPUT/logs/<command>-<UTC time>.log``.

    For a local OUTPUT the file is written in place; for a bucket it is written to a local
    temporary file and copied into OUTPUT by ``publish``.
    """

    def __init__(self, output: str, command: str):
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = f"{command}-{stamp}-{os.getpid()}.log"
        fs, root = storage.resolve(output)
        self._remote = None
        if isinstance(fs, pafs.LocalFileSystem):
            self.path = Path(root) / LOGS_DIR / name
            self.where = str(self.path)
        else:
            self.path = Path(tempfile.mkdtemp(prefix="segpipe-log-")) / name
            self._remote = (fs, storage.join(root, LOGS_DIR, name))
            self.where = storage.join(output.rstrip("/"), LOGS_DIR, name)

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""

    def publish(self) -> None:
        """Redact credentials from the log, then copy a local log of a bucket OUTPUT into it."""
        if not self.path.exists():
            return
        text = self.text()
        redacted = storage.redact(text)
        if redacted != text:
            self.path.write_text(redacted)
        if self._remote is None:
            return
        fs, target = self._remote
        with contextlib.suppress(Exception):
            storage.write_bytes_atomic(fs, target, redacted.encode())


class _SegpipeLines(logging.Handler):
    """Each record of segpipe's loggers as one terminal line: ``segpipe: message``, with
    ``WARNING:`` before warnings and errors; written to whatever ``sys.stdout`` is then."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "WARNING: " if record.levelno >= logging.WARNING else ""
            print(f"segpipe: {level}{record.getMessage()}", file=sys.stdout, flush=True)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def segpipe_lines() -> Iterator[None]:
    """While a command runs, show the library's log records (``logging.getLogger("segpipe")``,
    INFO and up) as segpipe's terminal lines; the logger is left as found afterwards."""
    logger = logging.getLogger("segpipe")
    handler = _SegpipeLines()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextlib.contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """Record Ctrl-C (SIGINT) and SIGTERM (``ray job stop``, a pod being stopped) while the
    block runs, besides raising ``KeyboardInterrupt`` as Ctrl-C does: a KeyboardInterrupt
    raised inside a library (Ray's code, an import) can be caught there, and the run must
    still stop before it writes coco/ and run.json as if nothing happened; SIGTERM stops the
    run as Ctrl-C does (its local Ray shut down, what was kept said) instead of ending the
    process where it stands. The handlers before the block are put back after it; in a
    thread other than the main one (where signals cannot be handled) the flag stays clear."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def on_interrupt(signum, frame):
        flag.set()
        before = previous[signum]
        if callable(before) and signum == signal.SIGINT:
            before(signum, frame)
        else:
            raise KeyboardInterrupt

    for number in previous:
        signal.signal(number, on_interrupt)
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
