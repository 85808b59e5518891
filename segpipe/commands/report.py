"""Account for every input, summarise errors, and write the run manifest ``OUTPUT/run.json``."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from segpipe import schema
from segpipe.annotations.selection import ExportCounts
from segpipe.config import SegmentConfig
from segpipe.io import ownership
from segpipe.version import __version__

_VERSIONED = ("torch", "torchvision", "ray", "pyarrow", "numpy", "pillow", "pycocotools")


class Timer:
    """Wall-clock seconds of named phases."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            self.seconds["total"] = round(time.perf_counter() - self._start, 3)


@dataclass
class Accounting:
    """Listed inputs against written rows: all three lists are empty in a correct run."""

    listed: Optional[int]   # None when the input cannot be listed before reading
    written: int
    missing: list[str] = field(default_factory=list)      # listed, no row written
    duplicated: list[str] = field(default_factory=list)   # more than one row written
    unexpected: list[str] = field(default_factory=list)   # row written, not listed

    @property
    def complete(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)


def account_for_inputs(listing: Optional[pa.Table], images: pa.Table) -> Accounting:
    """Check that each listed image has exactly one row in ``images`` (and nothing else does).

    Inputs read by Ray Data's readers (tar shards, Parquet tables) have no listing: then only
    duplicates can be checked, and ``listed`` is ``None``. Arrow compute throughout: the
    driver makes Python objects for the exceptions only, not for every image.
    """
    written_ids = images.column("image_id")
    counted = pc.value_counts(written_ids)
    repeated = counted.filter(pc.greater(counted.field("counts"), 1)).field("values")
    duplicated = _names(images, repeated)
    if listing is None:
        return Accounting(listed=None, written=images.num_rows, duplicated=duplicated)
    listed_ids = listing.column("image_id")
    missing = listing.filter(pc.invert(pc.is_in(listed_ids, value_set=written_ids)))
    unexpected = images.filter(pc.invert(pc.is_in(written_ids, value_set=listed_ids)))
    return Accounting(
        listed=len(pc.unique(listed_ids)),
        written=images.num_rows,
        missing=sorted(missing.column("file_name").to_pylist()),
        duplicated=duplicated,
        unexpected=sorted(set(unexpected.column("file_name").to_pylist())),
    )


def _names(images: pa.Table, ids: pa.Array) -> list[str]:
    """The file names of the images with ``ids``, sorted, once each."""
    if not len(ids):
        return []
    rows = images.filter(pc.is_in(images.column("image_id"), value_set=ids))
    return sorted(set(rows.column("file_name").to_pylist()))


def error_summary(images: pa.Table) -> list[dict]:
    """``{"reason", "count", "examples"}`` for the error rows, most frequent reason first."""
    errors = images.filter(pc.field("status") == schema.STATUS_ERROR)
    by_reason: dict[str, list[str]] = {}
    for name, reason in zip(errors.column("file_name").to_pylist(),
                            errors.column("error").to_pylist()):
        by_reason.setdefault(reason or "unknown error", []).append(name)
    ranked = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [{"reason": r, "count": len(n), "examples": n[:3]} for r, n in ranked]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "segpipe": __version__}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@dataclass
class RunReport:
    """What a segment run did; ``write_manifest`` stores it as ``OUTPUT/run.json``."""

    config: SegmentConfig
    weights: dict
    cluster: dict
    counts: ExportCounts
    accounting: Accounting
    errors: list[dict]
    timings: dict[str, float]
    processed: int = 0        # images segmented by this run
    resumed_from: int = 0     # images already in predictions/ when it started (--resume)
    categories: list[dict] = field(default_factory=list)   # the run's COCO categories list
    input_skipped: dict[str, list[str]] = field(default_factory=dict)  # INPUT files left out
    reading: dict = field(default_factory=dict)   # members skipped by reason; shards cut short

    @property
    def images_per_second(self) -> dict[str, Optional[float]]:
        n = self.processed
        rate = lambda key: round(n / self.timings[key], 3) if self.timings.get(key) else None
        return {"pipeline": rate("pipeline"), "total": rate("total")}

    def to_json(self) -> dict:
        return {
            "segpipe": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": self.config.to_dict(),
            "arch": self.config.arch,
            "weights": self.weights,
            "categories": self.categories,
            "versions": package_versions(),
            "cluster": self.cluster,
            "counts": dataclasses.asdict(self.counts),
            "accounting": dataclasses.asdict(self.accounting) | {"complete": self.accounting.complete},
            "errors": self.errors,
            "processed": self.processed,
            "resumed_from": self.resumed_from,
            "input_skipped": self.input_skipped,
            "reading": self.reading,
            "timings_s": self.timings,
            "images_per_s": self.images_per_second,
        }

    def speed_line(self) -> str:
        """How fast this run segmented, or that it had nothing left to segment."""
        rate = self.images_per_second
        if not self.processed or rate["pipeline"] is None:
            done = f"all {self.resumed_from} images were in predictions/ already" \
                if self.resumed_from else "no image was left to segment"
            return f"segpipe: {done}; coco/ and run.json written in {self.timings.get('total')} s"
        return (f"segpipe: {self.processed} images segmented at {rate['pipeline']} images/s in the "
                f"pipeline, {rate['total']} images/s overall ({self.timings.get('total')} s)")

    def summary_lines(self) -> list[str]:
        c = self.counts
        lines = [
            f"segpipe: {c.images} images: {c.ok} ok, {c.errors} failed; {c.detections} detections "
            f">= score floor, {c.annotations} written to coco/ (score >= "
            f"{self.config.score_threshold})",
            *(f"segpipe:   {n} left out: {reason}" for n, reason in c.left_out()),
            self.speed_line(),
        ]
        for warning in self.weights.get("warnings", []):
            lines.append(f"segpipe: WARNING: {warning}")
        if c.errors:
            lines.append(f"segpipe: {c.errors} image(s) failed:")
            for e in self.errors:
                lines.append(f"  {e['count']:>6} x {e['reason']}  (e.g. {', '.join(e['examples'])})")
        cut = self.reading.get("cut_short", [])
        if cut:
            lines.append(f"segpipe: {len(cut)} shard(s) or table(s) could not be read to their "
                         f"end; the images read before the damage are in the run: "
                         f"{', '.join(cut[:5])}")
        a = self.accounting
        if not a.complete:
            lines.append(f"segpipe: ACCOUNTING FAILED: {len(a.missing)} missing, "
                         f"{len(a.duplicated)} duplicated, {len(a.unexpected)} unexpected rows "
                         f"(see run.json)")
        return lines


def cut_short(images: pa.Table) -> list[str]:
    """The shards and tables whose error row says they could not be read to their end."""
    from segpipe.io.sources import READ_CUT

    errors = images.filter(pc.field("status") == schema.STATUS_ERROR)
    return sorted(name for name, error in zip(errors.column("file_name").to_pylist(),
                                              errors.column("error").to_pylist())
                  if error and error.startswith("read: ") and READ_CUT in error)


def write_manifest(run_report: RunReport, output: str) -> None:
    ownership.write_json(output, "run.json", run_report.to_json())
