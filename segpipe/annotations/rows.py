"""The ok images of a run in ``file_name`` order, each with the detections an export keeps
(``coco.selection``): what every label format is written from."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from segpipe import schema
from segpipe.annotations.selection import ExportCounts, ExportOptions, image_counts, select_detections
from segpipe.model.settings import RunSettings
from segpipe.output.predictions import LOCATION_COLUMNS, read_image_table, rows_in_order
from segpipe.output.run_folder import prediction_files


def ok_image_table(predictions_dir: str,
                   images: Optional[pa.Table] = None) -> tuple[list[str], pa.Table, ExportCounts]:
    """The run's prediction files, its ok images in ``file_name`` order (``read_image_table``
    rows, or those of ``images``) and the export's image counts (``image_counts``)."""
    files = prediction_files(predictions_dir)
    table = read_image_table(predictions_dir, files) if images is None else images
    ok = table.filter(pc.field("status") == schema.STATUS_OK).select(
        ["image_id", "file_name", "width", "height", *LOCATION_COLUMNS])
    return files, ok, image_counts(table)


def selected_images(predictions_dir: str, files: list[str], ok: pa.Table, options: ExportOptions,
                    settings: RunSettings, counts: ExportCounts) -> Iterator[tuple[dict, list[dict]]]:
    """``(row, detections)`` for each image of ``ok`` (``ok_image_table`` rows, in their
    order); ``detections`` are those ``select_detections`` keeps, masks as COCO RLE whatever
    ``options.polygons`` says. ``counts`` gets every detection's fate and the annotations
    per category."""
    rle_options = replace(options, polygons=False)
    for row in rows_in_order(predictions_dir, files, ok, settings, soft_masks=options.repastes_masks(settings)):
        kept = select_detections(row, rle_options, settings, counts)
        for det in kept:
            counts.per_category[det["category_name"]] = counts.per_category.get(det["category_name"], 0) + 1
        counts.annotations += len(kept)
        yield row, kept


def add_counts(counts: ExportCounts, part: ExportCounts) -> None:
    """Add a part's detection counts (annotations included) and per-category counts."""
    counts.add(part)
    for name, n in part.per_category.items():
        counts.per_category[name] = counts.per_category.get(name, 0) + n
