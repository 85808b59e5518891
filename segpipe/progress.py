"""Show how far long work has come: a live bar on a terminal, a plain line now and then elsewhere.

``Progress`` is what ``segment``, ``export``, ``render`` and the weights download report to.
On a terminal it draws one tqdm bar (count, rate, time left); when the output is a file or a
pipe (CI logs, ``ray job submit``) it prints a plain ``segpipe: ...`` line every ``interval``
seconds and a last one at the end, so a log shows progress without carriage-return noise.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Optional, TextIO

#: Seconds between plain progress lines when the output is not a terminal.
PLAIN_INTERVAL_S = 30.0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of one piece of work towards ``total`` units (``None`` when unknown).

    ``unit="B"`` counts bytes (shown as kB/MB). ``enabled=False`` shows nothing. Call
    ``update(done, failed)`` with absolute counts, or ``advance(n)``; ``close()`` at the end.
    """

    def __init__(self, label: str, total: Optional[int], unit: str = "images",
                 stream: Optional[TextIO] = None, enabled: bool = True,
                 interval: Optional[float] = None, terminal: Optional[bool] = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.done = 0
        self.failed = 0
        self.start = time.monotonic()
        self._last_line = self.start
        self._bar = None
        self._closed = False
        self.stage: Optional[str] = None   # what the work is doing before its first unit
        if enabled and (_is_terminal(self.stream) if terminal is None else terminal):
            from tqdm import tqdm

            # A pseudo-terminal may report a 0x0 size, where tqdm draws nothing.
            size = shutil.get_terminal_size((100, 20))
            self._bar = tqdm(total=total, desc=f"segpipe: {label}",
                             unit=unit if unit == "B" else f" {unit}",
                             unit_scale=unit == "B", file=self.stream, ncols=min(size.columns, 120),
                             nrows=max(size.lines, 2), leave=True, mininterval=0.5)

    def set_stage(self, stage: Optional[str]) -> None:
        """Say what the work is doing while nothing is done yet (shown until the first unit:
        starting actors, loading the model, the first batch)."""
        self.stage = stage
        if self._bar is not None and not self._closed:
            self._bar.set_postfix_str(stage or "", refresh=True)

    def advance(self, n: int = 1, failed: int = 0) -> None:
        self.update(self.done + n, self.failed + failed)

    def update(self, done: int, failed: int = 0) -> None:
        if self.total is not None:
            done = min(done, self.total)
        self.done, self.failed = done, failed
        if not self.enabled or self._closed:
            return
        if self._bar is not None:
            self._bar.n = done
            if failed:
                self._bar.set_postfix_str(f"{failed} failed", refresh=False)
            elif done and self.stage:
                self.stage = None
                self._bar.set_postfix_str("", refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._print_line()

    def line(self) -> str:
        """``segpipe: LABEL: done/total unit (pct%), rate, failed, time left``."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        show = human_bytes if self.unit == "B" else str
        parts = [f"{show(self.done)}" + (f"/{show(self.total)}" if self.total is not None else "")
                 + ("" if self.unit == "B" else f" {self.unit}")]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        rate_text = f"{human_bytes(rate)}/s" if self.unit == "B" else f"{rate:.3g} {self.unit}/s"
        parts.append(rate_text)
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"{human_seconds((self.total - self.done) / rate)} left")
        parts.append(f"{human_seconds(elapsed)} so far")
        if self.stage and not self.done:
            parts.append(self.stage)
        return f"segpipe: {self.label}: " + ", ".join(parts)

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.close()
        elif time.monotonic() - self.start >= self.interval:
            self._print_line()  # long work ends with a last line; short work needs none

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunMonitor:
    """What the workers tell the driver while a run goes: images finished so far (for the
    progress line), the devices the predictors run on and the inputs readers skipped (for
    run.json).

    Runs as a Ray actor with no CPU (``ray.remote(num_cpus=0)(RunMonitor)``); encoders call
    ``add`` once per batch, each predictor actor calls ``add_device`` once when it starts, and
    the driver polls ``totals`` and reads ``devices`` at the end.
    """

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self._devices: dict[str, dict] = {}
        self._device_actors: dict[str, int] = {}
        self._skipped: dict[str, int] = {}
        self._starts: list[dict] = []

    def add_skipped(self, reason: str, count: int) -> None:
        """Readers report inputs they left out (tar members without an image extension)."""
        self._skipped[reason] = self._skipped.get(reason, 0) + count

    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def add_device(self, described: dict, where: Optional[dict] = None) -> None:
        """A predictor actor started on ``described``; ``where`` names the actor and its
        node (a restarted actor keeps its id)."""
        key = repr(sorted(described.items()))
        self._devices[key] = described
        self._device_actors[key] = self._device_actors.get(key, 0) + 1
        self._starts.append({"time": time.time(), **(where or {})})

    def starts(self) -> list[dict]:
        """When each predictor actor (re)started, and where: ``time`` is ``time.time()``."""
        return list(self._starts)

    def devices(self) -> list[dict]:
        """Each distinct device description, with how many predictor actors started on it."""
        return [{**described, "actors_started": self._device_actors[key]}
                for key, described in self._devices.items()]

    def add(self, ok: int, failed: int) -> None:
        self.ok += ok
        self.failed += failed

    def totals(self) -> tuple[int, int]:
        return self.ok, self.failed
