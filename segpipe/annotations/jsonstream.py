"""JSON written as it comes: one array's items a few at a time, with one shared encoder (COCO
files, Label Studio task files: never a whole file's list in memory)."""

from __future__ import annotations

import json
from typing import IO, Any


class JsonArrayWriter:
    """Write the items of one JSON array to a stream as they come, a few at a time (``flush``
    writes what is held: the caller flushes before the array's end)."""

    #: Items held before they are written whatever the caller does.
    HOLD = 1000

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.count = 0
        self._held: list[bytes] = []

    def write(self, item: Any) -> None:
        self.write_encoded(ENCODER.encode(item).encode("utf-8"))

    def write_json(self, text: str) -> None:
        """Write one item given as JSON text."""
        self.write_encoded(text.encode("utf-8"))

    def write_encoded(self, item: bytes) -> None:
        """Write one item given as UTF-8 JSON."""
        self._held.append(item)
        self.count += 1
        if len(self._held) >= self.HOLD:
            self.flush()

    def flush(self) -> None:
        if self._held:
            first = self.count == len(self._held)
            self.stream.write((b"\n" if first else b",\n") + b",\n".join(self._held))
            self._held = []


#: One encoder for every item (``json.dumps`` with options builds a new one per call); NaN and
#: Infinity are refused, never written as the bare words no JSON reader accepts.
ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any) -> bytes:
    return ENCODER.encode(value).encode("utf-8")
