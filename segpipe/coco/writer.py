"""Write COCO ``instances.json`` and ``results.json`` from ``predictions/``, streaming.

Reads the Parquet predictions only (never a model or an image). The image table (a few small
columns per image) is read whole and sorted by ``file_name``; detections are streamed batch by
batch straight into both JSON files, which are written atomically."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from segpipe import __version__, schema
from segpipe.coco.selection import ExportCounts, ExportOptions, mask_boxes_and_areas, select_detections
from segpipe.io import ownership, storage
from segpipe.io.predictions import iter_ok_rows, ok_rows_of_file, read_image_table
from segpipe.io.run_folder import (
    COCO_FILES,
)
from segpipe.progress import Progress


class JsonArrayWriter:
    """Write the items of one JSON array to a stream as they come, a few at a time (``flush``
    writes what is held: the caller flushes after each image and before the array's end)."""

    #: Items held before they are written whatever the caller does.
    HOLD = 1000

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.count = 0
        self._held: list[str] = []

    def write(self, item: Any) -> None:
        self.write_json(_ENCODER.encode(item))

    def write_json(self, text: str) -> None:
        """Write one item given as JSON text."""
        self._held.append(text)
        self.count += 1
        if len(self._held) >= self.HOLD:
            self.flush()

    def flush(self) -> None:
        if self._held:
            first = self.count == len(self._held)
            self.stream.write(((("\n" if first else ",\n") + ",\n".join(self._held))
                               .encode("utf-8")))
            self._held = []


#: One encoder for every item (``json.dumps`` with options builds a new one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def coco_info(description: str, extra: Optional[dict] = None) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    return {"description": description, "version": __version__, "year": now.year,
            "contributor": "segpipe", "url": "", "date_created": now.isoformat(timespec="seconds"),
            **(extra or {})}


def export_coco(predictions_dir: str, coco_dir: str, options: ExportOptions,
                settings: schema.RunSettings, info: Optional[dict] = None,
                images: Optional[pa.Table] = None, show_progress: bool = False,
                parallel: bool = False) -> ExportCounts:
    """Write ``coco_dir/instances.json`` and ``coco_dir/results.json`` from predictions.

    Both files hold the same detections, chosen by ``select_detections``; ``images`` lists the
    images that decoded and were predicted. ``images`` is ``read_image_table(predictions_dir)``
    when the caller has it already. The entries are made by ``rows_part``: in this process,
    image by image, or with ``parallel`` one prediction file per Ray task (Ray must be
    initialised), written in file order either way, so the files are the same. The
    ``categories`` list is the run's category table;
    box-only detections have no ``segmentation`` key.
    """
    if images is None:
        images = read_image_table(predictions_dir)
    counts = ExportCounts(images=images.num_rows)
    ok_images = images.filter(pc.field("status") == schema.STATUS_OK)
    counts.ok = ok_images.num_rows
    counts.errors = counts.images - counts.ok
    per_category: Counter = Counter()
    fs, root = storage.resolve(coco_dir)
    ownership.remove(coco_dir, ownership.stale_temporaries(coco_dir, COCO_FILES))
    with contextlib.ExitStack() as stack:
        instances = stack.enter_context(storage.atomic_output(fs, storage.join(root, COCO_FILES[0])))
        results = stack.enter_context(storage.atomic_output(fs, storage.join(root, COCO_FILES[1])))
        instances.write(b'{"info":' + storage.redact(
            _dumps(info or coco_info("segpipe predictions")).decode()).encode())
        instances.write(b',"licenses":[],"categories":'
                        + _dumps(settings.categories.coco_json()))
        instances.write(b',"images":[')
        image_writer = JsonArrayWriter(instances)
        for row in ok_images.select(["image_id", "file_name", "width", "height"]).to_pylist():
            image_writer.write({"id": row["image_id"], "file_name": row["file_name"],
                                "width": row["width"], "height": row["height"]})
        image_writer.flush()
        instances.write(b'\n],"annotations":[')
        annotation_writer = JsonArrayWriter(instances)
        results.write(b"[")
        result_writer = JsonArrayWriter(results)
        progress = stack.enter_context(Progress(f"writing {coco_dir}", counts.ok,
                                                enabled=show_progress))
        if parallel:
            from segpipe.coco.fanout import file_parts_on_ray  # it builds on this module

            parts = file_parts_on_ray(predictions_dir, options, settings)
        else:   # image by image, streaming
            parts = (rows_part([row], options, settings) for row in
                     iter_ok_rows(predictions_dir, soft_masks=options.repastes_masks(settings)))
        for part in parts:
            for result, annotation in zip(part.results, part.annotations):
                result_writer.write_json(result)
                annotation_writer.write_json(f'{{"id":{annotation_writer.count + 1},'
                                             + annotation)
            result_writer.flush()
            annotation_writer.flush()
            counts.add(part.counts)
            per_category.update(part.per_category)
            progress.advance(part.images)
        instances.write(b"\n]}\n")
        results.write(b"\n]\n")
    ownership.record_written(coco_dir, COCO_FILES)
    counts.annotations = annotation_writer.count
    counts.per_category = dict(sorted(per_category.items(), key=lambda kv: (-kv[1], kv[0])))
    return counts


@dataclass
class ExportPart:
    """The COCO entries of some ok images (one image, or one prediction file's): each results
    entry and each annotation as JSON text (the annotation without its leading ``"id"``
    member, which the writer numbers), what was counted, and how many images there were."""

    results: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)
    counts: ExportCounts = field(default_factory=ExportCounts)
    per_category: Counter = field(default_factory=Counter)
    images: int = 0


def file_part(predictions_dir: str, path: str, options: ExportOptions,
              settings: schema.RunSettings) -> ExportPart:
    """``rows_part`` of one prediction file (what a Ray task of a parallel export does)."""
    return rows_part(ok_rows_of_file(predictions_dir, path,
                                     soft_masks=options.repastes_masks(settings)),
                     options, settings)


def rows_part(rows: Iterable[dict], options: ExportOptions,
              settings: schema.RunSettings) -> ExportPart:
    """Select, re-paste (at a new mask threshold) and write as JSON the detections of ok
    ``rows``."""
    part = ExportPart()
    for row in rows:
        selected = select_detections(row, options, settings, part.counts)
        boxes_and_areas = mask_boxes_and_areas(selected, row["height"], row["width"])
        for det, (box, area) in zip(selected, boxes_and_areas):
            mask = det["segmentation"] is not None
            head, tail = _result_members(row["image_id"], det)
            bbox = _box_json(det["bbox"])
            part.results.append(f"{{{head}{bbox}{tail}}}")
            if mask and options.instances_bbox == "mask":
                bbox = _box_json(box)
            part.annotations.append(f'{head}{bbox}{tail},'
                                    f'"area":{area if mask else det["area"]!r},"iscrowd":0}}')
            part.per_category[det["category_name"]] += 1
        part.images += 1
    return part


def coco_result(image_id: int, det: dict) -> dict:
    """One COCO results entry; box-only detections have no ``segmentation`` key."""
    result = {"image_id": image_id, "category_id": det["category_id"], "bbox": det["bbox"],
              "score": det["score"]}
    if det["segmentation"] is not None:
        result["segmentation"] = det["segmentation"]
    return result


def _result_members(image_id: int, det: dict) -> tuple[str, str]:
    """The JSON members of ``coco_result(image_id, det)`` before and after ``"bbox"``, written
    directly: ``json`` spends most of an export's time on these small, fixed-shape objects.
    Numbers are written as ``json`` writes them (``repr``)."""
    head = f'"image_id":{image_id},"category_id":{det["category_id"]},"bbox":'
    tail = f',"score":{det["score"]!r}'
    if det["segmentation"] is not None:
        tail += ',"segmentation":' + _segmentation_json(det["segmentation"])
    return head, tail


def _box_json(box: list[float]) -> str:
    return f"[{box[0]!r},{box[1]!r},{box[2]!r},{box[3]!r}]"


def _segmentation_json(segmentation: Any) -> str:
    """A COCO RLE (``{"size", "counts"}``) or polygons as JSON text."""
    if isinstance(segmentation, dict):
        height, width = segmentation["size"]
        return (f'{{"size":[{height},{width}],"counts":'
                f'{_ENCODER.encode(segmentation["counts"])}}}')
    return _ENCODER.encode(segmentation)
