"""Fault injection for the resilience tests (``fault_kill_after_batches``): an actor that kills its
own process mid-batch, once per run."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultInjection:
    """Testing only: kill this actor's worker process in the middle of batch ``after + 1``.

    The first actor to get there leaves ``marker`` behind, so the restarted actor (and every
    other one) carries on: the run shows that Ray redoes the lost batch and no image is lost.
    """

    after: int
    marker: str

    def maybe_kill(self, batches: int) -> None:
        if batches <= self.after:
            return
        from segpipe.io import storage

        fs, path = storage.resolve(self.marker)
        if storage.exists(fs, path):
            return
        storage.write_bytes_atomic(fs, path, f"killed pid {os.getpid()}\n".encode())
        os._exit(17)
