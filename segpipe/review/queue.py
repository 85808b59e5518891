"""Rank a run's ok images for review (``signals``) and write the ranking.

``score_images`` reads ``predictions/`` once (rows in ``file_name`` order, soft masks
included) and keeps a few numbers per image in Arrow columns; ``rank`` orders them by
priority (ties by name); ``write_ranking`` writes ``review.jsonl`` (one object per image, in
rank order, with its signals and the reasons in words) and ``review.csv`` (the same, flat).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from segpipe import schema
from segpipe.annotations.selection import ExportCounts, image_counts
from segpipe.encode.encoder import dequantise_crops, dequantise_soft_masks
from segpipe.io import storage
from segpipe.model.settings import RunSettings
from segpipe.output.damage import DAMAGED_KEY
from segpipe.output.predictions import read_image_table, rows_in_order
from segpipe.output.run_folder import prediction_files
from segpipe.review.signals import (
    HIGH_MASK,
    LOW_MASK,
    SIGNALS,
    UNSURE_HIGH,
    UNSURE_LOW,
    SignalSettings,
    borderline_weights,
    mask_uncertainty,
    rarity,
    threshold_sensitivity,
)

#: Per-image columns of the scored table beyond the image table's and ``SIGNALS``.
DETAIL_COLUMNS = ("priority", "kept", "borderline_count", "closest_score", "closest_category",
                  "unsure_category", "most_unsure", "sensitive_category", "most_sensitive",
                  "rare_category")


@dataclass
class _Accumulator:
    """Per-image numbers while the rows stream by (numpy arrays filled by position)."""

    size: int
    values: dict[str, np.ndarray] = field(default_factory=dict)
    kept_image: list[np.ndarray] = field(default_factory=list)
    kept_category: list[np.ndarray] = field(default_factory=list)
    _pending_image: list[int] = field(default_factory=list, repr=False)
    _pending_category: list[int] = field(default_factory=list, repr=False)

    def add_kept(self, position: int, categories: np.ndarray) -> None:
        """Note the kept detections' categories of the image at ``position``; held in
        ``_pending`` Python lists and packed into arrays every few thousand images."""
        self._pending_image.extend([position] * len(categories))
        self._pending_category.extend(categories.tolist())
        if len(self._pending_image) >= 65536:
            self.pack()

    def pack(self) -> None:
        if self._pending_image:
            self.kept_image.append(np.asarray(self._pending_image, np.int64))
            self.kept_category.append(np.asarray(self._pending_category, np.int32))
            self._pending_image, self._pending_category = [], []

    def __post_init__(self) -> None:
        for name in (*SIGNALS, "closest_score", "most_unsure", "most_sensitive"):
            self.values[name] = np.zeros(self.size, np.float64)
        for name in ("kept", "borderline_count"):
            self.values[name] = np.zeros(self.size, np.int32)
        for name in ("closest_category", "unsure_category", "sensitive_category", "rare_category"):
            self.values[name] = np.full(self.size, -1, np.int32)


def _soft_masks(detections: list[dict], settings: RunSettings) -> Optional[list[np.ndarray]]:
    """The soft masks of ``detections`` (a tiled one's best part's) as stacks of one shape
    (``[N, M, M]``: one stack; grid crops, ``model.grids``: one ``[1, h, w]`` each), or None
    if any is missing."""
    stored = []
    for det in detections:
        soft = det.get("soft_mask")
        if soft is None and det.get("parts"):
            soft = det["parts"][0].get("soft_mask")
        if soft is None:
            return None
        stored.append(soft)
    if not stored:
        return []
    if settings.model.mask_frame is not None:
        grids = np.asarray([det["mask_grid"] for det in detections], np.int64)
        return [1.0 / (1.0 + np.exp(-crop[None].astype(np.float64)))   # logits → probabilities
                for crop in dequantise_crops(stored, grids, settings.soft_mask_dtype)]
    return [dequantise_soft_masks(stored, settings.soft_mask_dtype)]


@dataclass
class ScoredImages:
    """Every ok image (``read_image_table`` columns, ``file_name`` order) with its ``SIGNALS``
    and ``DETAIL_COLUMNS``, and the run's kept detections per category id."""

    table: pa.Table
    kept_per_category: dict[int, int]
    counts: ExportCounts   # images, and what was damaged in predictions/ (left out, named)


def score_images(predictions_dir: str, settings: RunSettings,
                 signal_settings: Optional[SignalSettings] = None) -> ScoredImages:
    """Score every ok image of the run (``signals``), reading ``predictions/`` once."""
    signal_settings = signal_settings or SignalSettings()
    import pyarrow.compute as pc

    files = prediction_files(predictions_dir)
    images = read_image_table(predictions_dir, files)
    ok = images.filter(pc.field("status") == schema.STATUS_OK)
    acc = _Accumulator(ok.num_rows)
    known = settings.categories.ids
    v = acc.values
    damaged = image_counts(images)
    for position, row in enumerate(rows_in_order(predictions_dir, files, ok, settings, soft_masks=True)):
        if DAMAGED_KEY in row:
            damaged.note_damaged(row[DAMAGED_KEY])
        dets = [d for d in row["detections"] or [] if d["category_id"] in known]
        if not dets:
            continue
        scores = np.array([d["score"] for d in dets], np.float64)
        categories = np.array([d["category_id"] for d in dets], np.int32)
        weights = borderline_weights(scores, signal_settings)
        v["borderline"][position] = weights.sum()
        v["borderline_count"][position] = int((weights > 0).sum())
        closest = int(np.argmin(np.abs(scores - signal_settings.score_threshold)))
        v["closest_score"][position] = scores[closest]
        v["closest_category"][position] = categories[closest]
        kept = np.flatnonzero(scores >= signal_settings.score_threshold)
        v["kept"][position] = kept.size
        if kept.size == 0:
            continue
        acc.add_kept(position, categories[kept])
        soft = _soft_masks([dets[k] for k in kept], settings) \
            if settings.model.has_masks and settings.soft_masks else None
        if soft:
            for name, found, where, most in (
                    ("mask_uncertainty", np.concatenate([mask_uncertainty(s) for s in soft]),
                     "unsure_category", "most_unsure"),
                    ("threshold_sensitivity", np.concatenate([threshold_sensitivity(s) for s in soft]),
                     "sensitive_category", "most_sensitive")):
                best = int(np.argmax(found))
                v[name][position] = found.sum()
                v[where][position] = categories[kept[best]]
                v[most][position] = found[best]
    kept_per_category: dict[int, int] = {}
    acc.pack()
    if acc.kept_image:
        image_of = np.concatenate(acc.kept_image)
        category_of = np.concatenate(acc.kept_category)
        ids, inverse, counts = np.unique(category_of, return_inverse=True, return_counts=True)
        kept_per_category = dict(zip(ids.tolist(), counts.tolist()))
        rare = rarity(counts)[inverse]
        order = np.lexsort((-rare, image_of))   # per image, rarest first
        first = np.ones(order.size, bool)
        first[1:] = image_of[order][1:] != image_of[order][:-1]
        np.add.at(v["rare_class"], image_of, rare)
        v["rare_category"][image_of[order][first]] = category_of[order][first]
    v["priority"] = np.zeros(len(v[SIGNALS[0]]), np.float64)
    for name in SIGNALS:
        v["priority"] += v[name]
    for name in (*SIGNALS, *DETAIL_COLUMNS):
        ok = ok.append_column(name, pa.array(v[name]))
    return ScoredImages(ok, kept_per_category, damaged)


def rank(scored: pa.Table) -> pa.Table:
    """``scored`` in review order: highest priority first, ties in ``file_name`` order."""
    priority = scored.column("priority").to_numpy()
    order = np.lexsort((np.arange(len(priority)), -priority))
    return scored.take(pa.array(order)).append_column(
        "rank", pa.array(np.arange(1, len(order) + 1, dtype=np.int64)))


def reasons(row: dict, names: dict[int, str], signal_settings: SignalSettings,
            class_counts: dict[int, int]) -> list[str]:
    """Why an image ranks where it does, in words: each signal over 0.05, largest first
    (``class_counts``: the run's kept detections per category id)."""
    said = []
    if row["borderline"] > 0.05:
        said.append((row["borderline"],
                     f"{row['borderline_count']} detection(s) within {signal_settings.margin:g} of "
                     f"the {signal_settings.score_threshold:g} threshold (closest: "
                     f"{names.get(row['closest_category'], '?')} {row['closest_score']:.3f})"))
    if row["mask_uncertainty"] > 0.05:
        said.append((row["mask_uncertainty"],
                     f"{names.get(row['unsure_category'], '?')} mask: {row['most_unsure']:.0%} of its "
                     f"box has probability {UNSURE_LOW:g}-{UNSURE_HIGH:g}"))
    if row["threshold_sensitivity"] > 0.05:
        said.append((row["threshold_sensitivity"],
                     f"{names.get(row['sensitive_category'], '?')} mask changes "
                     f"{row['most_sensitive']:.0%} between mask thresholds {LOW_MASK:g} and {HIGH_MASK:g}"))
    if row["rare_class"] > 0.05:
        category = row["rare_category"]
        said.append((row["rare_class"], f"rare class: {names.get(category, '?')} "
                                        f"({class_counts.get(category, 0)} kept in the run)"))
    return [text for _, text in sorted(said, key=lambda s: -s[0])]


RECORD_COLUMNS = ("rank", "image_id", "file_name", "priority", *SIGNALS)


def ranked_records(ranked: pa.Table, settings: RunSettings, signal_settings: SignalSettings,
                   kept_per_category: dict[int, int], chunk: int = 4096) -> Iterator[dict]:
    """One record per ranked image (``RECORD_COLUMNS``, ``kept`` and its ``reasons``), a
    chunk of rows converted at a time."""
    names = {c.id: c.name for c in settings.categories.categories}
    for start in range(0, ranked.num_rows, chunk):
        for row in ranked.slice(start, chunk).to_pylist():
            record = {k: (round(row[k], 4) if isinstance(row[k], float) else row[k]) for k in RECORD_COLUMNS}
            record["kept"] = row["kept"]
            record["reasons"] = reasons(row, names, signal_settings, kept_per_category)
            yield record


#: What makes a spreadsheet read a cell as a formula (OWASP's list: ``=``, ``+``, ``-``, ``@``,
#: tab and carriage return), and what may stand before them.
_FORMULA_START = re.compile(r"^[\s\x00-\x1f]*[=+\-@\t\r]")


def spreadsheet_cell(value: object) -> object:
    """``value`` as a CSV cell no spreadsheet evaluates: text that could start a formula
    gets a leading ``'`` (the escape Excel, LibreOffice and Google Sheets show as text);
    numbers stay numbers."""
    if isinstance(value, str) and _FORMULA_START.match(value):
        return "'" + value
    return value


def write_ranking(to: str, ranked: pa.Table, settings: RunSettings,
                  signal_settings: SignalSettings, kept_per_category: dict[int, int]) -> list[str]:
    """``review.jsonl`` and ``review.csv`` in ``to``, atomically; returns their names."""
    fs, root = storage.resolve(to)
    with storage.atomic_output(fs, storage.join(root, "review.jsonl")) as jsonl, \
            storage.atomic_output(fs, storage.join(root, "review.csv")) as flat:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow([*RECORD_COLUMNS, "kept", "reasons"])
        for n, record in enumerate(ranked_records(ranked, settings, signal_settings, kept_per_category)):
            jsonl.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            writer.writerow([spreadsheet_cell(v) for v in (*(record[k] for k in RECORD_COLUMNS),
                                                             record["kept"], "; ".join(record["reasons"]))])
            if n % 1024 == 1023:
                flat.write(text.getvalue().encode("utf-8"))
                text.seek(0)
                text.truncate()
        flat.write(text.getvalue().encode("utf-8"))
    return ["review.jsonl", "review.csv"]
